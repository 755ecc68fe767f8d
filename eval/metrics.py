"""Ranking metrics, computed once for every model.

A user's rank is the number of valid candidates scored above the true item, plus a random share of
those tied with it (ties broken uniformly at random by a fixed draw per user, so a model that scores
everything equal gets the random floor, never a better figure). A score that is not finite (a
diverged model) never counts in the model's favour: a NaN or infinite true score ranks the truth
last, any other such candidate ranks above it.

Every metric is one entry of `METRICS`: a per-user value from the true item's rank and the user's
number of candidates; the metric is its mean over users, its random floor the mean over uniform
ranks. `register_metric` adds one, and it then appears in every metrics.json, in the report's tables
and, with `tested=True`, in its paired comparisons, with no other edit.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

PerUser = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (0-based ranks, candidate counts) -> values


@dataclass(frozen=True)
class Metric:
    per_user: PerUser
    tested: bool = False  # compared between models in the report's paired tests


METRICS: dict[str, Metric] = {}


def register_metric(name: str, tested: bool = False) -> Callable[[PerUser], PerUser]:
    """Decorator: `fn(ranks, candidates) -> per-user values` becomes the metric `name`."""
    def add(fn: PerUser) -> PerUser:
        METRICS[name] = Metric(fn, tested)
        _floor.cache_clear()
        return fn
    return add


def tested_metrics() -> list[str]:
    """The metrics the report's paired comparisons test."""
    return [name for name, metric in METRICS.items() if metric.tested]


def tie_draws(keys: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per key (user id), the same on every call: splitmix64 of the key, so a
    user's tie-break does not depend on the batch, the order of users or the number of processes."""
    x = np.asarray(keys, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0 ** 53


def nonfinite_rows(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rows with a NaN or infinite score on a valid column (the truth, column 0, always counts)."""
    return (~torch.isfinite(scores) & valid).any(dim=1) | ~torch.isfinite(scores[:, 0])


def ranks(scores: torch.Tensor, valid: torch.Tensor, keys: np.ndarray | None = None) -> torch.Tensor:
    """0-based rank of column 0 (the true item) among the valid columns of each row: candidates scored
    above it, plus ties broken at random by `tie_draws(keys)` (keys: user ids; default the row index)."""
    above, tied, _ = count_against(scores[:, 1:], scores[:, 0], valid[:, 1:])
    return rank_of(above, tied, np.arange(len(scores)) if keys is None else keys)


def count_against(scores: torch.Tensor, truth: torch.Tensor,
                  valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: how many valid columns of `scores` rank above `truth` [B] and how many tie with it, and
    whether a valid column is not finite. A non-finite score never helps: it beats the truth, or a
    non-finite truth beats nothing. Counts over column blocks add up to the counts over their union."""
    t = truth[:, None]
    if bool(torch.isfinite(scores.sum())) and bool(torch.isfinite(truth).all()):  # every score finite
        return ((scores > t) & valid).sum(dim=1), ((scores == t) & valid).sum(dim=1), \
            torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    finite = torch.isfinite(scores)
    above = ((scores > t) | ~finite | ~torch.isfinite(t)) & valid
    tied = (scores == t) & valid & ~above
    return above.sum(dim=1), tied.sum(dim=1), (~finite & valid).any(dim=1)


def rank_of(above: torch.Tensor, tied: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
    """0-based ranks from the counts of candidates above and tied with the truth: a tie is broken at
    random, by `tie_draws(keys)` (the user ids)."""
    share = torch.as_tensor(tie_draws(keys), dtype=torch.float64, device=above.device)
    return above + (share * (tied + 1)).floor().long()


def _order_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One int64 per (score, item) that orders by score, then the smaller item id first (ids < 2**32;
    -0.0 counts as 0.0; no NaN)."""
    bits = (values.float() + 0.0).view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # float order as integer order
    return bits * 2 ** 32 + (2 ** 32 - 1 - ids)


def top_k(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row's (value, item id) pairs, best first: higher value, then the smaller item
    id among equal values, so the result does not depend on the order of the columns or on how they
    were split into blocks (top_k of the blocks' top_k is the top_k of all). `values` [B, C] (no NaN;
    -inf for what may not be chosen), `ids` [B, C] or [C]; k <= C."""
    ids = ids.expand_as(values)
    best, pick = values.topk(min(k + 1, values.shape[1]), dim=1)
    # rows whose (k+1)-th value equals the k-th: which of the equal values topk kept is unspecified
    clash = (best[:, k] == best[:, k - 1]) & (best[:, k - 1] > float("-inf")) if best.shape[1] > k else None
    pick = pick[:, :k]
    if clash is not None and clash.any():
        rows = clash.nonzero()[:, 0]
        pick[rows] = _order_keys(values[rows], ids[rows]).topk(k, dim=1).indices
    best, chosen = values.gather(1, pick), ids.gather(1, pick)
    order = _order_keys(best, chosen).topk(k, dim=1).indices
    return best.gather(1, order), chosen.gather(1, order)


def per_user(r: np.ndarray, n: np.ndarray, tested: bool = False) -> dict[str, np.ndarray]:
    """Each metric's per-user values (only the tested ones with `tested`) from 0-based ranks `r` and
    candidate counts `n` (arrays of one shape: [users], or [seeds, users])."""
    r, n = np.asarray(r, dtype=np.float64), np.broadcast_to(np.asarray(n, dtype=np.float64), np.shape(r))
    return {name: m.per_user(r, n) for name, m in METRICS.items() if m.tested or not tested}


def from_ranks(r: np.ndarray, n: np.ndarray) -> dict[str, float]:
    """Every metric from 0-based ranks and candidate counts (one relevant item per user)."""
    return {name: float(values.mean()) for name, values in per_user(r, n).items()}


@functools.lru_cache(maxsize=65536)
def _floor(candidates: int) -> dict[str, float]:
    return from_ranks(np.arange(candidates), np.full(candidates, candidates))


def random_floor(num_candidates: np.ndarray) -> dict[str, float]:
    """Expected metrics of a random ranker when user u ranks the truth among num_candidates[u]
    items (truth included): its rank is uniform on 0..n-1."""
    sizes, users = np.unique(np.asarray(num_candidates, dtype=np.int64), return_counts=True)
    floors = [_floor(int(m)) for m in sizes]
    return {name: float(np.average([f[name] for f in floors], weights=users)) for name in METRICS}


# the metrics every report has (a registered one joins them in every table and, tested, the comparisons)
def _hit_rate(k: int) -> PerUser:
    return lambda r, n: (r < k).astype(np.float64)


def _ndcg(k: int) -> PerUser:  # one relevant item: the ideal DCG is 1
    return lambda r, n: np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


for _k in (1, 5, 10, 20):
    register_metric(f"HR@{_k}")(_hit_rate(_k))
for _k in (5, 10, 20):
    register_metric(f"NDCG@{_k}", tested=_k == 10)(_ndcg(_k))
register_metric("MRR", tested=True)(lambda r, n: 1.0 / (r + 1.0))
