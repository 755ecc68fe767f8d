"""`fusion recommend` and what it stands on: tolerant title/category matching, retrieval from LanceDB
(exact against numpy, IVF-PQ against exact), scores equal to the model's, new-user vectors, the CLI."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.dataset import load_dataset, pad_left, prepare_dataset
from eval.errors import InputError
from eval.preprocess import PrepareConfig
from eval.stage import run_stage
from fusion.recommend import (ItemIndex, Rationale, Recommender, ann_recall, default_model, find, key_words,
                              new_user_vector, words)
from fusion.model import HybridConfig
from fusion.train import FusionStage
from slim.encode import ITEMS_TABLE, USERS_TABLE, VectorsStage, read_vectors
from slim.prompts import STUDENT
from slim.records import RECORDS
from slmrec.pretrain import BackboneStage, PretrainConfig
from slmrec.trainer import TrainConfig
from tests.conftest import write_atomic

GENRES = ["Drama", "Comedy", "Sci-Fi", "Children's"]
SPECIAL = {0: ("Godfather, The", 1972), 1: ("Amélie", 2001), 2: ("1941", 1979)}  # article, accent, year-only title
STEP2 = "Comedy and sci-fi films, maybe some drama."
FUSED = "fusion/hybrid-sasrec"


def title_of(i: int) -> str:
    return SPECIAL.get(i, (f"Movie {i}",))[0]


def step3_of(u: int) -> str:
    """Step 3 of user u's rationale: the titles of items 0-2 and of the even items 4..18, written loosely."""
    listed = ["the godfather (1972)", "Amelie", "1941"] + [f"Movie {i}" for i in range(4, 20, 2)]
    return "; ".join(listed[u % 3:] + listed[:u % 3]) + "."


def build_run(folder: Path) -> Path:
    """A finished tiny run: 40 users x 30 items walking a ring, SASRec (2 epochs), a rationale record per user
    (hand-written, and one at a cut point after it), real MiniLM vectors (the vectors stage) and a hybrid fused model (2 epochs)."""
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{(start + (1 + u % 2) * t) % 30}", 5, 1000 + t)
            for u, start in enumerate(rng.integers(0, 30, 40)) for t in range(12)]
    items = [(f"i{i}", title_of(i), SPECIAL.get(i, (None, 1990 + i))[1], f"{GENRES[i % 4]} {GENRES[(i + 1) % 4]}")
             for i in range(30)]
    raw = write_atomic(folder / "raw", "tiny", rows, items)
    ds = prepare_dataset(PrepareConfig(source=str(raw), rating_gt=None, user_core=1, item_core=1, negatives=[10]),
                         folder)
    fast = TrainConfig(epochs=2, max_len=10)
    run_stage(BackboneStage(folder, PretrainConfig(hidden=16, layers=1, train=fast)))
    records = folder / "slim-student-rationales" / RECORDS
    records.parent.mkdir()
    with open(records, "w") as f:
        for u in range(ds.num_users):
            steps = {"step1": f"User {u} enjoys light films.", "step2": STEP2, "step3": step3_of(u)}
            text = "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps.values(), 1))
            rec = {"user": u, "raw_user": str(ds.users["raw_id"].iat[u]), "prompt_version": STUDENT,
                   "model": "student:test", **steps, "text": text, "error": None}
            f.write(json.dumps(rec) + "\n")
            # a rationale at an earlier cut point, written after the end one: readers must show the end one
            f.write(json.dumps({**rec, "prefix": 3, "step3": "Cut", "text": "Step 1: cut"}) + "\n")
    run_stage(VectorsStage(folder))
    run_stage(FusionStage(folder, HybridConfig(backbone="sasrec", train=fast), folder=FUSED))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def rec(run):
    return Recommender(run)


# --- matching ---

@pytest.mark.parametrize("title, text, found", [
    ("Godfather, The", "Watch The Godfather (1972) next.", "Godfather"),
    ("Amélie", "amelie; Heat", "amelie"),
    ("Schindler's List", "SCHINDLERS LIST!", "SCHINDLERS LIST"),
    ("Star Wars (1977)", "star wars, the 1977 one", "star wars"),
    ("Movie 1", "Movie 10; Movie 12", None),          # whole words only
    ("Movie 1", "Movie 10; movie-1", "movie-1"),
    ("1941", "Then 1941 (1979).", "1941"),            # a title that is only a year still matches
    ("Heat", "They feel the heat", "heat"),
    ("Alien", "Aliens", None),
])
def test_titles_match_whatever_their_case_punctuation_articles_and_years(title, text, found):
    span = find(key_words(title), words(text))
    assert (None if span is None else text[span[0]:span[1]]) == found


def test_rationale_evidence_names_categories_of_step_2_and_the_title_as_written_in_step_3():
    r = Rationale.of({"step2": "Children's films and Sci-Fi.", "step3": "The Godfather (1972); Movie 4"})
    assert r.categories(["Drama", "Sci-Fi", "Children's", "Fi"]) == ["Sci-Fi", "Children's", "Fi"]
    assert r.title("Godfather, The") == "Godfather" and r.title("Movie 4") == "Movie 4" and r.title("Movie 5") is None
    assert Rationale.of(None) is None


# --- retrieval ---

def test_exact_search_is_numpy_top_k_and_ivf_pq_recall_against_it(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3000, 32)).astype(np.float32)
    queries = rng.normal(size=(20, 32)).astype(np.float32)
    exact = ItemIndex.create(tmp_path, "exact", np.arange(len(vectors)), vectors, ann=False)
    for q in queries[:5]:
        skip = {int(i) for i in np.argsort(-(vectors @ q))[:3]}  # the 3 best are "in the history"
        top = np.argsort(-(vectors @ q))
        assert exact.search(q, 10, skip).tolist() == [i for i in top if i not in skip][:10]
    recall = ann_recall(vectors, queries, 10, tmp_path)
    assert recall >= 0.9, recall          # 3000 rows: 11 partitions, all probed; PQ candidates re-ranked exactly
    assert ann_recall(vectors, queries, 10, tmp_path, nprobes=1, refine=1) < recall  # a cheaper search loses items
    with pytest.raises(InputError, match="at least 256 rows"):
        ItemIndex.create(tmp_path, "small", np.arange(100), vectors[:100], ann=True)


# --- the recommender of a run ---

def test_known_user_gets_k_unseen_items_scored_as_the_model_scores_them(run, rec):
    assert rec.name == FUSED == default_model(run)
    ds = load_dataset(run / "data")
    u = rec.user_of("u7")           # raw ids are not the 0-based user index
    answer = rec.for_user("u7", k=8)
    recs = answer["recommendations"]
    ids = [rec.items[x["id"]] for x in recs]
    assert len(recs) == 8 and not set(ids) & set(ds.sequences[u].tolist())
    scores = [x["score"] for x in recs]
    assert scores == sorted(scores, reverse=True)
    with torch.no_grad():
        direct = rec.model.score(torch.tensor([u]), pad_left([ds.sequences[u]], rec.max_len), torch.tensor([ids]))[0]
        unseen = rec.model.score(torch.tensor([u]), pad_left([ds.sequences[u]], rec.max_len), None)[0]
    assert np.allclose(scores, direct.numpy(), atol=1e-4)
    unseen[torch.as_tensor(ds.sequences[u])] = unseen[0] = -np.inf
    assert set(ids) == set(unseen.topk(8).indices.tolist())   # exact search: the model's own top 8
    raw = dict(zip(ds.items["item"], ds.items["raw_id"]))
    assert [h["title"] for h in answer["history"]] == [title_of(int(raw[i][1:])) for i in ds.sequences[u][::-1][:10]]
    assert answer["rationale"]["step3"] == step3_of(u) and answer["history_length"] == 12


def test_evidence_links_each_item_to_the_users_rationale(run, rec):
    answer = rec.for_user("u3", k=20)
    ids, user_vecs = read_vectors(run / "vectors", USERS_TABLE)
    item_ids, item_vecs = read_vectors(run / "vectors", ITEMS_TABLE)
    rationale = user_vecs[list(ids).index(rec.user_of("u3"))]
    listed = {0, 1, 2, *range(4, 20, 2)}
    for x in answer["recommendations"]:
        i, ev = int(x["id"][1:]), x["evidence"]
        assert ev["categories"] == [c for c in x["categories"] if c in ("Drama", "Comedy", "Sci-Fi")]
        assert (ev["title"] is not None) == (i in listed), (x["title"], ev)
        item = item_vecs[list(item_ids).index(rec.items[x["id"]])]
        cos = item @ rationale / np.linalg.norm(item) / np.linalg.norm(rationale)
        assert ev["cosine"] == pytest.approx(cos, abs=1e-3)


def test_new_user_vector_of_a_known_history_and_rationale_is_the_models_user_vector(rec):
    ds, u = rec.ds, 5
    hist = pad_left([ds.sequences[u]], rec.max_len)
    with torch.no_grad():
        known = rec.model.user_vectors(torch.tensor([u]), hist)
    assert torch.allclose(new_user_vector(rec.model, hist, rec.user_text[0][u]), known, atol=1e-5)
    without = new_user_vector(rec.model, hist, None)   # no rationale: the learned "missing" vector
    assert without.shape == known.shape and not torch.allclose(without, known)


def test_other_models_bad_k_and_unknown_ids(run, rec):
    sasrec = Recommender(run, "sasrec")
    recs = sasrec.for_user("u3", 5)["recommendations"]
    assert len(recs) == 5 and recs[0]["evidence"]["cosine"] is not None  # evidence does not need a fused model
    with pytest.raises(InputError, match="unknown user 'nobody'.*raw ids"):
        rec.for_user("nobody")
    with pytest.raises(InputError, match="unknown item ids 'x', 'y'"):
        rec.items_of(["i1", "x", "y"])
    for k in (0, 101):
        with pytest.raises(InputError, match="k: must be between 1 and 100"):
            rec.for_user("u3", k)
    with pytest.raises(InputError, match=r"fusion/nothing: not found \(expected a model folder of the run\)"):
        Recommender(run, "fusion/nothing")
    few = rec.for_user("u3", k=100)["recommendations"]       # more than the unseen items: all of them
    assert len(few) == rec.ds.num_items - len(set(rec.ds.sequences[3].tolist()))


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from fusion.cli import main

    monkeypatch.setattr(sys, "argv", ["fusion", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_recommend_command(run, monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "recommend", "--run", str(run), "--user", "u3", "--k", "3", "--json")
    answer = json.loads(out)
    assert code == 0 and answer["user"] == "u3" and len(answer["recommendations"]) == 3
    code, out, _ = cli(monkeypatch, capsys, "recommend", "--run", str(run), "--user", "u3", "--k", "3")
    assert code == 0 and "Step 3: " + answer["rationale"]["step3"] in out
    assert answer["recommendations"][0]["title"] in out
    code, out, err = cli(monkeypatch, capsys, "recommend", "--run", str(run), "--user", "3")
    assert code == 1 and err.count("\n") == 1 and "unknown user '3'" in err and out == ""


def test_the_default_model_is_chosen_on_the_same_users_for_every_candidate(run, tmp_path):
    """Of two fused models, the one whose own training log claims a perfect MRR (as one selected on a user
    group of its own might) but ranks worse on every user's validation items is not the default; the
    report's selection table agrees."""
    import shutil

    from eval.io import write_json
    from eval.registry import load_model
    from fusion.report import ReportStage, selection_scores

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    other = copy / "fusion" / "other"
    shutil.copytree(copy / FUSED, other)
    model = load_model(other)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(other)
    candidates = {FUSED: copy / FUSED, "fusion/other": other}
    scores = selection_scores(candidates, load_dataset(copy / "data"), "full")
    best, worst = sorted(candidates, key=lambda name: -scores[name]["MRR"])
    assert scores[best]["MRR"] > scores[worst]["MRR"] and scores[best]["users"] == scores[worst]["users"] == 40
    log = candidates[worst] / "train_log.json"
    write_json(log, {**json.loads(log.read_text()), "best_valid_MRR": 1.0})
    assert default_model(copy) == best
    run_stage(ReportStage(copy))
    assert json.loads((copy / "report" / "metrics.json").read_text())["selection"] == scores
    assert default_model(copy) == best and f"default model: **{best}**" in (copy / "report" / "report.md").read_text()
