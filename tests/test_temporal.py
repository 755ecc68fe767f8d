"""The temporal split: a global time cut. Nothing after a user's cut reaches training, validation,
prompts or candidates; the same stages and report run on it."""
import numpy as np
import pandas as pd
import pytest

from eval.assets import smollm2_path
from eval.dataset import load_dataset, prepare_dataset
from eval.errors import InputError
from eval.evaluate import rank_users
from eval.preprocess import PrepareConfig
from eval.stage import run_stage
from fusion.report import evaluate_run
from fusion.model import HybridConfig
from fusion.train import FusionStage
from slim.profile import ProfileConfig, ProfileRationalesStage
from slim.prompts import STUDENT, PromptBuilder
from slim.records import read_records
from slmrec.pretrain import BackboneStage, PretrainConfig
from slmrec.trainer import TrainConfig, next_item_pairs
from tests.conftest import write_atomic
from tests.test_fusion import vectors, write_vectors

CUT = 0.8


@pytest.fixture
def staggered(tmp_path):
    """60 users on one timeline, each active for 12 steps from a start of their own: early users end
    before the cut, late ones straddle it or start after it (times are unique: no ties at the cut)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        start, step = rng.integers(0, 30), 1 + u % 2
        rows += [(f"u{u}", f"i{(start + step * t) % 30}", 5, 1000 + 23 * u + 10 * t) for t in range(12)]
    items = [(f"i{i}", f"Film {chr(65 + i)}", 1990 + i, "Drama") for i in range(30)]
    return write_atomic(tmp_path / "raw", "tl", rows, items)


def prepared(staggered, run):
    ds = prepare_dataset(PrepareConfig(source=str(staggered), rating_gt=None, user_core=1, item_core=1,
                                       negatives=[5], split="temporal", cut=CUT), run)
    raw = pd.read_csv(staggered / "tl.inter", sep="\t")
    times = {(u, i): t for u, i, t in zip(raw["user_id:token"], raw["item_id:token"], raw["timestamp:float"])}
    users, items = ds.users["raw_id"].to_numpy(), dict(zip(ds.items["item"], ds.items["raw_id"]))
    return ds, (lambda u, item: times[(users[u], items[int(item)])])


def test_nothing_after_the_cut_reaches_training_validation_or_candidates(staggered, tmp_path):
    ds, time_of = prepared(staggered, tmp_path / "run")
    cut = ds.manifest["counts"]["cut_timestamp"]
    assert cut == np.quantile(pd.read_csv(staggered / "tl.inter", sep="\t")["timestamp:float"], CUT, method="higher")
    tested = ds.eval_users("test")
    assert 0 < len(tested) < ds.num_users == len(ds.eval_users("valid"))
    assert ds.manifest["counts"]["test_users"] == len(tested)
    users, inputs, targets = next_item_pairs(ds, 20)  # every training example
    for u, x, y in zip(users, inputs, targets):
        assert all(time_of(u, i) < cut for i in np.concatenate([x[x > 0], y[y > 0]]))
    for u in range(ds.num_users):
        assert time_of(u, ds.target("valid")[u]) < cut
        assert all(time_of(u, i) < cut for i in ds.history(u, "test"))  # the test history too
        if ds.has_test[u]:
            assert time_of(u, ds.target("test")[u]) >= cut  # the first interaction after the cut
        else:
            assert ds.target("test")[u] == 0 and not ds.candidates("test", 5)[u].any()
    # the item universe is what was known before the cut: every item, candidate and target appears there
    known = {int(i) for u in range(ds.num_users) for i in ds.history(u, "test")}
    assert known == set(range(1, ds.num_items + 1))
    for split in ("valid", "test"):
        rows = ds.candidates(split, 5)[ds.eval_users(split)]
        assert rows[:, 0].all() and set(rows[rows > 0].tolist()) <= known
    with pytest.raises(InputError, match="have no test target"):
        rank_users(None, ds, "test", "5", users=np.flatnonzero(~ds.has_test)[:1])


def test_prompts_and_the_control_see_only_items_from_before_the_cut(staggered, tmp_path):
    ds, time_of = prepared(staggered, tmp_path / "run")
    cut = ds.manifest["counts"]["cut_timestamp"]
    prompts = PromptBuilder(ds.items, STUDENT, 10_000, smollm2_path(), ds.domain)
    line_of = {line: item for item, line in prompts.window.lines.items()}
    run_stage(ProfileRationalesStage(tmp_path / "run", ProfileConfig(history_tokens=10_000, recent=50)))
    records = read_records(tmp_path / "run" / "profile-rationales" / "records.jsonl")
    titles = dict(zip(ds.items["item"], ds.items["title"]))
    for u in range(ds.num_users):
        prompt = prompts(ds.rationale_history(u).tolist())
        shown = [line_of[line] for line in prompt.split("<history>\n")[1].split("\n</history>")[0].splitlines()]
        assert all(time_of(u, i) < cut for i in shown)
        for later in (ds.target("valid")[u], ds.target("test")[u]):  # the targets are never named
            assert not later or titles[later] not in prompt and titles[later] not in records[u]["text"]


def test_the_same_stages_and_report_run_on_the_temporal_split(staggered, tmp_path):
    run = tmp_path / "run"
    ds, _ = prepared(staggered, run)
    fast = TrainConfig(epochs=2, max_len=10)
    run_stage(BackboneStage(run, PretrainConfig(hidden=16, layers=1, train=fast)))
    write_vectors(run, vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1)))
    run_stage(FusionStage(run, HybridConfig(train=fast), folder="fusion/hybrid"))
    results = evaluate_run(run, run / "report")
    tested = len(ds.eval_users("test"))
    assert results["overall"]["full"]["sasrec"]["users"] == tested
    assert sum(g["users"] for g in results["user_groups"]["sasrec"].values()) == tested
    assert results["comparisons"]["fusion/hybrid vs sasrec"]["overall"]["MRR"]["users"] == tested
    assert results["selection"]["fusion/hybrid"]["users"] == ds.num_users  # validation: every user


def test_a_cut_with_no_known_item_after_it_is_one_clear_error(tmp_path):
    rows = [("a", "1", 5, 1), ("a", "2", 5, 2), ("a", "3", 5, 3), ("b", "1", 5, 4), ("b", "2", 5, 5),
            ("a", "9", 5, 10)]  # after the cut only an item nobody had before
    with pytest.raises(InputError, match="no user has an interaction at or after the temporal cut"):
        prepare_dataset(PrepareConfig(source=str(write_atomic(tmp_path / "raw", "d", rows)), rating_gt=None,
                                      user_core=1, item_core=1, negatives=[1], split="temporal", cut=0.9),
                        tmp_path / "run")
    with pytest.raises(InputError, match="split must be one of loo, temporal"):
        PrepareConfig(split="random")
