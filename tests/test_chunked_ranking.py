"""Full ranking in blocks of items equals ranking every item at once (the code before chunking, kept
here as the reference), whatever the block size; sharded over processes it equals one process."""
import numpy as np
import pytest
import torch

from tests.conftest import write_atomic
from eval.dataset import load_dataset, pad_left, prepare_dataset
from eval.evaluate import default_chunk, metrics_of, rank_users
from eval.metrics import nonfinite_rows, ranks
from eval.preprocess import PrepareConfig
from eval.scoring import DotScorer

ITEMS = 500


@pytest.fixture
def ds(tmp_path):
    """60 users with 6 to 40 interactions among 500 items (repeats allowed)."""
    rng = np.random.default_rng(1)
    rows = [(f"u{u}", f"i{rng.integers(0, ITEMS)}", 5, 1000 + t)
            for u in range(60) for t in range(rng.integers(6, 41))]
    rows += [(f"u{i % 60}", f"i{i}", 5, 500) for i in range(ITEMS)]  # every item seen
    return prepare_dataset(PrepareConfig(source=str(write_atomic(tmp_path / "src", "many", rows)), rating_gt=None,
                                         user_core=1, item_core=1, negatives=[100]), tmp_path / "run")


def unchunked(model, ds, split="test", protocol="full", batch_size=256, max_len=200):
    """`eval.evaluate.rank_users` before chunking (full ranking: all items' scores at once)."""
    users = ds.eval_users(split)
    targets = ds.target(split)
    out_r, out_n, out_top, out_bad = [], [], [], []
    for start in range(0, len(users), batch_size):
        u = users[start:start + batch_size]
        hist = [ds.history(int(x), split) for x in u]
        valid = torch.ones(len(u), ds.num_items + 1, dtype=torch.bool)
        valid[:, 0] = False
        for i, h in enumerate(hist):
            valid[i, torch.as_tensor(h, dtype=torch.long)] = False
        valid[torch.arange(len(u)), torch.as_tensor(targets[u])] = True
        scores = model.score(torch.as_tensor(u), pad_left(hist, max_len), None).float()
        t = torch.as_tensor(targets[u])
        rows = torch.arange(len(u))
        truth = scores[rows, t].clone()
        valid[rows, t] = False
        scores = torch.cat([truth[:, None], scores], dim=1)
        valid = torch.cat([torch.ones(len(u), 1, dtype=torch.bool), valid], dim=1)
        ids = torch.cat([t[:, None], torch.arange(ds.num_items + 1).expand(len(u), -1)], dim=1)
        out_r.append(ranks(scores, valid, u).numpy())
        out_n.append(valid.sum(dim=1).numpy())
        bad = nonfinite_rows(scores, valid)
        out_bad.append(bad.numpy())
        if bad.any():
            scores = scores.nan_to_num(nan=float("-inf"), posinf=float("-inf"))
        masked = scores.masked_fill(~valid, float("-inf"))
        best = masked.topk(min(20, masked.shape[1]), dim=1)
        out_top.append(torch.gather(ids, 1, best.indices).masked_fill(best.values == float("-inf"), 0).numpy())
    return [np.concatenate(x) for x in (out_r, out_n, out_top, out_bad)]


def expected_top(table: np.ndarray, ds, split="test") -> np.ndarray:
    """Independent: each user's 20 best finite-scored unseen items (the truth always allowed), higher
    score first, the smaller item id first among equal scores; 0 pads."""
    out = np.zeros((len(ds.eval_users(split)), 20), dtype=np.int64)
    for row, u in enumerate(ds.eval_users(split)):
        t = ds.target(split)[u]
        allowed = [i for i in range(1, ds.num_items + 1)
                   if (i == t or i not in set(ds.history(u, split))) and np.isfinite(table[u, i])]
        best = sorted(allowed, key=lambda i: (-table[u, i], i))[:20]
        out[row, :len(best)] = best
    return out


class Table:
    """Fixed scores [users, num_items + 1]: any model that is not a dot product."""

    def __init__(self, table):
        self.table = torch.as_tensor(table)

    def score(self, users, histories, candidates):
        full = self.table[users]
        return full if candidates is None else torch.gather(full, 1, candidates)


class Dot(DotScorer):
    def __init__(self, users, items):
        self.users, self.items = torch.as_tensor(users), torch.as_tensor(items)

    def user_vectors(self, users, histories):
        return self.users[users]

    def item_vectors(self):
        return self.items


def awkward_table(ds, seed=0):
    """Scores with many ties (a few values), -0.0 beside 0.0, NaN, +inf and -inf for half the users (on
    true items too), and some users whose every score is NaN."""
    rng = np.random.default_rng(seed)
    table = rng.integers(-2, 3, size=(ds.num_users, ds.num_items + 1)).astype(np.float32)
    table[table == 0] = np.where(rng.random((table == 0).sum()) < 0.5, 0.0, -0.0)
    odd = rng.random(table.shape)
    odd[::2] = 1  # half the users' scores are all finite
    table[odd < 0.01] = np.nan
    table[(odd >= 0.01) & (odd < 0.02)] = np.inf
    table[(odd >= 0.02) & (odd < 0.03)] = -np.inf
    t = ds.target("test")
    for u, v in zip(range(1, ds.num_users, 7), [np.nan, np.inf, -np.inf, 2.0, -2.0, 0.0, -0.0, 1.0, 7.0]):
        table[u, t[u]] = v
    table[::13] = np.nan
    return table


def assert_same(new, old, table=None, ds=None):
    assert np.array_equal(new.ranks, old[0]) and new.ranks.dtype == old[0].dtype
    assert np.array_equal(new.candidates, old[1])
    assert np.array_equal(new.nonfinite, old[3])
    assert new.top.shape == old[2].shape
    assert metrics_of(new) == metrics_of(type(new)(*old, new.users))
    if table is not None:  # the same scores recommended (which of equal scores: the smaller id first)
        score = np.where(new.top > 0, np.take_along_axis(table[new.users], new.top, 1), np.nan)
        old_score = np.where(old[2] > 0, np.take_along_axis(table[new.users], old[2], 1), np.nan)
        assert np.array_equal(score, old_score, equal_nan=True)
        assert np.array_equal(new.top, expected_top(table, ds))


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 499, 500, 501, 4096])
def test_blocks_of_items_rank_exactly_as_all_items_at_once(ds, chunk):
    table = awkward_table(ds)
    old = unchunked(Table(table), ds, batch_size=16)
    new = rank_users(Table(table), ds, "test", "full", batch_size=16, chunk_size=chunk)
    assert old[3].any() and not old[3].all() and (old[0] > 0).any()  # the awkward cases are there
    assert_same(new, old, table, ds)


@pytest.mark.parametrize("chunk", [3, 50, 333, 501])
def test_a_dot_product_model_ranks_exactly_as_before(ds, chunk):
    rng = np.random.default_rng(2)
    # small integers: exact products, many ties, and an item whose vector is NaN or infinite
    users = rng.integers(-2, 3, size=(ds.num_users, 8)).astype(np.float32)
    items = rng.integers(-2, 3, size=(ds.num_items + 1, 8)).astype(np.float32)
    items[5], items[17, 3] = np.nan, np.inf
    model = Dot(users, items)
    table = users @ items.T
    old = unchunked(model, ds, batch_size=32)
    new = rank_users(model, ds, "test", "full", batch_size=32, chunk_size=chunk)
    assert (old[1] > 0).all() and old[3].any()
    assert_same(new, old, table, ds)


@pytest.mark.parametrize("chunk", [64, 100, 257])
def test_float_vectors_rank_as_before(ds, chunk):
    """Real-valued vectors: every block is a product of one shape ([batch, chunk]), rounded as the
    whole product is by this torch's BLAS; the ranks then equal the unchunked ones exactly."""
    g = torch.Generator().manual_seed(3)
    model = Dot(torch.randn(ds.num_users, 32, generator=g), torch.randn(ds.num_items + 1, 32, generator=g))
    old = unchunked(model, ds, batch_size=16)
    new = rank_users(model, ds, "test", "full", batch_size=16, chunk_size=chunk)
    assert_same(new, old)
    assert np.array_equal(new.top, old[2])  # no ties among real-valued scores


def test_a_truth_scored_differently_in_its_block_is_ranked_by_the_block(ds, monkeypatch):
    """Should the [B, B] product of the true items round otherwise than a block, the block's score
    decides (the blocks are counted again), as when every item is scored at once."""
    import eval.scoring

    table = awkward_table(ds, seed=4)

    def lookup(users, items, candidates):  # user vectors: the user id; item vectors: the table's columns
        out = items.T[users[:, 0].long()]
        return out + 0.25 if len(items) == len(users) else out  # the truth's [B, B] product: off a little

    monkeypatch.setattr(eval.scoring, "dot_scores", lookup)
    model = Dot(torch.arange(ds.num_users, dtype=torch.float32)[:, None], torch.as_tensor(table.T.copy()))
    new = rank_users(model, ds, "test", "full", batch_size=17, chunk_size=100)
    assert_same(new, unchunked(Table(table), ds, batch_size=17), table, ds)


def test_fixed_candidates_unchanged(ds):
    table = awkward_table(ds, seed=5)
    new = rank_users(Table(table), ds, "test", "100", batch_size=16)
    cand = torch.as_tensor(np.array(ds.candidates("test", 100)))  # a writable copy of the memory-mapped file
    scores = torch.gather(torch.as_tensor(table)[ds.eval_users("test")], 1, cand)
    valid = cand > 0
    assert np.array_equal(new.ranks, ranks(scores, valid, ds.eval_users("test")).numpy())
    assert np.array_equal(new.nonfinite, nonfinite_rows(scores, valid).numpy())


def test_default_chunk_bounds_the_scores_held():
    assert default_chunk(256) * 256 * 4 <= 64 * 2 ** 20 and default_chunk(256) == 65536
    assert default_chunk(10 ** 6) == 1024


def _models(table: np.ndarray, ds) -> dict:
    """A table of scores (no dot product: the whole [users, items] scores sliced) and a tiny
    dot-product model (scored a block of items at a time)."""
    g = torch.Generator().manual_seed(7)
    return {"table": Table(table), "dot": Dot(torch.randn(ds.num_users, 8, generator=g),
                                              torch.randn(ds.num_items + 1, 8, generator=g))}


def _rankings(table, ds, users) -> dict:
    return {(name, protocol): rank_users(model, ds, "test", protocol, users=users, batch_size=7, chunk_size=64)
            for name, model in _models(table, ds).items() for protocol in ("full", "100")}


def _shard_worker(rank, world, init, path, table, users, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(_rankings(np.load(table), load_dataset(path), users), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("some", [False, True])
def test_two_processes_rank_as_one(ds, tmp_path, some):
    """Each of 2 gloo processes ranks half of the users; both return the whole ranking of one process."""
    table = awkward_table(ds, seed=6)
    np.save(tmp_path / "table.npy", table)  # small arguments: a child that dies at start cannot block the spawn
    users = ds.eval_users("test")[:1] if some else None  # one user: the second process ranks nobody
    torch.multiprocessing.spawn(_shard_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(ds.path),
                                                     str(tmp_path / "table.npy"), users, str(tmp_path / "out")), nprocs=2)
    one = _rankings(table, ds, users)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        assert got.keys() == one.keys()
        for key, ranking in one.items():
            for a, b in zip(got[key], ranking):
                assert np.array_equal(a, b) and a.dtype == b.dtype and a.shape == b.shape, key
            assert metrics_of(got[key]) == metrics_of(ranking)
