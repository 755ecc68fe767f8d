"""Metrics against an independent formulation, the random floor, and the evaluation protocol."""
import math

import numpy as np
import pytest
import torch

from eval.dataset import prepare_dataset
from eval.evaluate import evaluate, rank_users
from eval.metrics import METRICS, from_ranks, random_floor, ranks, register_metric
from eval.preprocess import PrepareConfig


def reference(scores_row, valid_row, k):
    """Independent: expected HR@k, NDCG@k and RR when the truth takes each place among the candidates
    tied with it with equal chance (valid candidates sorted by score)."""
    truth = scores_row[0]
    above = sum(1 for s, v in zip(scores_row[1:], valid_row[1:]) if v and s > truth)
    tied = sum(1 for s, v in zip(scores_row[1:], valid_row[1:]) if v and s == truth)
    places = range(above, above + tied + 1)
    return (np.mean([p < k for p in places]), np.mean([1 / math.log2(p + 2) if p < k else 0.0 for p in places]),
            np.mean([1 / (p + 1) for p in places]))


def test_ties_are_broken_uniformly_at_random_and_the_same_way_every_time():
    rng = np.random.default_rng(0)
    scores = torch.tensor(rng.integers(0, 6, size=(20, 30)).astype(np.float32))  # many ties
    valid = torch.tensor(rng.random((20, 30)) > 0.2)
    valid[:, 0] = True
    draws = 4000  # each row ranked under 4000 user ids: its metrics average over the tie-breaks
    rows = scores.repeat_interleave(draws, dim=0), valid.repeat_interleave(draws, dim=0)
    r = ranks(*rows, keys=np.arange(len(rows[0]))).numpy().reshape(20, draws)
    assert (ranks(*rows, keys=np.arange(len(rows[0]))).numpy().reshape(20, draws) == r).all()  # seeded
    for i, (s, v) in enumerate(zip(scores.tolist(), valid.tolist())):
        for k in (1, 5, 10):
            hr, ndcg, rr = reference(s, v, k)
            got = from_ranks(r[i], 30)
            assert got[f"HR@{k}"] == pytest.approx(hr, abs=0.03)
            assert k == 1 or got[f"NDCG@{k}"] == pytest.approx(ndcg, abs=0.03)
        assert from_ranks(r[i], 30)["MRR"] == pytest.approx(rr, abs=0.03)


def test_a_constant_scorer_gets_the_random_floor():
    users = 20000
    r = ranks(torch.zeros(users, 101), torch.ones(users, 101, dtype=torch.bool), keys=np.arange(users))
    got, floor = from_ranks(r.numpy(), 101), random_floor(np.full(users, 101))
    for key in floor:  # ~3 standard errors of a mean over 20,000 users
        assert got[key] == pytest.approx(floor[key], abs=0.006), key


def test_a_nan_or_infinite_score_never_helps_the_model():
    valid = torch.ones(4, 101, dtype=torch.bool)
    scores = torch.zeros(4, 101)
    scores[:, 0] = 1.0                      # the truth first in every row ...
    scores[0] = float("nan")                # ... unless the model diverged: every score NaN
    scores[1, 0] = float("nan")             # a NaN true score
    scores[2, 0] = float("inf")             # an infinite true score
    scores[3, 7] = float("nan")             # a NaN competitor ranks above the truth
    assert ranks(scores, valid).tolist() == [100, 100, 100, 1]
    m = from_ranks(ranks(scores[:3], valid[:3]).numpy(), 101)
    assert all(m[k] == 0.0 for k in m if k != "MRR") and m["MRR"] == pytest.approx(1 / 101)


def test_random_floor_by_hand():
    n = np.array([1, 2, 2, 10])  # a user with one candidate always ranks it first
    floor = random_floor(n)
    assert floor["HR@1"] == pytest.approx(np.mean([1, 1 / 2, 1 / 2, 1 / 10]))
    assert floor["MRR"] == pytest.approx(np.mean([1, 3 / 4, 3 / 4, sum(1 / k for k in range(1, 11)) / 10]))
    assert floor["NDCG@5"] == pytest.approx(np.mean([1, (1 + 1 / np.log2(3)) / 2, (1 + 1 / np.log2(3)) / 2,
                                                     sum(1 / np.log2(k + 2) for k in range(5)) / 10]))


def test_a_metric_registered_anywhere_is_computed_with_its_floor():
    @register_metric("AUC")
    def auc(r, n):  # the share of the other candidates ranked below the truth
        return np.where(n > 1, 1 - r / np.maximum(n - 1, 1), 1.0)

    try:
        assert from_ranks(np.array([0, 9]), np.array([10, 10]))["AUC"] == pytest.approx(0.5)
        assert random_floor(np.array([10, 101]))["AUC"] == pytest.approx(0.5)
    finally:
        del METRICS["AUC"]


class Oracle:
    """Scores items by a fixed per-user preference; used to cross-check protocols."""

    def __init__(self, table):
        self.table = table

    def score(self, users, histories, candidates):
        full = self.table[users]
        return full if candidates is None else torch.gather(full, 1, candidates)


def test_full_ranking_equals_candidates_of_every_unseen_item(synthetic, tmp_path):
    ds = prepare_dataset(PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1,
                                       negatives=[100]), tmp_path / "run")  # writes RUN/data
    table = torch.randn(ds.num_users, ds.num_items + 1, generator=torch.Generator().manual_seed(0))
    model = Oracle(table)
    full = evaluate(model, ds, "test", "full")
    cand = evaluate(model, ds, "test", "100")  # 100 > catalog: every never-seen item is a candidate
    # full ranking masks the history (all but the test item), candidates mask every seen item
    for key in ("HR@10", "NDCG@10", "MRR", "random_MRR"):
        assert full[key] == pytest.approx(cand[key])
    _, n, top, nonfinite, _ = rank_users(model, ds, "test", "full")
    assert not nonfinite.any() and full["nonfinite_users"] == 0
    assert (n == ds.num_items - np.array([len(set(ds.history(u, "test"))) for u in range(ds.num_users)])).all()
    for u in range(ds.num_users):
        shown = top[u][top[u] > 0]
        assert len(shown) == min(20, n[u]) and not set(shown) & set(ds.history(u, "test"))


def test_a_diverged_model_gets_nothing_and_is_counted(synthetic, tmp_path):
    ds = prepare_dataset(PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1,
                                       negatives=[100]), tmp_path / "run")
    table = torch.randn(ds.num_users, ds.num_items + 1, generator=torch.Generator().manual_seed(0))
    table[::2] = float("nan")  # every other user's scores diverged
    for protocol in ("100", "full"):
        ranking = rank_users(Oracle(table), ds, "test", protocol)
        bad = np.arange(ds.num_users) % 2 == 0
        assert (ranking.nonfinite == bad).all()
        assert (ranking.ranks[bad] == ranking.candidates[bad] - 1).all()  # the truth last
        assert (ranking.top[bad] == 0).all()  # nothing recommended from NaN scores
        assert evaluate(Oracle(table), ds, "test", protocol)["nonfinite_users"] == bad.sum()
