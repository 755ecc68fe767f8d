"""Metrics against an independent formulation, the random floor, and the evaluation protocol."""
import math

import numpy as np
import pytest
import torch

from eval.dataset import prepare_dataset
from eval.evaluate import evaluate, rank_users
from eval.metrics import from_ranks, random_floor, ranks
from eval.preprocess import PrepareConfig


def reference(scores_row, valid_row, k):
    """Independent: sort valid candidates by score, ties placing the truth last; read HR/NDCG/RR."""
    items = [(s, j) for j, (s, v) in enumerate(zip(scores_row, valid_row)) if v]
    order = sorted(items, key=lambda x: (-x[0], 0 if x[1] != 0 else 1))
    pos = [j for _, j in order].index(0)
    return float(pos < k), (1 / math.log2(pos + 2) if pos < k else 0.0), 1 / (pos + 1)


def test_metrics_match_reference_with_ties_and_padding():
    rng = np.random.default_rng(0)
    scores = torch.tensor(rng.integers(0, 6, size=(200, 30)).astype(np.float32))  # many ties
    valid = torch.tensor(rng.random((200, 30)) > 0.2)
    valid[:, 0] = True
    got = from_ranks(ranks(scores, valid).numpy())
    for k in (1, 5, 10, 20):
        ref = np.mean([reference(s.tolist(), v.tolist(), k)[0] for s, v in zip(scores, valid)])
        assert got[f"HR@{k}"] == pytest.approx(ref)
    for k in (5, 10, 20):
        ref = np.mean([reference(s.tolist(), v.tolist(), k)[1] for s, v in zip(scores, valid)])
        assert got[f"NDCG@{k}"] == pytest.approx(ref)
    assert got["MRR"] == pytest.approx(np.mean([reference(s.tolist(), v.tolist(), 1)[2] for s, v in zip(scores, valid)]))


def test_all_equal_scores_rank_the_truth_last():
    r = ranks(torch.zeros(1, 101), torch.ones(1, 101, dtype=torch.bool))
    assert r.item() == 100 and from_ranks(r.numpy())["HR@20"] == 0.0


def test_random_floor_is_the_average_over_uniform_ranks():
    n = np.array([101, 101, 50, 7])
    floor = random_floor(n)
    exact = {key: np.mean([from_ranks(np.arange(m))[key] for m in n]) for key in floor}
    for key in floor:
        assert floor[key] == pytest.approx(exact[key])


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
    r, n, top = rank_users(model, ds, "test", "full")
    assert (n == ds.num_items - np.array([len(set(ds.history(u, "test"))) for u in range(ds.num_users)])).all()
    for u in range(ds.num_users):
        shown = top[u][top[u] > 0]
        assert len(shown) == min(20, n[u]) and not set(shown) & set(ds.history(u, "test"))
