"""The data layer: chronology, ids, reproducibility, candidates, k-core and bad input.

`prepare_dataset(cfg, RUN)` runs the data stage, which writes RUN/data."""
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eval.dataset import SeqDataset, load_dataset, prepare_dataset
from eval.errors import InputError
from eval.io import atomic_dir, file_hash, save_npy_rows, write_json
from eval.loaders import load_amazon, load_movielens, load_recbole
from eval.preprocess import PrepareConfig, k_core, sample_candidates
from tests.conftest import write_atomic


def cfg(source, **kw):
    base = dict(source=str(source), rating_gt=None, user_core=1, item_core=1, negatives=[5])
    return PrepareConfig(**{**base, **kw})


def test_histories_are_chronological_not_by_item_id(tmp_path):
    # item ids deliberately out of time order; ties on timestamp keep file order
    rows = [("a", "9", 5, 30), ("a", "1", 5, 10), ("a", "5", 5, 20), ("a", "7", 5, 20),
            ("b", "1", 5, 1), ("b", "9", 5, 2), ("b", "5", 5, 3)]
    ds = prepare_dataset(cfg(write_atomic(tmp_path / "d", "d", rows), negatives=[1]), tmp_path / "run")
    assert ds.path == tmp_path / "run" / "data"
    raw = dict(zip(ds.items["item"], ds.items["raw_id"]))
    assert [raw[i] for i in ds.sequences[0]] == ["1", "5", "7", "9"]
    assert ds.target("test")[0] == ds.items.set_index("raw_id").loc["9", "item"]
    assert ds.target("valid")[0] == ds.items.set_index("raw_id").loc["7", "item"]
    assert list(ds.history(0, "test")) == list(ds.sequences[0][:-1])


def test_item_zero_is_padding_only(synthetic, tmp_path):
    ds = prepare_dataset(cfg(synthetic), tmp_path / "run")
    assert ds.items["item"].min() == 1 and ds.items["item"].max() == ds.num_items
    assert (ds.interactions["item"] > 0).all()
    assert (ds.candidates("test", 5) > 0).all()  # every user here has >= 5 unseen items


def test_same_seed_same_everything_other_seed_other_candidates(synthetic, tmp_path):
    a = prepare_dataset(cfg(synthetic, seed=7), tmp_path / "a")
    b = prepare_dataset(cfg(synthetic, seed=7), tmp_path / "b")
    c = prepare_dataset(cfg(synthetic, seed=8), tmp_path / "c")
    assert a.fingerprint == b.fingerprint
    for name in ("interactions.parquet", "users.parquet", "items.parquet", "candidates_test_5.npy"):
        assert file_hash(a.path / name) == file_hash(b.path / name)
    assert file_hash(a.path / "items.parquet") == file_hash(c.path / "items.parquet")
    assert not np.array_equal(a.candidates("test", 5), c.candidates("test", 5))


def test_candidates_are_unseen_unique_and_truth_first(synthetic, tmp_path):
    ds = prepare_dataset(cfg(synthetic, negatives=[5, 15]), tmp_path / "run")
    for split in ("valid", "test"):
        for n in (5, 15):
            cand = ds.candidates(split, n)
            assert (cand[:, 0] == ds.target(split)).all()
            for u, row in enumerate(cand):
                neg = row[1:][row[1:] > 0]
                assert len(set(neg)) == len(neg)
                assert not set(neg) & set(ds.sequences[u])


@pytest.mark.parametrize("users_per_block", [1, 10**6])
def test_short_candidate_lists_are_padded_and_recorded(tmp_path, monkeypatch, users_per_block):
    monkeypatch.setattr("eval.dataset.CANDIDATE_BLOCK_BYTES", 8 * 5 * users_per_block)  # rows of 4 negatives
    rows = [("a", str(i), 5, i) for i in range(6)] + [("b", "0", 5, 1), ("b", "1", 5, 2), ("b", "2", 5, 3)]
    ds = prepare_dataset(cfg(write_atomic(tmp_path / "d", "d", rows), negatives=[4]), tmp_path / "run")
    cand = ds.candidates("test", 4)
    assert (cand[0, 1:] == 0).all()           # user a has seen every item: no negatives left
    assert sorted(cand[1, 1:]) == [0, 4, 5, 6]  # user b: all 3 unseen items, then padding
    assert ds.manifest["counts"]["users_with_short_candidate_lists"]["test_4"] == 2


@pytest.mark.parametrize("users_per_block", [1, 3, 10**6])
def test_candidates_drawn_in_blocks_of_users_are_the_whole_arrays_bytes(synthetic, tmp_path, monkeypatch,
                                                                         users_per_block):
    """A data stage draws and writes candidate lists a block of users at a time (bounded memory at
    Amazon scale); the file is np.save's of the list drawn for every user at once."""
    monkeypatch.setattr("eval.dataset.CANDIDATE_BLOCK_BYTES", 8 * 16 * users_per_block)
    ds = prepare_dataset(cfg(synthetic, negatives=[5, 15]), tmp_path / "run")
    assert ds.num_users % 3  # the last block is a short one
    for split in ("valid", "test"):
        for n in (5, 15):
            whole = sample_candidates(ds.sequences, ds.target(split), ds.num_items, n, 42, split)
            np.save(tmp_path / "whole.npy", whole)
            assert (tmp_path / "whole.npy").read_bytes() == (ds.path / f"candidates_{split}_{n}.npy").read_bytes()


def test_save_npy_rows_refuses_blocks_that_do_not_make_the_array(tmp_path):
    save_npy_rows(tmp_path / "a.npy", (3, 2), np.int64, [np.ones((2, 2)), np.zeros((1, 2))])
    assert np.load(tmp_path / "a.npy").tolist() == [[1, 1], [1, 1], [0, 0]]
    with pytest.raises(ValueError, match="2 rows written for an array of 3"):
        save_npy_rows(tmp_path / "b.npy", (3, 2), np.int64, [np.ones((2, 2))])
    with pytest.raises(ValueError, match="a block of shape"):
        save_npy_rows(tmp_path / "b.npy", (3, 2), np.int64, [np.ones((3, 1))])
    assert not (tmp_path / "b.npy").exists()  # nothing half-written left behind


def test_rationale_prefixes_by_hand():
    """The end prefix is rationale_history's; earlier cuts are evenly spaced below it, at least 3 items long."""
    lengths = [23, 9, 5, 2]        # rationale_history lengths 20, 6, 2 and 0
    inter = pd.DataFrame({"user": np.repeat(np.arange(4), lengths), "item": np.arange(1, sum(lengths) + 1)})
    ds = SeqDataset(Path("."), inter, pd.DataFrame({"user": range(4)}), pd.DataFrame(), {})
    assert [ds.rationale_prefixes(u) for u in range(4)] == [[20], [6], [2], [0]]
    assert ds.rationale_prefixes(0, 4) == [5, 10, 15, 20]
    assert ds.rationale_prefixes(1, 4) == [3, 4, 6]            # 6 // 4 = 1 item is too short to write from
    assert ds.rationale_prefixes(2, 4) == [2] and ds.rationale_prefixes(3, 4) == [0]
    many = ds.rationale_prefixes(0, 40)                         # more cuts than lengths: each length once
    assert many == sorted(set(many)) and many[0] == 3 and many[-1] == 20 and len(many) == 18
    for u in range(4):                                          # the end prefix is exactly what the rationale saw
        assert np.array_equal(ds.sequences[u][:ds.rationale_prefixes(u, 3)[-1]], ds.rationale_history(u))


def test_k_core_is_iterative():
    # one pass keeps item x (2 users) but drops user c (1 item); then x has 1 user -> dropped, and so on
    inter = pd.DataFrame({"user_id": ["a", "a", "b", "b", "c"], "item_id": ["x", "y", "y", "z", "x"]})
    out = k_core(inter, user_core=2, item_core=2)
    assert out.empty
    one_pass_users = inter["user_id"].map(inter["user_id"].value_counts()) >= 2
    assert one_pass_users.sum() == 4  # a single pass would have kept something


def test_rating_threshold_and_dedup(tmp_path):
    rows = [("a", "1", 5, 1), ("a", "2", 3, 2), ("a", "1", 5, 3), ("a", "3", 4, 4), ("a", "4", 4, 5)]
    ds = prepare_dataset(cfg(write_atomic(tmp_path / "d", "d", rows), rating_gt=3.0, negatives=[1]),
                         tmp_path / "run")
    assert sorted(ds.items["raw_id"]) == ["1", "3", "4"]
    assert len(ds.sequences[0]) == 3  # the repeated (a, 1) is kept once


def test_item_text_is_kept(synthetic, tmp_path):
    ds = prepare_dataset(cfg(synthetic), tmp_path / "run")
    row = ds.items.iloc[0]
    assert row["title"].startswith("Movie") and "Drama" in row["text"] and row["year"] in row["text"]
    assert ds.item_texts()[0] == "" and len(ds.item_texts()) == ds.num_items + 1


def test_embedded_ml100k_loads():
    inter, items = load_recbole(__import__("eval.assets", fromlist=["x"]).recbole_dataset("ml-100k"))
    assert len(inter) == 100_000 and inter["user_id"].nunique() == 943 and len(items) == 1682


def test_movielens_raw_formats(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t100\n1\t20\t4\t50\n")
    (tmp_path / "u.item").write_text("10|Heat (1995)|01-Jan-1995||url|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n")
    inter, items = load_movielens(tmp_path)
    assert list(inter["item_id"]) == ["10", "20"]
    assert items.iloc[0].to_dict() == {"item_id": "10", "title": "Heat", "categories": "Action",
                                       "brand": "", "year": "1995"}
    m1 = tmp_path / "m1"
    m1.mkdir()
    (m1 / "ratings.dat").write_text("1::10::5::100\n")
    (m1 / "movies.dat").write_text("10::Heat (1995)::Action|Crime\n")
    inter, items = load_movielens(m1)
    assert items.iloc[0]["categories"] == "Action, Crime" and inter.iloc[0]["rating"] == 5.0


def _gz_lines(path, objs):
    with gzip.open(path, "wt") as f:
        for o in objs:
            f.write(o if isinstance(o, str) else json.dumps(o) + "\n")
    return path


def test_amazon_2018_and_2023(tmp_path):
    r18 = _gz_lines(tmp_path / "r18.json.gz", [{"reviewerID": "A", "asin": "X", "overall": 5.0, "unixReviewTime": 1}])
    m18 = _gz_lines(tmp_path / "m18.json.gz", [{"asin": "X", "title": "Pen", "category": ["Office", "Pens"], "brand": "Bic"}])
    inter, items = load_amazon(r18, m18)
    assert inter.iloc[0]["item_id"] == "X"
    assert items.iloc[0][["title", "categories", "brand"]].tolist() == ["Pen", "Office, Pens", "Bic"]
    r23 = _gz_lines(tmp_path / "r23.jsonl.gz", [{"user_id": "A", "asin": "X1", "parent_asin": "P", "rating": 4.0, "timestamp": 1700000000000}])
    m23 = _gz_lines(tmp_path / "m23.jsonl.gz", [{"parent_asin": "P", "title": "Lamp", "categories": ["Home"], "store": "Ikea"}])
    inter, items = load_amazon(r23, m23)
    assert inter.iloc[0]["item_id"] == "P" and items.iloc[0]["brand"] == "Ikea"


# --- bad input: one line naming the place, nothing partial left behind ----------------------------

def _no_partial(parent):
    assert not [p for p in parent.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.*not found"):
        prepare_dataset(cfg(tmp_path / "nope"), tmp_path / "run")
    assert not (tmp_path / "run" / "data").exists()
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = _gz_lines(tmp_path / "r.json.gz", [{"reviewerID": "A", "asin": "X", "overall": 5, "unixReviewTime": 1},
                                              "{not json\n"])
    with pytest.raises(InputError, match=r"r\.json\.gz:2: malformed JSON"):
        prepare_dataset(cfg(path, format="amazon"), tmp_path / "run")
    assert not (tmp_path / "run" / "data").exists()
    _no_partial(tmp_path / "run")


def test_missing_field_in_json(tmp_path):
    path = _gz_lines(tmp_path / "r.json.gz", [{"reviewerID": "A", "overall": 5, "unixReviewTime": 1}])
    with pytest.raises(InputError, match=r":1: missing field 'parent_asin' or 'asin'"):
        load_amazon(path)


def test_missing_column(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "d.inter").write_text("user_id:token\titem_id:token\n1\t2\n")
    with pytest.raises(InputError, match=r"d\.inter: missing column 'timestamp'"):
        prepare_dataset(cfg(folder), tmp_path / "run")


def test_bad_number_names_line_and_field(tmp_path):
    folder = write_atomic(tmp_path / "d", "d", [("a", "1", 5, 1), ("a", "2", "five", 2)])
    with pytest.raises(InputError, match=r"d\.inter:3: field 'rating'"):
        prepare_dataset(cfg(folder), tmp_path / "run")


def test_empty_after_filtering_keeps_previous_output(synthetic, tmp_path):
    run = tmp_path / "run"
    good = prepare_dataset(cfg(synthetic), run)
    before = file_hash(run / "data")
    with pytest.raises(InputError, match="no interactions left after filtering"):
        prepare_dataset(cfg(synthetic, user_core=100), run)
    assert file_hash(run / "data") == before and load_dataset(run / "data").num_users == good.num_users
    _no_partial(run)
    _no_partial(tmp_path)


def test_atomic_writes_get_the_modes_a_plain_write_would(tmp_path):
    (tmp_path / "plain").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    write_json(tmp_path / "a.json", {"a": 1})
    with atomic_dir(tmp_path / "model") as tmp:
        write_json(tmp / "config.json", {})
    def mode(p):
        return p.stat().st_mode & 0o777

    assert mode(tmp_path / "a.json") == mode(tmp_path / "model" / "config.json") == mode(tmp_path / "plain")
    assert mode(tmp_path / "model") == mode(tmp_path / "plain_dir")
