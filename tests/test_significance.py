"""The paired test behind every comparison of the report, against hand-computed values."""
import numpy as np
import pytest

from eval.significance import paired_test, per_user, seeds_test


def test_per_user_metrics_from_ranks():
    m = per_user(np.array([0, 1, 9, 10]))
    assert m["NDCG@10"] == pytest.approx([1.0, 1 / np.log2(3), 1 / np.log2(11), 0.0])
    assert m["MRR"] == pytest.approx([1.0, 0.5, 0.1, 1 / 11])


def test_hand_computed_example():
    # d = a - b = [1, 1, 1, 0]: mean 0.75. Sign flips reach |mean| >= 0.75 only when the three ones
    # share a sign: 2 of the 8 sign patterns of the three non-zero users, so p = 0.25.
    a, b = np.array([1.0, 1.0, 1.0, 0.0]), np.zeros(4)
    t = paired_test(a, b, resamples=20000, seed=1)
    assert t["diff"] == 0.75 and t["users"] == 4
    assert t["p"] == pytest.approx(0.25, abs=0.01) and not t["significant"]
    assert 0.25 <= t["low"] <= t["diff"] <= t["high"] <= 1.0  # resampled means lie in {0, .25, .5, .75, 1}


def test_a_consistent_difference_is_significant_and_no_difference_is_not():
    rng = np.random.default_rng(0)
    b = rng.random(500)
    better = paired_test(b + 0.05 + 0.01 * rng.standard_normal(500), b)
    assert better["significant"] and better["p"] < 0.01 and 0.04 < better["low"] < better["high"] < 0.06
    same = paired_test(b, b.copy())
    assert same["diff"] == 0.0 and same["p"] == 1.0 and not same["significant"]
    noise = paired_test(b + 0.1 * rng.standard_normal(500), b)
    assert noise["low"] < 0 < noise["high"]


def test_seeded_and_empty():
    a, b = np.random.default_rng(1).random((2, 50))
    assert paired_test(a, b, seed=3) == paired_test(a, b, seed=3)
    assert paired_test(np.array([]), np.array([]))["users"] == 0


def test_seeds_test_counts_training_noise():
    # two seeds, one user, d = [1, 0]: resampled seed pairs average 0 (1/4), 0.5 (1/2) or 1 (1/4), so
    # the two-sided p is 2 * P(mean <= 0) = 0.5
    t = seeds_test(np.array([[1.0], [0.0]]), np.zeros((2, 1)), resamples=20000, seed=1)
    assert t["diff"] == 0.5 and t["seeds"] == 2 and t["low"] == 0.0 and t["high"] == 1.0
    assert t["p"] == pytest.approx(0.5, abs=0.02)
    # every user gains in the seed mean, but the seeds disagree: only the per-user test is fooled
    rng = np.random.default_rng(0)
    b = rng.random((5, 400))
    a = b + np.array([0.05, -0.03, 0.05, -0.03, 0.04])[:, None] + 0.001 * rng.standard_normal((5, 400))
    assert paired_test(a.mean(0), b.mean(0))["p"] < 0.01
    assert not seeds_test(a, b)["significant"]
    assert seeds_test(b + 0.05, b)["p"] < 0.01 and seeds_test(b, b)["p"] == 1.0

