"""The paired test behind every comparison of the report, against hand-computed values."""
import numpy as np
import pytest

from eval.errors import InputError
from eval.metrics import per_user
from eval.significance import adjust, paired_test, seeds_test


def test_per_user_metrics_from_ranks():
    m = per_user(np.array([0, 1, 9, 10]), np.full(4, 20), tested=True)
    assert list(m) == ["NDCG@10", "MRR"]
    assert m["NDCG@10"] == pytest.approx([1.0, 1 / np.log2(3), 1 / np.log2(11), 0.0])
    assert m["MRR"] == pytest.approx([1.0, 0.5, 0.1, 1 / 11])


def test_hand_computed_example():
    # d = a - b = [1, 1, 1, 0]: mean 0.75, sample sd 0.5, standard error 0.25, t = 3 with 3 degrees of
    # freedom: two-sided p = 0.0577; the interval is 0.75 +- t(0.975, 3) * 0.25 = 0.75 +- 0.7956
    a, b = np.array([1.0, 1.0, 1.0, 0.0]), np.zeros(4)
    t = paired_test(a, b)
    assert t["diff"] == 0.75 and t["users"] == 4
    assert t["p"] == pytest.approx(0.0577, abs=1e-4) and not t["significant"]
    assert t["low"] == pytest.approx(0.75 - 0.7956, abs=1e-4) and t["high"] == pytest.approx(0.75 + 0.7956, abs=1e-4)
    assert paired_test(np.ones(3), np.zeros(3))["p"] == 0.0   # every user gains the same: no noise at all


def test_a_consistent_difference_is_significant_and_no_difference_is_not():
    rng = np.random.default_rng(0)
    b = rng.random(500)
    better = paired_test(b + 0.05 + 0.01 * rng.standard_normal(500), b)
    assert better["significant"] and better["p"] < 0.01 and 0.04 < better["low"] < better["high"] < 0.06
    same = paired_test(b, b.copy())
    assert same["diff"] == 0.0 and same["p"] == 1.0 and not same["significant"]
    noise = paired_test(b + 0.1 * rng.standard_normal(500), b)
    assert noise["low"] < 0 < noise["high"]


def test_too_few_users_to_test():
    assert paired_test(np.array([]), np.array([]))["users"] == 0
    assert paired_test(np.array([1.0]), np.array([0.0]))["p"] == 1.0


def test_p_values_are_fine_enough_for_a_family_of_hundreds():
    rng = np.random.default_rng(0)
    b = rng.random(900)
    t = paired_test(b + 0.02 + 0.05 * rng.standard_normal(900), b)
    assert 0 < t["p"] < 0.05 / 400 and adjust(np.array([t["p"]] + [0.5] * 399), "holm")[0] < 0.05


def test_seeds_test_hand_computed_example():
    # d = [[1, 1], [3, 3]]: seed means 1 and 3, no user or residual effect; MS_seed = 2 * var([1, 3]) = 4,
    # so the variance of the mean is 4 / (2 * 2) = 1 with 1 degree of freedom (Cauchy): t = 2 gives
    # p = 1 - 2 atan(2) / pi, and the interval is 2 +- t(0.975, 1) = 2 +- 12.706
    t = seeds_test(np.array([[1.0, 1.0], [3.0, 3.0]]), np.zeros((2, 2)))
    assert t["diff"] == 2.0 and t["seeds"] == 2 and t["users"] == 2
    assert t["p"] == pytest.approx(1 - 2 * np.arctan(2) / np.pi) and not t["significant"]
    assert t["low"] == pytest.approx(2 - 12.7062, abs=1e-3) and t["high"] == pytest.approx(2 + 12.7062, abs=1e-3)
    assert seeds_test(np.ones((3, 4)), np.ones((3, 4)))["p"] == 1.0
    with pytest.raises(InputError, match="at least 2 seeds"):
        seeds_test(np.ones((1, 5)), np.zeros((1, 5)))
    with pytest.raises(InputError, match="one shape"):
        seeds_test(np.ones((2, 5)), np.zeros(5))


def test_seeds_test_counts_training_noise_and_covers_at_its_level():
    # every user gains in the seed mean, but the seeds disagree: only the per-user test is fooled
    rng = np.random.default_rng(0)
    b = rng.random((5, 400))
    a = b + np.array([0.05, -0.03, 0.05, -0.03, 0.04])[:, None] + 0.001 * rng.standard_normal((5, 400))
    assert paired_test(a.mean(0), b.mean(0))["p"] < 0.01
    assert not seeds_test(a, b)["significant"]
    assert seeds_test(b + 0.05 + 0.01 * rng.standard_normal((5, 400)), b)["p"] < 0.01
    # no true difference, with seed, user and residual noise: the 95 % interval holds 0 about 95 % of the time
    covered = []
    for _ in range(300):
        d = 0.01 * rng.standard_normal((5, 1)) + 0.05 * rng.standard_normal((1, 400)) \
            + 0.1 * rng.standard_normal((5, 400))
        t = seeds_test(d, np.zeros_like(d))
        covered.append(t["low"] <= 0 <= t["high"])
    assert 0.9 <= np.mean(covered) <= 0.99


def test_adjusted_p_values_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04, kept monotone
    assert adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Benjamini-Hochberg: p * 4 / rank = 0.02, 0.02, 0.04, 0.04, the smallest from each rank upwards
    assert adjust(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert adjust(np.array([]), "holm").size == 0 and adjust(np.array([0.2]), "holm") == pytest.approx([0.2])
    with pytest.raises(InputError, match="correction must be one of holm, bh"):
        adjust(p, "bonferroni")
