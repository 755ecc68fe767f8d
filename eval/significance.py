"""Paired comparisons of two models over the same users: is a difference more than noise?

On ml-100k two SASRecs trained with different seeds differ by up to +-0.012 NDCG@10, so a report
that only prints two means cannot rank models. For the per-user values a (model A) and b (model B)
of the same users, `paired_test` is the paired t-test over users: the mean difference, its 95 %
interval and a two-sided p-value. It holds each model's training fixed (one run each); `seeds_test`
adds the noise of training over seeds. A report makes many such tests: `adjust` corrects their
p-values for multiplicity before anything is called significant, which needs p-values finer than a
resampling test's 1 / (resamples + 1): over a family of 200 tests Holm asks the smallest for p < 0.00025.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from .errors import InputError

ALPHA = 0.05


def _t_result(mean: float, se: float, df: float, out: dict) -> dict[str, float | bool]:
    """The interval, two-sided p-value and verdict of a t statistic (se 0: no noise to test against)."""
    if se == 0 or not np.isfinite(df):
        return {**out, "low": mean, "high": mean, "p": 1.0 if mean == 0 else 0.0, "significant": bool(mean != 0)}
    half = stats.t.ppf(1 - ALPHA / 2, df) * se
    p = float(2 * stats.t.sf(abs(mean) / se, df))
    return {**out, "low": float(mean - half), "high": float(mean + half), "p": p, "significant": bool(p < ALPHA)}


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, float | bool]:
    """Paired t-test of a - b over users: mean, 95 % interval, two-sided p-value, whether p < 0.05."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    out = {"diff": float(d.mean()) if n else 0.0, "users": int(n)}
    if n < 2:
        return {**out, "low": out["diff"], "high": out["diff"], "p": 1.0, "significant": False}
    return _t_result(out["diff"], float(d.std(ddof=1) / np.sqrt(n)), n - 1, out)


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
    se = float(np.sqrt(combined / (n_seeds * n)))
    out = {"diff": float(mean), "users": int(n), "seeds": int(n_seeds)}
    if se == 0:  # every cell equal: no noise to test against
        return _t_result(float(mean), se, 1.0, out)
    df = combined ** 2 / (ms_seed ** 2 / (n_seeds - 1) + ms_user ** 2 / (n - 1)
                          + ms_resid ** 2 / ((n_seeds - 1) * (n - 1)))
    return _t_result(float(mean), se, df, out)


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
