"""Bad values in raw data files: one InputError naming the file, the line and the field, never a
traceback and never a data set that is silently wrong (a dropped row, a null as the test item)."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from eval.dataset import prepare_dataset
from eval.errors import InputError
from eval.loaders import load_amazon, load_movielens, load_recbole, load_source
from eval.preprocess import PrepareConfig, attach_item_text, prepare
from slim.prompts import item_line
from tests.conftest import write_atomic

REPO = Path(__file__).resolve().parent.parent
R18 = {"reviewerID": "A", "asin": "X", "overall": 5.0, "unixReviewTime": 1}
R23 = {"user_id": "A", "asin": "X1", "parent_asin": "P", "rating": 4.0, "timestamp": 1700000000000}


def _jsonl(path: Path, rows: list) -> Path:
    """JSON lines, gzipped when the name ends in .gz; a str row is written as is."""
    text = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def meta(tmp_path):
    return _jsonl(tmp_path / "meta.json.gz", [{"asin": "X", "title": "Pen"}, {"parent_asin": "P", "title": "Lamp"}])


def _error(call) -> str:
    with pytest.raises(InputError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def cfg(source, **kw):
    base = dict(source=str(source), rating_gt=None, user_core=1, item_core=1, negatives=[1])
    return PrepareConfig(**{**base, **kw})


def _nothing_left(run: Path) -> None:
    """No data folder and no temporary one: a failed prepare leaves the run as it was."""
    assert not (run / "data").exists() and not (run.exists() and any(run.iterdir()))


# 1. a value of the wrong type ---------------------------------------------------------------------

def test_rating_of_wrong_type_names_file_line_and_field(tmp_path, meta):
    path = _jsonl(tmp_path / "r.json.gz", [R18, {**R18, "overall": "five"}])
    assert _error(lambda: load_amazon(path, meta)) == f"{path}:2: field 'overall' is not a number: 'five'"


@pytest.mark.parametrize("row,field,problem", [
    ({**R18, "overall": True}, "overall", "is not a number: True"),
    ({**R18, "overall": [5]}, "overall", "is not a number: [5]"),
    ({**R18, "unixReviewTime": "2014-01-01"}, "unixReviewTime", "is not a number: '2014-01-01'"),
    ({**R18, "reviewerID": 3.5}, "reviewerID", "is not an id"),
    ({**R18, "asin": ""}, "asin", "is not an id"),
    ({**R23, "rating": "four"}, "rating", "is not a number: 'four'"),
    ({**R23, "parent_asin": {"id": 1}}, "parent_asin", "is not an id"),
    ({**R23, "user_id": None}, "user_id", "is not an id"),
])
def test_every_field_is_checked_where_it_is_read(tmp_path, meta, row, field, problem):
    path = _jsonl(tmp_path / "r.jsonl", [R18, R18, row])
    msg = _error(lambda: load_amazon(path, meta))
    assert msg.startswith(f"{path}:3: field '{field}' {problem}"), msg


# 2. and 3. nulls are errors, not a last-sorted test item or a dropped row -------------------------

def test_null_timestamp_is_an_error_not_the_test_item(tmp_path, meta):
    path = _jsonl(tmp_path / "r.json", [R18, {**R18, "asin": "Y", "unixReviewTime": 2},
                                        {**R18, "asin": "Z", "unixReviewTime": None}])
    msg = _error(lambda: prepare_dataset(cfg(path, meta=str(meta)), tmp_path / "run"))
    assert msg == f"{path}:3: field 'unixReviewTime' is not a number: null"
    _nothing_left(tmp_path / "run")


def test_null_rating_is_an_error_not_a_dropped_row(tmp_path, meta):
    path = _jsonl(tmp_path / "r.jsonl.gz", [R23, {**R23, "rating": None}])
    assert _error(lambda: load_amazon(path, meta)) == f"{path}:2: field 'rating' is not a number: null"


# 4. files that are not what their name says ------------------------------------------------------

def _not_gzipped(path: Path) -> Path:
    """A JSON line that would do as a review or as metadata, in a file named .gz but not gzipped."""
    path.write_text(json.dumps({**R18, "title": "Pen"}) + "\n")
    return path


@pytest.mark.parametrize("bad", ["reviews", "meta"])
def test_gz_file_that_is_not_gzip(tmp_path, meta, bad):
    files = {"reviews": _jsonl(tmp_path / "r.json.gz", [R18]), "meta": meta}
    files[bad] = _not_gzipped(tmp_path / f"plain_{bad}.json.gz")
    msg = _error(lambda: load_amazon(files["reviews"], files["meta"]))
    assert msg.startswith(f"{files[bad]}: not a gzip file ("), msg


def test_truncated_gzip(tmp_path, meta):
    data = gzip.compress((json.dumps(R18) + "\n").encode() * 1000)
    path = tmp_path / "r.json.gz"
    path.write_bytes(data[:len(data) // 2])
    assert _error(lambda: load_amazon(path, meta)).startswith(f"{path}: truncated or corrupt gzip file (")


@pytest.mark.parametrize("name", ["r.json", "r.json.gz"])
def test_non_utf8_line_is_named(tmp_path, meta, name):
    raw = (json.dumps(R18) + "\n").encode() + '{"reviewerID": "Jos\xe9"}\n'.encode("latin-1")
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    assert _error(lambda: load_amazon(path, meta)).startswith(f"{path}:2: not UTF-8 text (")


def test_bad_id_in_metadata_is_named(tmp_path):
    reviews = _jsonl(tmp_path / "r.json.gz", [R18])
    meta = _jsonl(tmp_path / "m.json.gz", [{"asin": "X", "title": "Pen"}, {"asin": None, "title": "Cup"}])
    assert _error(lambda: load_amazon(reviews, meta)) == f"{meta}:2: field 'asin' is not an id " \
                                                         f"(a non-empty string or an integer): null"


# 5. reviews without metadata have no titles --------------------------------------------------------

@pytest.mark.parametrize("row", [R18, R23], ids=["2018", "2023"])
def test_amazon_reviews_without_meta_is_an_error(tmp_path, row):
    path = _jsonl(tmp_path / "r.json.gz", [row])
    msg = _error(lambda: load_source(str(path)))  # what prepare reads with: format auto, meta None
    assert msg.startswith(f"{path}: Amazon reviews have no item titles") and "--meta" in msg and "data.meta" in msg


# 6. an item without metadata is named by its id in prompts, as in the item text -------------------

def test_item_without_title_is_named_by_its_id(tmp_path, meta):
    rows = [{**R18, "asin": a, "unixReviewTime": t} for t, a in enumerate(["X", "Y", "X", "Y"])]
    raw_inter, raw_items = load_amazon(_jsonl(tmp_path / "r.json.gz", rows), meta)
    items = attach_item_text(prepare(cfg("r", dedup=False), raw_inter)[2], raw_items)  # as the data stage does
    lines = {row["raw_id"]: item_line(row) for _, row in items.iterrows()}  # as PromptBuilder renders them
    assert lines == {"X": "- Pen", "Y": "- item Y"}
    assert dict(zip(items["raw_id"], items["text"])) == {"X": "Pen", "Y": "item Y"}
    # a titled item renders as before, and does not even need a raw id
    titled = pd.Series({"item": 1, "title": "Fargo", "categories": "Crime", "brand": "", "year": 1996})
    assert item_line(titled) == "- Fargo (1996); Crime"


# 7. text formats: non-numbers, NaN and inf are refused the same way -------------------------------

BAD_NUMBERS = ["five", "nan", "NaN", "inf", "-inf", ""]


@pytest.mark.parametrize("value", BAD_NUMBERS)
@pytest.mark.parametrize("field", ["rating", "timestamp"])
def test_recbole_bad_number(tmp_path, field, value):
    row = ("a", "2", value, 2) if field == "rating" else ("a", "2", 5, value)
    folder = write_atomic(tmp_path / "d", "d", [("a", "1", 5, 1), row])
    msg = _error(lambda: load_recbole(folder))
    assert msg == f"{folder / 'd.inter'}:3: field '{field}' is not a number: {value!r}"


@pytest.mark.parametrize("value", BAD_NUMBERS)
@pytest.mark.parametrize("layout", ["u.data", "ratings.dat"])
def test_movielens_bad_number(tmp_path, layout, value):
    sep = "\t" if layout == "u.data" else "::"
    (tmp_path / layout).write_text(f"{sep.join(['1', '10', '5', '100'])}\n{sep.join(['1', '20', value, '100'])}\n")
    msg = _error(lambda: load_movielens(tmp_path))
    assert msg == f"{tmp_path / layout}:2: field 'rating' is not a number: {value!r}"


@pytest.mark.parametrize("value", ['"nan"', '"inf"', "NaN", "Infinity", "-Infinity", "1e999"])
def test_amazon_nan_and_inf_are_refused(tmp_path, meta, value):
    # bare NaN, Infinity and 1e999 are what Python's json reads as non-finite floats
    path = _jsonl(tmp_path / "r.jsonl", [R18, json.dumps(R18).replace("5.0", value) + "\n"])
    assert _error(lambda: load_amazon(path, meta)).startswith(f"{path}:2: field 'overall' is not a number: ")


# a valid file still loads -------------------------------------------------------------------------

def test_valid_amazon_2018_with_meta_loads(tmp_path, meta):
    rows = [R18, {**R18, "asin": "Y", "overall": "4.0", "unixReviewTime": "2"},  # numeric strings are numbers
            {"reviewerID": 7, "asin": "X", "overall": 3, "unixReviewTime": 3}]  # an integer id is an id
    inter, items = load_amazon(_jsonl(tmp_path / "r.json.gz", rows), meta)
    assert inter.to_dict("list") == {"user_id": ["A", "A", "7"], "item_id": ["X", "Y", "X"],
                                     "rating": [5.0, 4.0, 3.0], "timestamp": [1.0, 2.0, 3.0]}
    assert dict(zip(items["item_id"], items["title"])) == {"X": "Pen", "P": "Lamp"}


# the real command line: one line on stderr, exit 1, nothing left behind ---------------------------

@pytest.mark.parametrize("case", ["wrong type", "not gzip", "no meta"])
def test_cli_prepare_reports_one_line(tmp_path, meta, case):
    reviews = _jsonl(tmp_path / "r.json.gz", [R18, {**R18, "overall": "five"} if case == "wrong type" else R18])
    if case == "not gzip":
        reviews = _not_gzipped(tmp_path / "p.json.gz")
    run = tmp_path / "run"
    args = ["prepare", "--run", str(run), "--source", str(reviews)]
    args += [] if case == "no meta" else ["--meta", str(meta)]
    proc = subprocess.run([sys.executable, "-m", "fusion.cli", *args], cwd=REPO, capture_output=True, text=True)
    expected = {"wrong type": f"{reviews}:2: field 'overall' is not a number: 'five'",
                "not gzip": f"{reviews}: not a gzip file (",
                "no meta": f"{reviews}: Amazon reviews have no item titles"}[case]
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"error: {expected}"), proc.stderr
    _nothing_left(run)
