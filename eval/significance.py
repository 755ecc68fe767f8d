"""Paired comparisons of two models over the same users: is a difference more than noise?

On ml-100k two SASRecs trained with different seeds differ by up to +-0.012 NDCG@10, so a report
that only prints two means cannot rank models. For the per-user values a (model A) and b (model B)
of the same users, `paired_test` gives the mean difference, a bootstrap 95 % interval of it
(users resampled with replacement) and a two-sided p-value from a paired sign-flip permutation
test (under "no difference" each user's a - b is as likely to have either sign).
"""
from __future__ import annotations

import numpy as np

ALPHA = 0.05


def per_user(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user NDCG@10 and reciprocal rank from 0-based ranks (the means are the report's metrics)."""
    r = np.asarray(ranks, dtype=np.float64)
    return {"NDCG@10": np.where(r < 10, 1.0 / np.log2(r + 2.0), 0.0), "MRR": 1.0 / (r + 1.0)}


def paired_test(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict[str, float | bool]:
    """Mean of a - b, its bootstrap 95 % interval, the sign-flip p-value and whether p < 0.05."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if n == 0:
        return {"diff": 0.0, "low": 0.0, "high": 0.0, "p": 1.0, "significant": False, "users": 0}
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2])
    signs = rng.choice(np.array([-1.0, 1.0]), size=(resamples, n))
    flipped = np.abs((signs * d).mean(axis=1))
    p = (1 + np.count_nonzero(flipped >= abs(d.mean()) - 1e-12)) / (resamples + 1)
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "p": float(p),
            "significant": bool(p < ALPHA), "users": int(n)}


def seeds_test(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict[str, float | bool]:
    """`paired_test` for models trained with several seeds: a and b are [seeds, users] per-user values,
    row k of both trained with the k-th seed. A two-level bootstrap (seeds, then users, with
    replacement) gives the interval and a two-sided p-value, so that training noise, which moves every
    user of a model together, counts as well as the sampling of users."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n_seeds, n = d.shape
    if n == 0:
        return {"diff": 0.0, "low": 0.0, "high": 0.0, "p": 1.0, "significant": False, "users": 0, "seeds": n_seeds}
    rng = np.random.default_rng(seed)
    boot = np.array([d[rng.integers(0, n_seeds, n_seeds)][:, rng.integers(0, n, n)].mean() for _ in range(resamples)])
    low, high = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2])
    p = min(1.0, 2 * (1 + min(np.count_nonzero(boot <= 0), np.count_nonzero(boot >= 0))) / (resamples + 1))
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "p": float(p),
            "significant": bool(p < ALPHA), "users": int(n), "seeds": int(n_seeds)}
