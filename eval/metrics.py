"""Ranking metrics, computed once for every model.

A user's rank is the number of valid candidates scored at least as high as the true item
(pessimistic ties: a model that scores everything equal ranks the truth last, not first).
"""
from __future__ import annotations

import numpy as np
import torch

KS_HR = (1, 5, 10, 20)
KS_NDCG = (5, 10, 20)


def ranks(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of column 0 (the true item) among the valid columns of each row."""
    truth = scores[:, :1]
    beats = (scores[:, 1:] >= truth) & valid[:, 1:]
    return beats.sum(dim=1)


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
