"""Ranking metrics, computed once for every model.

A user's rank is the number of valid candidates scored above the true item, plus a random share of
those tied with it (ties broken uniformly at random by a fixed draw per user, so a model that scores
everything equal gets the random floor, never a better figure). A score that is not finite (a
diverged model) never counts in the model's favour: a NaN or infinite true score ranks the truth
last, any other such candidate ranks above it.
"""
from __future__ import annotations

import numpy as np
import torch

KS_HR = (1, 5, 10, 20)
KS_NDCG = (5, 10, 20)


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
    bad_truth = ~torch.isfinite(truth)
    above = ((others > truth) | ~torch.isfinite(others) | bad_truth) & v
    tied = (others == truth) & v & ~above
    keys = np.arange(len(scores)) if keys is None else keys
    share = torch.as_tensor(tie_draws(keys), dtype=torch.float64)
    return above.sum(dim=1) + (share * (tied.sum(dim=1) + 1)).floor().long()


def from_ranks(r: np.ndarray) -> dict[str, float]:
    """HR@k, NDCG@k and MRR from 0-based ranks (one relevant item per user)."""
    r = np.asarray(r, dtype=np.float64)
    out = {f"HR@{k}": float((r < k).mean()) for k in KS_HR}
    gain = 1.0 / np.log2(r + 2.0)
    out.update({f"NDCG@{k}": float(np.where(r < k, gain, 0.0).mean()) for k in KS_NDCG})
    out["MRR"] = float((1.0 / (r + 1.0)).mean())
    return out


def random_floor(num_candidates: np.ndarray) -> dict[str, float]:
    """Expected metrics of a random ranker when user u ranks the truth among num_candidates[u]
    items (truth included): its rank is uniform on 0..n-1."""
    n = np.asarray(num_candidates, dtype=np.float64)
    kmax = max(max(KS_HR), max(KS_NDCG))
    pos = np.arange(kmax)
    gain = 1.0 / np.log2(pos + 2.0)
    out = {f"HR@{k}": float(np.mean(np.minimum(k, n) / n)) for k in KS_HR}
    out.update({f"NDCG@{k}": float(np.mean([gain[: int(min(k, m))].sum() / m for m in n])) for k in KS_NDCG})
    harmonic = {m: (1.0 / np.arange(1, m + 1)).sum() for m in np.unique(n).astype(int)}
    out["MRR"] = float(np.mean([harmonic[int(m)] / m for m in n]))
    return out
