"""Paired comparisons of two models over the same users: is a difference more than noise?

On ml-100k two SASRecs trained with different seeds differ by up to +-0.012 NDCG@10, so a report
that only prints two means cannot rank models. For the per-user values a (model A) and b (model B)
of the same users, `paired_test` gives the mean difference, a bootstrap 95 % interval of it
(users resampled with replacement) and a two-sided p-value from a paired sign-flip permutation
test (under "no difference" each user's a - b is as likely to have either sign). It holds each
model's training fixed (one run each); `seeds_test` adds the noise of training over seeds. A report
makes many such tests: `adjust` corrects their p-values for multiplicity before anything is called
significant.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from .errors import InputError

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


def seeds_test(a: np.ndarray, b: np.ndarray) -> dict[str, float | bool]:
    """`paired_test` for models trained with several seeds: a and b are [seeds, users] per-user values,
    row k of both trained with the k-th seed, every seed scoring the same users. Seeds and users are
    crossed random effects (training noise moves every user of a model together), so the variance of
    the mean difference comes from a two-way ANOVA, (MS_seed + MS_user - MS_residual) / (seeds * users),
    with Satterthwaite's degrees of freedom for the t interval and two-sided p-value."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if np.shape(a) != np.shape(b) or d.ndim != 2 or d.shape[0] < 2 or d.shape[1] < 2:
        raise InputError(f"seeds_test needs two [seeds, users] arrays of one shape with at least 2 seeds and "
                         f"2 users, not {np.shape(a)} and {np.shape(b)}")
    n_seeds, n = d.shape
    seed_means, user_means, mean = d.mean(axis=1), d.mean(axis=0), d.mean()
    ms_seed = n * seed_means.var(ddof=1)
    ms_user = n_seeds * user_means.var(ddof=1)
    residual = d - seed_means[:, None] - user_means[None, :] + mean
    ms_resid = (residual ** 2).sum() / ((n_seeds - 1) * (n - 1))
    combined = max(ms_seed + ms_user - ms_resid, ms_resid)  # never below the residual's share
    se = np.sqrt(combined / (n_seeds * n))
    out = {"diff": float(mean), "users": int(n), "seeds": int(n_seeds)}
    if se == 0:  # every cell equal: no noise to test against
        return {**out, "low": float(mean), "high": float(mean), "p": 1.0 if mean == 0 else 0.0,
                "significant": bool(mean != 0)}
    df = combined ** 2 / (ms_seed ** 2 / (n_seeds - 1) + ms_user ** 2 / (n - 1)
                          + ms_resid ** 2 / ((n_seeds - 1) * (n - 1)))
    half = stats.t.ppf(1 - ALPHA / 2, df) * se
    p = float(2 * stats.t.sf(abs(mean) / se, df))
    return {**out, "low": float(mean - half), "high": float(mean + half), "p": p, "significant": bool(p < ALPHA)}


CORRECTIONS = ("holm", "bh")


def adjust(p: np.ndarray, method: str = "holm") -> np.ndarray:
    """p-values adjusted over one family of tests: Holm's step-down (the chance of any false positive
    stays below alpha) or Benjamini-Hochberg (the expected share of false positives among the
    significant ones stays below alpha)."""
    p = np.asarray(p, dtype=np.float64)
    if method not in CORRECTIONS:
        raise InputError(f"correction must be one of {', '.join(CORRECTIONS)}, not {method!r}")
    if p.size == 0:
        return p
    if method == "bh":
        return stats.false_discovery_control(p, method="bh")
    order = np.argsort(p, kind="stable")
    scaled = np.maximum.accumulate(np.minimum(1.0, (p.size - np.arange(p.size)) * p[order]))
    out = np.empty_like(p)
    out[order] = scaled
    return out
