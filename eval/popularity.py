"""Popularity-bias measures of top-k recommendation lists.

EPC and EFD follow Vargas & Castells (2011) in their relevance-aware, rank-discounted form:
  metric@k = mean_u  sum_j disc(j) * rel(u, i_j) * nov(i_j)  /  sum_j disc(j),   disc(j) = 1/log2(j+1)
with nov(i) = 1 - p(i) for EPC and -log2 p(i) for EFD, p(i) = max(train users of i, 1) / |U|.
"""
from __future__ import annotations

import numpy as np


def gini(exposure: np.ndarray) -> float:
    """Gini coefficient of how often each item is recommended (0 = even, 1 = one item gets all)."""
    x = np.sort(np.asarray(exposure, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * total))


def popularity_metrics(top: np.ndarray, targets: np.ndarray, popularity: np.ndarray, num_users: int,
                       tail_items: np.ndarray, k: int = 10) -> dict[str, float]:
    """top: [U, >=k] recommended item ids (0 = none); popularity: train count per item id (index 0 unused)."""
    top = top[:, :k]
    shown = top[top > 0]
    num_items = len(popularity) - 1
    exposure = np.bincount(shown, minlength=num_items + 1)[1:]
    p = np.maximum(popularity, 1) / num_users
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    rel = (top == targets[:, None]) & (top > 0)
    norm = disc.sum()
    epc = (rel * disc * (1 - p[top])).sum(1) / norm
    efd = (rel * disc * -np.log2(p[top])).sum(1) / norm
    return {
        f"avg_popularity@{k}": float(popularity[shown].mean()) if len(shown) else 0.0,
        f"long_tail_share@{k}": float(np.isin(shown, tail_items).mean()) if len(shown) else 0.0,
        f"coverage@{k}": float((exposure > 0).mean()),
        f"gini@{k}": gini(exposure),
        f"EPC@{k}": float(epc.mean()),
        f"EFD@{k}": float(efd.mean()),
    }
