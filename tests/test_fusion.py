"""Fusion: fused models with missing vectors, groups, popularity metrics, the report, and presets."""
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import eval.scoring
from eval.config import parse_override
from eval.dataset import load_dataset, prepare_dataset
from eval.errors import InputError
from eval.evaluate import evaluate, rank_users
from eval.io import manifest, read_json, write_json
from eval.popularity import gini, popularity_metrics
from eval.metrics import per_user
from eval.significance import adjust, seeds_test
from eval.preprocess import PrepareConfig
from eval.stage import run_stage
from fusion.groups import item_groups, item_popularity_groups, user_length_groups
from eval.registry import load_model
from fusion.model import (FusedConfig, HybridConfig, HybridFusion, Shape, TextMatching, TextMatchingConfig,
                          vectors_to_tensors)
from fusion.pipeline import build_stages
from fusion.report import evaluate_run
from fusion.train import FusionStage
from fusion.vectors import TextVectors, load_vectors
from slim.encode import CUTS_TABLE, ITEMS_TABLE, USERS_TABLE
from slmrec.sasrec import SASRec, SASRecConfig
from slmrec.trainer import TrainConfig


@pytest.fixture
def run(synthetic, tmp_path):
    """A prepared run with two small SASRec models (different seeds), each with its manifest."""
    prepare_dataset(PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1,
                                  negatives=[10]), tmp_path)
    ds = load_dataset(tmp_path / "data")
    for name, seed in (("sasrec", 0), ("other", 1)):
        torch.manual_seed(seed)
        SASRec(SASRecConfig(num_items=ds.num_items, hidden=16, layers=1, max_len=10)).save_pretrained(tmp_path / name)
        write_json(tmp_path / name / "manifest.json", manifest("pretrain", inputs={}, config={}, seed=seed,
                                                               counts={"parameters": 1, "train_seconds": 0.0}))
    return tmp_path


def vectors(ds, users, items, dim=8, seed=0) -> TextVectors:
    rng = np.random.default_rng(seed)
    return TextVectors(np.array(users), rng.normal(size=(len(users), dim)).astype(np.float32),
                       np.array(items), rng.normal(size=(len(items), dim)).astype(np.float32))


def write_vectors(run, v: TextVectors) -> None:
    """Hand-made RUN/vectors: the LanceDB tables the vectors stage writes (id, vector; and id, prefix,
    vector for the rationales at earlier cut points when `v` has them)."""
    import lancedb

    db = lancedb.connect(str(run / "vectors"))
    tables = [(USERS_TABLE, {"id": v.user_ids}, v.user_vectors), (ITEMS_TABLE, {"id": v.item_ids}, v.item_vectors)]
    if len(v.cut_ids):
        tables.append((CUTS_TABLE, {"id": v.cut_ids, "prefix": v.cut_prefixes}, v.cut_vectors))
    for table, keys, vecs in tables:
        vecs = np.asarray(vecs, dtype=np.float32)
        db.create_table(table, mode="overwrite", data=pa.table({
            **{k: pa.array(np.asarray(a, dtype=np.int64)) for k, a in keys.items()},
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), vecs.shape[1])}))
    back = load_vectors(run / "vectors")
    for name in ("user_ids", "user_vectors", "item_ids", "item_vectors", "cut_ids", "cut_prefixes"):
        assert np.array_equal(getattr(back, name), getattr(v, name)), name
    assert np.array_equal(back.cut_vectors.reshape(-1, v.dim), v.cut_vectors.reshape(-1, v.dim))


def with_cuts(ds, v: TextVectors, cuts: int = 3, seed: int = 1) -> TextVectors:
    """`v` with a random rationale vector at each earlier cut point of every user (rationale_prefixes)."""
    pairs = [(u, p) for u in range(ds.num_users) for p in ds.rationale_prefixes(u, cuts)[:-1]]
    rng = np.random.default_rng(seed)
    return replace(v, cut_ids=np.array([u for u, _ in pairs]), cut_prefixes=np.array([p for _, p in pairs]),
                   cut_vectors=rng.normal(size=(len(pairs), v.dim)).astype(np.float32))


def train_fused(run, name: str, cfg: FusedConfig) -> dict:
    """Train RUN/fusion/NAME (the stage reads RUN/data, RUN/vectors and the backbone); its test metrics."""
    result = run_stage(FusionStage(run, cfg, folder=f"fusion/{name}"))
    assert result.status == "ran"
    return read_json(run / "fusion" / name / "metrics.json")


def test_groups_cover_every_user_once_in_length_order(run):
    ds = load_dataset(run / "data")
    groups = user_length_groups(ds)
    assert len(groups) == 5
    assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(ds.num_users))
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1
    lengths = np.array([len(s) for s in ds.train_sequences()])
    for a, b in zip(groups, groups[1:]):
        assert lengths[a].max() <= lengths[b].min()
    items = item_popularity_groups(ds)
    assert np.array_equal(np.sort(np.concatenate(list(items.values()))), np.arange(1, ds.num_items + 1))


def test_popularity_metrics_match_hand_computed_values():
    popularity = np.array([0, 4, 2, 1, 0])        # items 1..4 seen 4, 2, 1, 0 times in training
    top = np.array([[1, 2], [1, 3], [4, 0]])      # 3 users' top-2 lists; user 3 has only one item
    targets = np.array([2, 9, 4])                 # user 1 hits at rank 2, user 2 misses, user 3 hits at rank 1
    m = popularity_metrics(top, targets, popularity, num_users=4, tail_items=np.array([3, 4]), k=2)
    shown = [1, 2, 1, 3, 4]
    assert m["avg_popularity@2"] == pytest.approx(np.mean([4, 2, 4, 1, 0]))
    assert m["long_tail_share@2"] == pytest.approx(2 / 5)
    assert m["coverage@2"] == pytest.approx(4 / 4)
    exposure = np.array([2, 1, 1, 1])             # times items 1..4 are shown
    assert m["gini@2"] == pytest.approx(gini(exposure)) and gini(exposure) == pytest.approx(0.15)
    assert len(shown) == exposure.sum()
    disc = np.array([1.0, 1 / np.log2(3)])
    p2, p4 = 2 / 4, 1 / 4                         # p(i) = max(pop, 1) / users
    epc = ((disc[1] * (1 - p2)) + (disc[0] * (1 - p4))) / disc.sum() / 3
    efd = ((disc[1] * -np.log2(p2)) + (disc[0] * -np.log2(p4))) / disc.sum() / 3
    assert m["EPC@2"] == pytest.approx(epc) and m["EFD@2"] == pytest.approx(efd)
    assert gini(np.array([3, 3, 3])) == 0.0 and gini(np.array([0, 0, 9])) == pytest.approx(2 / 3)


@pytest.mark.parametrize("mode", ["hybrid", "text"])
def test_user_without_rationale_and_item_without_text_are_scored(run, mode):
    ds = load_dataset(run / "data")
    v = vectors(ds, users=range(1, ds.num_users), items=range(2, ds.num_items + 1))  # user 0 and item 1: none
    u_t, u_has = vectors_to_tensors(v.user_ids, v.user_vectors, ds.num_users, v.dim)
    i_t, i_has = vectors_to_tensors(v.item_ids, v.item_vectors, ds.num_items + 1, v.dim)
    backbone = SASRec.from_pretrained(run / "sasrec") if mode == "hybrid" else None
    shape = Shape(num_users=ds.num_users, num_items=ds.num_items, text_dim=v.dim, id_dim=16 if backbone else 0,
                  max_len=10)
    hybrid = HybridConfig(training="frozen", freeze_backbone=True, pop_gate=False, cold_ridge=0.0)
    kind, cfg = (HybridFusion, hybrid) if backbone else (TextMatching, TextMatchingConfig())
    model = kind(cfg, shape, u_t, u_has, i_t, i_has, backbone).eval()
    hist = torch.tensor([[0, 0, 3, 4], [0, 5, 6, 7]])
    before = model.score(torch.tensor([0, 1]), hist, None)
    assert torch.isfinite(before[:, 1:]).all()
    with torch.no_grad():
        model.missing_user += 1.0
    after = model.score(torch.tensor([0, 1]), hist, None)
    assert not torch.allclose(before[0], after[0])   # user 0 is scored through the learned missing vector
    assert torch.allclose(before[1], after[1])       # user 1 has its own rationale vector


def test_fused_training_and_report_use_identical_candidates(run, monkeypatch):
    ds = load_dataset(run / "data")
    v = vectors(ds, users=range(0, ds.num_users, 2), items=range(1, ds.num_items + 1))  # half the users lack one
    write_vectors(run, v)
    fast = TrainConfig(epochs=2, batch_size=16)
    metrics = train_fused(run, "hybrid", HybridConfig(backbone="sasrec", train=fast))
    assert metrics["full ranking"]["users"] == ds.num_users
    assert read_json(run / "fusion" / "hybrid" / "manifest.json")["counts"]["users_with_rationale"] == len(v.user_ids)
    train_fused(run, "text", TextMatchingConfig(hidden=8, train=fast))
    seen: list[tuple[str, torch.Tensor | None]] = []
    real = eval.scoring.dot_scores

    def recording(users, items, candidates):
        seen.append(candidates)
        return real(users, items, candidates)

    monkeypatch.setattr(eval.scoring, "dot_scores", recording)
    results = evaluate_run(run, run / "report")
    names = ["fusion/hybrid", "fusion/text", "other", "sasrec"]
    assert sorted(results["efficiency"]) == names
    assert sorted(results["selection"]) == names[:2]  # then each fused model on validation (the serving default)
    seen = seen[:-2]
    assert len(seen) % len(names) == 0 and seen, len(seen)
    calls = len(seen) // len(names)
    per_model = [seen[i * calls:(i + 1) * calls] for i in range(len(names))]
    for other in per_model[1:]:
        for a, b in zip(per_model[0], other):
            assert (a is None and b is None) or torch.equal(a, b)
    cands = np.load(run / "data" / "candidates_test_10.npy")  # truth in column 0, then the 10 negatives
    first = next(c for c in per_model[0] if c is not None)
    assert np.array_equal(first.numpy(), cands[:len(first)])
    for name in names:
        assert sum(g["users"] for g in results["user_groups"][name].values()) == ds.num_users
    for f in ("metrics.json", "report.md", "user_groups.png", "item_groups.png", "popularity.png"):
        assert (run / "report" / f).stat().st_size > 0
    assert "fusion/hybrid" in (run / "report" / "report.md").read_text()
    # each fused model is compared with its backbone (text matching with SASRec) over the same users
    assert sorted(results["comparisons"]) == ["fusion/hybrid vs sasrec", "fusion/text vs sasrec"]
    ranks = np.load(run / "report" / "ranks.npz")
    test = results["comparisons"]["fusion/hybrid vs sasrec"]["overall"]["MRR"]
    assert test["users"] == ds.num_users
    assert test["diff"] == pytest.approx(np.mean(1 / (ranks["fusion/hybrid"] + 1) - 1 / (ranks["sasrec"] + 1)))
    assert "| fusion/text vs sasrec | G1" in (run / "report" / "report.md").read_text()
    for group, users in item_groups(ds).items():   # where a group's targets rank, 1 = first
        if len(users):
            assert results["item_groups"]["sasrec"][group]["median rank"] == np.median(ranks["sasrec"][users]) + 1
    assert "median rank:" in (run / "report" / "report.md").read_text()


@pytest.mark.parametrize("training,frozen", [("joint", False), ("frozen", True)])
def test_same_seed_gives_the_same_fused_model_and_it_reloads(run, training, frozen):
    ds = load_dataset(run / "data")
    write_vectors(run, vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1)))
    for i, name in enumerate(("h", "h2")):
        torch.manual_seed(100 + i)  # whatever ran before in the process must not matter
        metrics = train_fused(run, name, HybridConfig(backbone="sasrec", training=training, freeze_backbone=frozen,
                                                      train=TrainConfig(epochs=2)))
    a = load_model(run / "fusion" / "h")
    b = load_model(run / "fusion" / "h2")
    assert a.every_position == (training == "joint") and a.config.pop_gate and a.config.cold_ridge == 0.1
    hist = torch.tensor([[0, 1, 2, 3]])
    assert torch.equal(a.score(torch.tensor([3]), hist, None), b.score(torch.tensor([3]), hist, None))
    assert evaluate(a, ds, "test", "full", max_len=10)["MRR"] == metrics["full ranking"]["MRR"]
    cfg = json.loads((run / "fusion" / "h" / "config.json").read_text())
    if frozen:
        assert cfg["backbone_path"] == "../../sasrec"   # the frozen backbone is referenced, not copied
    else:
        assert (run / "fusion" / "h" / "backbone" / "config.json").exists()


def test_seeds_repeat_training_and_differ(run):
    ds = load_dataset(run / "data")
    write_vectors(run, vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1)))
    train_fused(run, "s", HybridConfig(seeds=2, train=TrainConfig(epochs=3, lr=1e-2)))
    summary = read_json(run / "fusion" / "s" / "seeds.json")
    first, second = (r["full ranking"] for r in summary["runs"])
    assert first == read_json(run / "fusion" / "s" / "metrics.json")["full ranking"]  # seed 0 is the kept model
    assert first["MRR"] != second["MRR"]
    assert summary["mean"]["full ranking"]["MRR"] == pytest.approx((first["MRR"] + second["MRR"]) / 2)
    assert summary["std"]["full ranking"]["MRR"] == pytest.approx(abs(first["MRR"] - second["MRR"]) / 2 ** 0.5)
    groups = [k for k in summary["mean"] if k.startswith("full ranking, ")]   # every seed's sparsest users, tail, rare
    assert len(groups) == 3 and {"full ranking, tail", "full ranking, seen <= 5"} < set(groups)
    kept, tail = load_model(run / "fusion" / "s"), item_groups(ds)["tail"]
    alone = evaluate(kept, ds, "test", "full", max_len=kept.shape.max_len, users=tail)  # a group's: its users' alone
    assert summary["runs"][0]["full ranking, tail"] == {k: v for k, v in alone.items() if k != "users_per_s"}
    from fusion.report import find_models, seed_rows
    row = seed_rows(find_models(run), "full")["fusion/s"]
    assert row["seeds"] == "2" and "tail NDCG@10" in row and any(k.startswith("G1 (") for k in row)
    with pytest.raises(InputError, match="seeds must be at least 1"):
        run_stage(FusionStage(run, HybridConfig(seeds=0), folder="fusion/none"))
    seeded = np.load(run / "fusion" / "s" / "seed_ranks.npz")
    assert seeded["full"].shape == (2, ds.num_users) and seeded["10"].shape == (2, ds.num_users)
    assert np.array_equal(seeded["full"][0], rank_users(kept, ds, "test", "full", max_len=kept.shape.max_len).ranks)

    # its no-text twin with 2 seeds too: the report tests that pair over seeds and users, the others on one run
    train_fused(run, "s-none", HybridConfig(seeds=2, text="none", train=TrainConfig(epochs=3, lr=1e-2)))
    results = evaluate_run(run, run / "report")
    assert results["comparisons"]["fusion/s vs fusion/s-none"]["overall"]["MRR"]["seeds"] == 2
    assert results["comparisons"]["fusion/s vs sasrec"]["overall"]["MRR"]["seeds"] == 1
    assert np.load(run / "report" / "ranks.npz")["fusion/s"].shape == (2, ds.num_users)
    report = (run / "report" / "report.md").read_text()
    assert "Holm's step-down method" in report and "| fusion/s vs fusion/s-none | overall | 40 | 2 |" in report


def test_report_p_values_are_adjusted_over_every_test_and_seeded_pairs_tested_over_seeds(run):
    from fusion.report import compare

    ds = load_dataset(run / "data")
    rng = np.random.default_rng(0)
    ranks = {"a": rng.integers(0, 30, ds.num_users), "b": rng.integers(0, 30, ds.num_users),
             "sa": rng.integers(0, 20, (3, ds.num_users)), "sb": rng.integers(0, 30, (3, ds.num_users))}
    n = np.full(ds.num_users, 31)
    out = compare(ranks, n, [("a", "b"), ("sa", "sb"), ("sa", "b")], ds, "holm")
    va, vb = per_user(ranks["sa"], n), per_user(ranks["sb"], n)
    both = out["sa vs sb"]["overall"]["MRR"]
    assert both["seeds"] == 3 and both["p"] == seeds_test(va["MRR"], vb["MRR"])["p"]
    one = out["sa vs b"]["overall"]["MRR"]  # seeds on one side only: the kept (first) runs, over users
    assert one["seeds"] == 1 and one["diff"] == pytest.approx(np.mean(va["MRR"][0] - per_user(ranks["b"], n)["MRR"]))
    tests = [t for found in out.values() for by_metric in found.values() for t in by_metric.values()]
    assert [t["p_adjusted"] for t in tests] == pytest.approx(list(adjust(np.array([t["p"] for t in tests]), "holm")))
    assert all(t["significant"] == (t["p_adjusted"] < 0.05) and t["p_adjusted"] >= t["p"] for t in tests)
    assert any(t["p"] < 0.05 and not t["significant"] for t in tests)  # significant before adjustment only


def test_a_rationale_never_informs_a_position_whose_target_it_saw(run):
    """Rationales that spell out the targets: a leak would be visible as user vectors that move with them."""
    from fusion.train import build, text_positions
    from slmrec.trainer import next_item_pairs

    ds = load_dataset(run / "data")
    n = text_positions(ds)
    users, inputs, targets = next_item_pairs(ds, 10)
    for u in users:
        s, seen, k = ds.train_sequences()[u], ds.rationale_history(int(u)), int(n[u])
        assert k >= 1 and np.array_equal(s[:len(seen)], seen)
        for j in range(len(s) - 1 - k, len(s) - 1):   # the informed positions of the row s[:-1] -> s[1:]
            assert j + 1 >= len(seen) and s[j + 1] not in seen   # its prefix holds the rationale's, its target is new
    # each user's "rationale" is the item-text vector of a target inside its prefix: leaking would help
    v = vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1))
    item_text = dict(zip(v.item_ids.tolist(), v.item_vectors))
    leaky = np.stack([item_text[int(t[t > 0][0])] for t in targets])
    model = build(ds, HybridConfig(), v, run / "sasrec", run / "fusion" / "x").eval()
    u = torch.as_tensor(users)
    with torch.no_grad():
        model.g_f.weight.normal_()  # a text path that matters
        plain = model.position_user_vectors(u, inputs)
        model.user_text[u] = torch.as_tensor(leaky)
        leaked = model.position_user_vectors(u, inputs)
    for i in range(len(users)):
        k = int(n[users[i]])
        assert torch.equal(plain[i, :-k], leaked[i, :-k])          # inside the prefix: the text is not read
        assert not torch.allclose(plain[i, -k:], leaked[i, -k:])   # after it: it is


def test_each_position_reads_the_latest_rationale_whose_prefix_it_holds(run):
    """Rationales at cut points (3 per user): each cut's vector in turn becomes the item-text vector of
    the target just after that cut. Only the positions whose prefix holds the cut and not the next
    rationale's prefix may move: none before the cut (the rationale is longer than their prefix), none
    from the next cut on (they read a later rationale)."""
    from fusion.train import build
    from slmrec.trainer import next_item_pairs

    ds = load_dataset(run / "data")
    v = with_cuts(ds, vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1)))
    item_text = dict(zip(v.item_ids.tolist(), v.item_vectors))
    model = build(ds, HybridConfig(), v, run / "sasrec", run / "fusion" / "x").eval()
    assert len(model.cut_text) == len(v.cut_ids) == 2 * ds.num_users   # 12 items: prefixes 3, 6 and the end's 9
    users, inputs, _ = next_item_pairs(ds, 10)
    u = torch.as_tensor(users)
    L = inputs.shape[1]
    with torch.no_grad():
        model.g_f.weight.normal_()
        plain = model.position_user_vectors(u, inputs)
        for slot in range(2):
            bait = model.cut_text.clone()
            for k, (user, prefix) in enumerate(zip(v.cut_ids, v.cut_prefixes)):
                if prefix == ds.rationale_prefixes(int(user), 3)[slot]:
                    bait[k] = torch.as_tensor(item_text[int(ds.sequences[user][prefix])])
            model.cut_text, kept = bait, model.cut_text
            moved = model.position_user_vectors(u, inputs)
            model.cut_text = kept
            for i, user in enumerate(users):
                row = len(ds.train_sequences()[user]) - 1
                seen = np.arange(row - L + 1, row + 1)           # each column's prefix length (<= 0: padding)
                start, nxt = ds.rationale_prefixes(int(user), 3)[slot:slot + 2]
                changed = ~torch.isclose(moved[i], plain[i]).all(-1)
                assert changed.tolist() == [start <= q < nxt for q in seen], (user, slot)
    with torch.no_grad():   # a user without an end rationale reads "missing" after the end prefix, as scoring does
        first = int(users[0])
        model.user_has[first] = False
        lost = model.position_user_vectors(u[:1], inputs[:1])[0]
        k = int(model.text_positions[first])
        missing = model.missing_user.expand(k, -1)
        assert torch.allclose(lost[-k:], model.fuse(missing, model._positions(u[:1], inputs[:1])[0, -k:]))
        assert torch.allclose(lost[:-k], plain[0, :-k])   # the cuts before it are still read
        model.user_has[first] = True
    model.set_cuts(torch.zeros(0, v.dim), torch.zeros(ds.num_users, 0), torch.zeros(ds.num_users, 0))
    with torch.no_grad():   # without cuts, only the end rationale's positions read text, as before cuts existed
        assert torch.equal(model.position_user_vectors(u, inputs)[:, -1], plain[:, -1])
        assert not torch.allclose(model.position_user_vectors(u, inputs)[:, :-1], plain[:, :-1])


def test_joint_fusion_with_cuts_trains_saves_and_reloads(run):
    ds = load_dataset(run / "data")
    plain = vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1))
    fast = TrainConfig(epochs=2, lr=1e-2)
    write_vectors(run, plain)
    train_fused(run, "plain", HybridConfig(train=fast))
    write_vectors(run, with_cuts(ds, plain))
    metrics = train_fused(run, "cuts", HybridConfig(train=fast))
    assert read_json(run / "fusion" / "cuts" / "manifest.json")["counts"]["cut_rationales"] == 2 * ds.num_users
    losses = [read_json(run / "fusion" / name / "train_log.json")["epochs"][1]["loss"] for name in ("plain", "cuts")]
    assert losses[0] != losses[1]                                    # the cuts were read in training
    fused = load_model(run / "fusion" / "cuts")
    assert len(fused.cut_text) == 0                                  # training-only: scoring reads the end rationale
    assert evaluate(fused, ds, "test", "full", max_len=10)["MRR"] == metrics["full ranking"]["MRR"]


@pytest.mark.parametrize("text", ["both", "items", "users", "none"])
def test_text_sides_read_only_the_text_they_name(run, text):
    from fusion.train import build

    ds = load_dataset(run / "data")
    v = vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1))
    model = build(ds, HybridConfig(text=text), v, run / "sasrec", run / "fusion" / "x").eval()
    users, hist = torch.tensor([0, 1]), torch.tensor([[0, 1, 2, 3], [0, 4, 5, 6]])
    with torch.no_grad():
        model.g_f.weight.normal_()
        before = model.score(users, hist, None), model.fuse(model.user_text[:2], hist[:, -1:].float().expand(-1, 16))
        model.user_text.normal_()
        model.item_text.normal_()
        after = model.score(users, hist, None), model.fuse(model.user_text[:2], hist[:, -1:].float().expand(-1, 16))
    assert torch.equal(before[0], after[0]) == (text == "none")
    assert torch.equal(before[1], after[1]) == (text in ("items", "none"))  # new users too: no rationale read
    assert model.config.pop_gate == (text in ("both", "items"))


def test_rare_items_borrow_the_id_vectors_of_their_text_neighbours():
    from fusion.model import text_neighbours

    text = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    seen = torch.tensor([False, True, False, True, True])          # item 2 was never seen in training
    nbr, w = text_neighbours(text, seen, k=1, chunk=2)
    assert nbr[1:, 0].tolist() == [4, 1, 4, 3]                      # never itself, never an unseen item
    assert torch.allclose(w, torch.ones(5, 1))


def test_rare_items_are_scored_by_the_vector_their_text_predicts(run):
    """Item vectors that are a linear function of item text: a rarely seen item gets the vector its
    text predicts (the map is fitted on the well-seen items only), at scoring and never in training."""
    from fusion.model import RARE
    from fusion.train import build

    ds = load_dataset(run / "data")
    v = vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1), dim=4)
    model = build(ds, HybridConfig(cold_ridge=1e-6), v, run / "sasrec", run / "fusion" / "x").eval()
    rare = torch.tensor([1, 2])
    with torch.no_grad():
        model.item_pop.fill_(3 * RARE)
        model.item_pop[rare] = RARE
        truth = torch.nn.functional.pad(model.item_text, (0, 1), value=1.0) @ torch.randn(5, 16)
        own = truth.clone()
        own[rare] = -10.0 * truth[rare]                   # trained almost only as negatives: pushed away
        mapped = model.text_mapped(own)
    assert torch.allclose(mapped[rare], truth[rare], atol=1e-3)
    assert torch.equal(mapped[3:], own[3:])               # every other item keeps its own vector
    fused = model.item_vectors()
    model.train()
    plain = model.item_vectors()
    assert not torch.allclose(fused[rare], plain[rare]) and torch.equal(fused[3:], plain[3:])
    for off in (HybridConfig(cold_ridge=0.0), HybridConfig(text="users")):   # off, and off where it cannot apply
        assert build(ds, off, v, run / "sasrec", run / "fusion" / "x").config.cold_ridge == 0.0
    with pytest.raises(InputError, match=r"^fusion cold_ridge = 0.1 cannot apply: text = 'users' reads no item text"):
        HybridConfig(text="users", cold_ridge=0.1)
    with pytest.raises(InputError, match="cold_ridge must be 0"):
        HybridConfig(cold_ridge=-1.0)


@pytest.mark.parametrize("pop_gate", [False, True])
def test_id_dropout_scores_rare_and_dropped_items_without_their_own_id_vector(run, pop_gate):
    """Rare items always, and in training a fresh random share of the others, are scored without their
    own ID vector: what the backbone learned for them cannot move their fused vectors (with pop_gate,
    the ID vectors they borrow from their text neighbours still do)."""
    from fusion.model import RARE
    from fusion.train import build

    ds = load_dataset(run / "data")
    v = vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1), dim=4)
    model = build(ds, HybridConfig(cold_ridge=0.0, pop_gate=pop_gate, id_dropout=0.5), v, run / "sasrec",
                  run / "fusion" / "x").eval()
    with torch.no_grad():
        model.item_pop.fill_(3 * RARE)
        model.item_pop[1] = RARE
    assert model.text_only().nonzero().flatten().tolist() == [1]        # at scoring: the rare item only
    before = model.item_vectors()
    with torch.no_grad():
        model.backbone.item_emb.weight[1] += 5.0                        # the backbone's ID vector of item 1
    after = model.item_vectors()
    assert torch.equal(after[1], before[1])
    with torch.no_grad():
        model.backbone.item_emb.weight[2] += 5.0
    assert not torch.equal(model.item_vectors()[2], after[2])           # a seen item's own ID vector counts
    if pop_gate:                                                        # its text neighbours' ID vectors count
        now = model.item_vectors()[1]
        with torch.no_grad():
            model.backbone.item_emb.weight[model.neighbours[1, 0]] += 5.0
        assert not torch.equal(model.item_vectors()[1], now)
    model.train()
    torch.manual_seed(0)
    drawn = [model.text_only() for _ in range(2)]
    assert all(d[1] for d in drawn) and not torch.equal(*drawn)         # a fresh draw each step
    assert 0.2 < drawn[0][2:].float().mean() < 0.8
    torch.manual_seed(0)
    assert torch.equal(model.text_only(), drawn[0])                     # seeded: the same draw
    j = int(torch.nonzero(drawn[0] & (model.item_pop > RARE))[0])      # a dropped item seen often
    torch.manual_seed(0)
    fused = model.item_vectors()[j]
    half = torch.zeros_like(model.backbone.item_emb.weight[j])
    if pop_gate:                                                        # gated as a rare item: 0.5 at the start
        ids = model.backbone.item_emb.weight
        half = 0.5 * (model.neighbour_weights[j, :, None] * ids[model.neighbours[j]]).sum(0)
    assert torch.allclose(fused, model.g_f(torch.cat([model.g_l(model.item_text[j]), half])), atol=1e-6)
    with pytest.raises(InputError, match="fusion id_dropout = 0.5 cannot apply"):   # no item text to score from
        HybridConfig(text="users", id_dropout=0.5)
    with pytest.raises(InputError, match="id_dropout must be in"):
        HybridConfig(id_dropout=1.0)


def test_report_compares_each_hybrid_with_its_text_controls(tmp_path):
    from fusion.report import controls_of

    models = {}
    for name, cfg in {"fusion/a": {}, "fusion/a-none": {"text": "none"}, "fusion/a-profile": {"vectors": "vp"},
                      "fusion/a-items": {"text": "items"}, "fusion/gru": {"backbone": "gru4rec", "text": "none"},
                      "fusion/t": {"mode": "text"}}.items():
        write_json(tmp_path / name / "manifest.json", manifest("fusion", inputs={}, seed=0, counts={}, config={
            "mode": "hybrid", "backbone": "sasrec", "training": "joint", "text": "both", "vectors": "vectors", **cfg}))
        models[name] = tmp_path / name
    assert controls_of("fusion/a", models) == ["fusion/a-none", "fusion/a-profile"]
    assert controls_of("fusion/a-items", models) == ["fusion/a-none"]
    assert controls_of("fusion/a-profile", models) == []   # the control is compared the other way round
    assert controls_of("fusion/t", models) == [] and controls_of("sasrec", models) == []


FIXTURE = Path(__file__).parent / "fixtures" / "fusion-1a10810"


@pytest.mark.parametrize("name,kind", [("hybrid-frozen", HybridFusion), ("hybrid-tuned", HybridFusion),
                                       ("text", TextMatching)])
def test_a_fused_model_saved_by_1a10810s_code_loads_and_scores_as_it_did(tmp_path, name, kind):
    """Folders written by commit 1a10810 (model_type "fusion" with a mode; make_fixture.py there): a
    hybrid referencing a frozen SASRec with pop_gate and cold_ridge, a jointly trained one with its
    fine-tuned SASRec inside, text matching. Each loads as its class, scores exactly as that code did,
    and saved again is written in its class's format."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    assert expected["written_by"].startswith("1a10810")
    assert json.loads((FIXTURE / name / "config.json").read_text())["model_type"] == "fusion"
    users, hist = torch.tensor(expected["users"]), torch.tensor(expected["histories"])
    want = expected["models"][name]
    model = load_model(FIXTURE / name)
    assert type(model) is kind
    with torch.no_grad():
        assert torch.equal(model.score(users, hist, None), torch.tensor(want["scores"]))
        assert torch.equal(model.item_vectors(), torch.tensor(want["item_vectors"]))
    if name == "hybrid-frozen":
        assert model.config.training == "frozen" and model.config.pop_gate and model.config.cold_ridge == 0.1
        assert model.config.freeze_backbone and not model.saves_backbone
    if name == "hybrid-tuned":
        assert model.every_position and model.config.text == "users" and not model.config.pop_gate
    shutil.copytree(FIXTURE, tmp_path / "old")
    model.save_pretrained(tmp_path / "old" / "again")   # beside the SASRec a frozen backbone is referenced
    assert json.loads((tmp_path / "old" / "again" / "config.json").read_text())["model_type"] == kind.model_type
    again = load_model(tmp_path / "old" / "again")
    with torch.no_grad():
        assert torch.equal(again.score(users, hist, None), torch.tensor(want["scores"]))
    assert again.config == model.config and again.shape == model.shape


def test_each_kind_takes_its_own_settings_and_one_that_cannot_apply_is_an_error(tmp_path):
    demo = stages_of(tmp_path, "demo")
    none = demo["fusion/hybrid-sasrec-none"].config   # the shipped preset: unset means "where it applies"
    assert none.pop_gate is None and none.cold_ridge is None and not none.resolved().pop_gate
    assert none.resolved().cold_ridge == 0.0 and demo["fusion/hybrid-sasrec"].config.resolved().cold_ridge == 0.1
    assert isinstance(demo["fusion/text"].config, TextMatchingConfig) and demo["fusion/text"].config.hidden == 64
    bad = {"fusion.hybrid-sasrec-none.pop_gate=true": r"^fusion pop_gate = true cannot apply: text = 'none' reads no "
                                                       r"item text \(leave it unset\)$",
           "fusion.hybrid-sasrec-none.cold_ridge=0.5": r"^fusion cold_ridge = 0.5 cannot apply",
           "fusion.hybrid-sasrec-none.id_dropout=0.1": r"^fusion id_dropout = 0.1 cannot apply",
           "fusion.text.pop_gate=false": r"^fusion.text: unknown setting 'pop_gate' \(known: hidden, mode, ",
           "fusion.text.backbone=sasrec": r"^fusion.text: unknown setting 'backbone'",
           "fusion.text.mode=txt": r"^fusion.text.mode: unknown fused model kind 'txt' \(known: hybrid, text",
           "fusion.text.mode=[1]": r"^fusion.text.mode: expected text, got \[1\]$"}
    for override, message in bad.items():
        with pytest.raises(InputError, match=message):
            build_stages(tmp_path, "demo", [override])
    assert stages_of(tmp_path, "demo", ["fusion.hybrid-sasrec-none.pop_gate=false"])  # off is no error
    with pytest.raises(InputError, match="a HybridFusion is 'hybrid'"):
        HybridFusion(TextMatchingConfig(), Shape(2, 3, 4), torch.zeros(2, 4), torch.ones(2), torch.zeros(4, 4),
                     torch.ones(4))


def test_fusion_train_takes_each_kinds_options(run, monkeypatch, capsys):
    from fusion.cli import main

    ds = load_dataset(run / "data")
    write_vectors(run, vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1)))

    def cli(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["fusion", "train", "--run", str(run), *args])
        with pytest.raises(SystemExit) as e:
            main()
        return e.value.code, capsys.readouterr().err

    assert cli("--name", "t", "--mode", "text", "--hidden", "8", "--train.epochs", "1")[0] in (0, None)
    text = load_model(run / "fusion" / "t")
    assert type(text) is TextMatching and text.config.hidden == 8
    code, err = cli("--name", "t2", "--mode", "text", "--pop-gate", "false")
    assert code == 1 and err.count("\n") == 1 and "fusion.t2: unknown setting 'pop_gate'" in err
    code, err = cli("--name", "h", "--text", "users", "--id-dropout", "0.2")
    assert code == 1 and "fusion id_dropout = 0.2 cannot apply: text = 'users' reads no item text" in err
    assert not (run / "fusion" / "t2").exists() and not (run / "fusion" / "h").exists()


def stages_of(run, preset, overrides=()) -> dict:
    """The configured stages of a preset by their folder in the run."""
    return {s.folder: s for s in build_stages(run, preset, list(overrides))}


def test_presets_load_and_name_bad_settings(tmp_path, monkeypatch):
    demo, study = stages_of(tmp_path, "demo"), stages_of(tmp_path, "study")
    ablations = {f"fusion/hybrid-{b}{side}" for b in ("sasrec", "gru4rec", "slmrec-student")
                 for side in ("", "-items", "-users", "-none")}   # item text, rationales, both, neither
    assert {f for f in study if f.startswith("fusion/")} == ablations | {"fusion/hybrid-sasrec-profile", "fusion/text"}
    assert study["fusion/hybrid-gru4rec"].inputs()["backbone"] == tmp_path / "gru4rec"
    assert study["fusion/hybrid-sasrec-profile"].inputs()["vectors"] == tmp_path / "vectors-profile"
    assert study["vectors-profile"].config.records == "profile-rationales"
    demo_fusions = sorted(f for f in demo if f.startswith("fusion/"))  # the demo: a subset of the study, one seed
    assert set(demo_fusions) == {"fusion/hybrid-sasrec", "fusion/hybrid-sasrec-none", "fusion/hybrid-slmrec-student",
                                 "fusion/text"} and "gru4rec" not in demo
    assert all(replace(study[f].config, seeds=1) == demo[f].config for f in demo_fusions)
    student_rationales = demo["slim-student-rationales"].config
    assert student_rationales.template == "slim_student_v2"   # nested defaults survive
    assert student_rationales.client.max_tokens == 40 and student_rationales.client.timeout_s == 900.0
    assert study["slim-student-rationales"].config.users is None  # the study: every user
    assert demo["fusion/text"].config.train.weight_decay == 1e-4
    with pytest.raises(InputError, match="slmrec-teacher.train: unknown setting 'epochz'"):
        build_stages(tmp_path, "demo", ["slmrec-teacher.train.epochz=2"])
    with pytest.raises(InputError, match="unknown table 'teacher'"):
        build_stages(tmp_path, "demo", ["teacher.train.epochs=2"])
    with pytest.raises(InputError, match="data.rating_gt: expected a number"):
        build_stages(tmp_path, "demo", ['data.rating_gt="abc"'])
    with pytest.raises(InputError, match=r"sasrec.model must be 'sasrec' \(a table per backbone\)"):
        build_stages(tmp_path, "demo", ["sasrec.model=gru4rec"])
    gru = study["gru4rec"]
    assert gru.config.model == "gru4rec" and gru.config.train.epochs == 100 and gru.out == tmp_path / "gru4rec"
    own = tmp_path / "own.toml"  # an optional stage: only a preset with its table trains it
    own.write_text('[sasrec.train]\nepochs = 3\n')
    assert "gru4rec" not in stages_of(tmp_path, str(own)) and "gru4rec" in stages_of(tmp_path, str(own), ["gru4rec.hidden=8"])
    own.unlink()
    with pytest.raises(InputError, match="gru4rec.model must be 'gru4rec'"):
        build_stages(tmp_path, "study", ["gru4rec.model=sasrec"])
    for var in ("DATA", "META", "LLAMA2_7B", "TEACHER_URL", "TEACHER_MODEL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(InputError, match="environment variable DATA"):
        build_stages(tmp_path, "paper")
    for var in ("DATA", "META", "LLAMA2_7B", "TEACHER_URL", "TEACHER_MODEL"):
        monkeypatch.setenv(var, f"/x/{var}")
    paper = stages_of(tmp_path, "paper", ["slmrec-teacher.train.lr=1e-4"])
    teacher = paper["slmrec-teacher"].config
    assert teacher.model.base == "/x/LLAMA2_7B" and teacher.train.lr == 1e-4
    fusions = sorted(f for f in study if f.startswith("fusion/"))
    assert fusions == sorted(f for f in paper if f.startswith("fusion/"))   # the study's fused models
    same = [replace(paper[f].config, seeds=1, train=study[f].config.train) == replace(study[f].config, seeds=1)
            for f in fusions]
    assert all(same)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2]) and parse_override("a=some/path") == ("a", "some/path")
    with pytest.raises(InputError, match="unknown preset"):
        build_stages(tmp_path, "nope")
    assert not any(tmp_path.iterdir())  # configuring the stages writes nothing


def test_fine_tuned_backbone_is_saved_with_the_fused_model(run):
    from fusion.train import build

    ds = load_dataset(run / "data")
    v = vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1))
    model = build(ds, HybridConfig(), v, run / "sasrec", run / "fusion" / "ft")
    with torch.no_grad():
        model.backbone.item_emb.weight.add_(1.0)   # what fine-tuning did
        model.gate.add_(0.5)
    model.save_pretrained(run / "fusion" / "ft")
    fused = load_model(run / "fusion" / "ft")
    original = SASRec.from_pretrained(run / "sasrec")
    assert (run / "fusion" / "ft" / "backbone" / "config.json").exists()
    assert torch.equal(fused.item_vectors(), model.eval().item_vectors())
    assert not torch.equal(fused.backbone.item_vectors(), original.item_vectors())


def test_an_llm_backbone_is_fine_tuned_inside_joint_fusion_and_reloads(run):
    """The SLMRec student trained with the fused model (freeze_backbone = false): its LoRA and
    projections move, are saved beside the fusion weights, and the reloaded model scores the same."""
    from slmrec.llm import LLMRec, LLMRecConfig

    ds = load_dataset(run / "data")
    tiny = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    student = LLMRec(LLMRecConfig(llama=tiny, lora_r=4, lora_dropout=0.0), torch.randn(ds.num_items + 1, 8))
    student.save_pretrained(run / "student")
    write_json(run / "student" / "manifest.json", manifest("student", inputs={}, config={"train": {"max_len": 10}},
                                                             seed=0, counts={}))
    write_vectors(run, vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1)))
    metrics = train_fused(run, "ft", HybridConfig(backbone="student", freeze_backbone=False,
                                                       train=TrainConfig(epochs=2, lr=1e-2, max_len=10)))
    fused = load_model(run / "fusion" / "ft")
    tuned = LLMRec.from_pretrained(run / "fusion" / "ft" / "backbone")
    moved = [k for k, v in student.checkpoint_state().items() if not torch.equal(v, tuned.checkpoint_state()[k])]
    assert any("lora" in k for k in moved) and "in_proj.weight" in moved
    assert evaluate(fused, ds, "test", "full", max_len=10)["MRR"] == metrics["full ranking"]["MRR"]


def test_a_metric_registered_from_a_test_reaches_metrics_report_and_comparisons(run):
    from eval.metrics import METRICS, register_metric

    @register_metric("HR@3", tested=True)
    def hr3(r, n):
        return (r < 3).astype(float)

    try:
        ds = load_dataset(run / "data")
        write_vectors(run, vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1)))
        train_fused(run, "h", HybridConfig(train=TrainConfig(epochs=1)))
        results = evaluate_run(run, run / "report")
        ranks = np.load(run / "report" / "ranks.npz")["sasrec"]
        assert results["overall"]["full"]["sasrec"]["HR@3"] == pytest.approx(np.mean(ranks < 3))
        assert "random_HR@3" in results["overall"]["full"]["sasrec"]
        assert "HR@3" in results["comparisons"]["fusion/h vs sasrec"]["overall"]
        report = (run / "report" / "report.md").read_text()
        assert "| model | HR@1 | HR@5 | HR@10 | HR@20 | NDCG@5 | NDCG@10 | NDCG@20 | MRR | HR@3 |" in report
        assert "| A vs B | group | users | seeds | NDCG@10 | MRR | HR@3 |" in report
    finally:
        del METRICS["HR@3"]
