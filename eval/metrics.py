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
    truth, others, v = scores[:, :1], scores[:, 1:], valid[:, 1:]
    above, tied = (others > truth) & v, (others == truth) & v
    bad = ~torch.isfinite(scores)
    if bad.any():  # a non-finite score never helps: it beats the truth, or the truth beats nothing
        above |= (bad[:, 1:] | bad[:, :1]) & v
        tied &= ~above
    keys = np.arange(len(scores)) if keys is None else keys
    share = torch.as_tensor(tie_draws(keys), dtype=torch.float64)
    return above.sum(dim=1) + (share * (tied.sum(dim=1) + 1)).floor().long()


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
