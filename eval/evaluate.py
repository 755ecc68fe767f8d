"""One function that scores any model on fixed candidates or full ranking.

A model is anything with `score(users, histories, candidates) -> scores`: users [B], histories
[B, L] left-padded with 0, candidates [B, C] item ids (0 = padding) or None for all items, in which
case it returns [B, num_items + 1] (column 0, padding, is ignored).
"""
from __future__ import annotations

import time
from typing import NamedTuple, Protocol

import numpy as np
import torch
from rich.progress import track

from .dataset import SeqDataset, pad_left
from .errors import InputError
from .metrics import from_ranks, nonfinite_rows, random_floor, ranks


class Scorer(Protocol):
    def score(self, users: torch.Tensor, histories: torch.Tensor,
              candidates: torch.Tensor | None) -> torch.Tensor: ...


def protocol_label(protocol: str) -> str:
    return "full ranking" if protocol == "full" else f"{protocol} negatives"


def protocols_of(ds: SeqDataset) -> list[str]:
    """The protocols a data set supports: each persisted candidate size (largest first), then full ranking."""
    sizes = sorted((int(p.stem.rsplit("_", 1)[1]) for p in ds.path.glob("candidates_test_*.npy")), reverse=True)
    return [str(n) for n in sizes] + ["full"]


def _batch_candidates(ds: SeqDataset, split: str, protocol: str, users: np.ndarray,
                      histories: list[np.ndarray], targets: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Candidates [B, C] (truth in column 0) and a validity mask, for one batch of users."""
    if protocol != "full":
        cand = torch.as_tensor(ds.candidates(split, int(protocol))[users])
        return cand, cand > 0
    # full ranking: every item except the ones already in the history; truth moved to column 0
    n = ds.num_items
    valid = torch.ones(len(users), n + 1, dtype=torch.bool)
    valid[:, 0] = False
    for i, h in enumerate(histories):
        valid[i, torch.as_tensor(h, dtype=torch.long)] = False
    valid[torch.arange(len(users)), torch.as_tensor(targets)] = True
    return None, valid


class Ranking(NamedTuple):
    """Per-user results of one model on one split and protocol."""

    ranks: np.ndarray      # 0-based rank of the true item (`eval.metrics.ranks`)
    candidates: np.ndarray  # valid candidates, truth included
    top: np.ndarray        # the top-20 recommended items (0 pads shorter lists)
    nonfinite: np.ndarray  # a NaN or infinite score among the user's candidates (truth ranked last)
    users: np.ndarray      # the users ranked, in the order of the arrays above

    def rows(self, users: np.ndarray) -> np.ndarray:
        """Positions in this ranking of those of `users` it ranked (a group's rows)."""
        return rows_of(self.users, users)


def rows_of(ranked: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Positions in `ranked` (the users of a ranking, in order) of those of `users` it holds."""
    return np.flatnonzero(np.isin(ranked, users))


@torch.no_grad()
def rank_users(model: Scorer, ds: SeqDataset, split: str = "test", protocol: str = "100",
               users: np.ndarray | None = None, batch_size: int = 256, max_len: int = 200,
               progress: bool = False) -> Ranking:
    """Per-user ranks, candidate counts, top-20 recommended items and non-finite flags of `users`
    (default: every user with a target in `split`)."""
    users = ds.eval_users(split) if users is None else np.asarray(users)
    targets = ds.target(split)
    if not targets[users].all():
        raise InputError(f"{int((targets[users] == 0).sum())} of the users asked for have no {split} target")
    out_r, out_n, out_top, out_bad = [], [], [], []
    batches = range(0, len(users), batch_size)
    for start in (track(batches, description=f"scoring {split}/{protocol}") if progress else batches):
        u = users[start:start + batch_size]
        hist = [ds.history(int(x), split) for x in u]
        cand, valid = _batch_candidates(ds, split, protocol, u, hist, targets[u])
        scores = model.score(torch.as_tensor(u), pad_left(hist, max_len), cand).float()
        if cand is None:  # full ranking: put the truth's score in column 0, as with candidates
            t = torch.as_tensor(targets[u])
            rows = torch.arange(len(u))
            truth = scores[rows, t].clone()
            valid = valid.clone()
            valid[rows, t] = False
            scores = torch.cat([truth[:, None], scores], dim=1)
            valid = torch.cat([torch.ones(len(u), 1, dtype=torch.bool), valid], dim=1)
            ids = torch.cat([t[:, None], torch.arange(ds.num_items + 1).expand(len(u), -1)], dim=1)
        else:
            ids = cand
        out_r.append(ranks(scores, valid, u).numpy())
        out_n.append(valid.sum(dim=1).numpy())
        bad = nonfinite_rows(scores, valid)
        out_bad.append(bad.numpy())
        if bad.any():  # nothing recommended from a NaN or infinite score
            scores = scores.nan_to_num(nan=float("-inf"), posinf=float("-inf"))
        masked = scores.masked_fill(~valid, float("-inf"))
        best = masked.topk(min(20, masked.shape[1]), dim=1)
        top = torch.gather(ids, 1, best.indices).masked_fill(best.values == float("-inf"), 0)
        out_top.append(top.numpy())  # 0 pads lists of users with fewer than 20 candidates
    return Ranking(*(np.concatenate(x) for x in (out_r, out_n, out_top, out_bad)), users)


def evaluate(model: Scorer, ds: SeqDataset, split: str = "test", protocol: str = "100",
             batch_size: int = 256, max_len: int = 200, progress: bool = False,
             users: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of a model with the random-ranker floor of the same protocol and users/s."""
    t0 = time.perf_counter()
    ranking = rank_users(model, ds, split, protocol, users=users, batch_size=batch_size, max_len=max_len,
                         progress=progress)
    seconds = time.perf_counter() - t0
    return {**metrics_of(ranking), "users_per_s": float(len(ranking.ranks) / seconds) if seconds > 0 else float("inf")}


def metrics_of(ranking: Ranking, rows: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of a ranking's users (or of `rows` of them) beside the random floor of their candidate
    counts, with the count of users whose scores were not finite (no users: a count of 0)."""
    take = slice(None) if rows is None else rows
    r, n, bad = ranking.ranks[take], ranking.candidates[take], ranking.nonfinite[take]
    if not len(r):
        return {"users": 0}
    return {**from_ranks(r, n), **{f"random_{k}": v for k, v in random_floor(n).items()}, "users": int(len(r)),
            "nonfinite_users": int(bad.sum())}
