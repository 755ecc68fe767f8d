"""Bad values in raw data files: one InputError naming the file, the line and the field, never a
traceback and never a data set that is silently wrong (a dropped row, a null as the test item)."""
import gzip
import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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


# round 2: odd paths, empty files, text that is not valid Unicode, odd timestamps ---------------------

EMPTY = {"recbole folder": ("d/d.inter", "d"), "recbole .inter file": ("d/d.inter", "d/d.inter"),
         "ml-100k folder": ("ml/u.data", "ml"), "ml-1m ratings.dat": ("ml/ratings.dat", "ml/ratings.dat"),
         "amazon reviews": ("r.jsonl", "r.jsonl"), "amazon reviews .gz": ("r.json.gz", "r.json.gz")}


@pytest.mark.parametrize("fmt", ["auto", "recbole", "movielens", "amazon2018", "amazon2023"])
@pytest.mark.parametrize("case", sorted(EMPTY))
def test_empty_file_in_every_format_is_named_or_its_kind_is(tmp_path, case, fmt):
    """An empty file reads as no data: it is named as empty, whatever the format given (or guessed); a
    format that wants a folder where a file is given (or the reverse) says so instead."""
    empty, source = EMPTY[case]
    (tmp_path / empty).parent.mkdir(exist_ok=True)
    (tmp_path / empty).write_bytes(b"")
    meta = _jsonl(tmp_path / "meta.json", [{"asin": "X", "title": "Pen"}]) if fmt.startswith("amazon") else None
    msg = _error(lambda: load_source(str(tmp_path / source), fmt, meta and str(meta)))
    source = tmp_path / source
    assert msg in (f"{tmp_path / empty}: empty file",
                   f"{source}: is a folder, expected an Amazon reviews file",
                   f"{source}: is a file, expected a MovieLens folder",
                   f"{source}: is a file, expected a RecBole folder or its .inter file",
                   f"{source}: no .inter file (not a RecBole folder)",
                   f"{source}: neither u.data nor ratings.dat (not a MovieLens folder; --format recbole reads a "
                   f"folder of .inter files)"), msg


def test_a_lone_surrogate_in_item_text_is_replaced_where_it_is_read(tmp_path):
    reviews = _jsonl(tmp_path / "r.json", [{**R18, "asin": a, "unixReviewTime": t} for t, a in enumerate("XYX")])
    meta = tmp_path / "m.json"
    meta.write_text('{"asin": "X", "title": "Pen \\ud800 blue", "categories": [["Office", "\\udfff"]]}\n'
                    '{"asin": "Y", "title": "Cup"}\n')
    ds = prepare_dataset(cfg(reviews, meta=str(meta), dedup=False), tmp_path / "run")  # parquet would refuse it
    assert sorted(ds.items["title"]) == ["Cup", "Pen \ufffd blue"] and "Office, \ufffd" in set(ds.items["categories"])


@pytest.mark.parametrize("field", ["reviewerID", "asin"])
def test_a_lone_surrogate_in_an_id_is_refused_with_its_line(tmp_path, meta, field):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(R18) + "\n" + json.dumps(R18).replace(f'"{R18[field]}"', '"A\\ud800"') + "\n")
    assert _error(lambda: load_amazon(path, meta)) == \
        f"{path}:2: field '{field}' is not valid Unicode (a lone surrogate): 'A\\ud800'"


@pytest.mark.parametrize("version", ["2018", "2023"])
def test_negative_and_future_timestamps_are_counted_in_one_warning(tmp_path, meta, capsys, version):
    row, key, unit = (R18, "unixReviewTime", 1) if version == "2018" else (R23, "timestamp", 1000)
    stamps = [-5, 1_600_000_000, 1_700_000_000, 99_999_999_999]  # seconds: one before 1970, one in 5138
    path = _jsonl(tmp_path / "r.json", [{**row, key: t * unit} for t in stamps])
    inter, _ = load_amazon(path, meta)
    assert len(inter) == 4  # kept
    assert capsys.readouterr().err.splitlines() == [f"warning: {path}: 2 of 4 timestamps are negative or more "
                                                    f"than a year in the future (kept as they are)"]
    load_amazon(_jsonl(tmp_path / "ok.json", [{**row, key: t * unit} for t in stamps[1:3]]), meta)
    assert capsys.readouterr().err == ""


REAL = {"dir as .gguf", "file as --model", "odd timestamps"}  # one per program


def _process(args: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of `python -m <args>`, run as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return proc.returncode, proc.stderr


def _in_process(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """The same through the command's entry point (`guarded`'s main) in this process: a process costs
    ~10 s of imports here."""
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as e:
        importlib.import_module(args[0]).main()
    return e.value.code, capsys.readouterr().err


def test_cli_table_of_odd_paths_empty_files_and_odd_text(tmp_path, monkeypatch, capsys):
    """The closing note's table, as a new user meets it: one line naming the path (and the setting),
    exit 1, nothing left behind; a warning and exit 0 where going on is right. The cases in REAL run
    as processes, side by side."""
    t = tmp_path
    rows = [{**R18, "reviewerID": f"U{u}", "asin": f"X{(u + i) % 4}", "unixReviewTime": 1000 + i}
            for u in range(3) for i in range(4)]
    reviews, meta = _jsonl(t / "r.json", rows), _jsonl(t / "m.json", [{"asin": f"X{i}", "title": "Pen"} for i in range(4)])
    _jsonl(t / "odd_ts.json", [{**r, "unixReviewTime": -r["unixReviewTime"]} if r["reviewerID"] == "U0" else r
                               for r in rows])
    (t / "surrogate_title.json").write_text(meta.read_text().replace('"Pen"', '"Pen \\ud800"', 1))
    for name in ("empty.json", "afile"):
        (t / name).write_text("" if name == "empty.json" else "x\n")
    for folder in ("adir", "dir.toml", "dir.gguf", "ml"):
        (t / folder).mkdir()
    (t / "ml" / "u.data").write_text("")
    prepare = ["fusion.cli", "prepare", "--user-core", "1", "--item-core", "1", "--rating-gt", "none"]
    cases = {  # args -> (exit code, stderr)
        "dir as --meta": ([*prepare, "--run", f"{t}/run1", "--source", str(reviews), "--meta", f"{t}/adir"],
                          1, f"error: {t}/adir: is a folder, expected a metadata file (data.meta)"),
        "file as --run": ([*prepare, "--run", f"{t}/afile"], 1, f"error: {t}/afile: is a file, expected a run folder"),
        "dir as --preset": (["fusion.cli", "run", "--run", f"{t}/run2", "--preset", f"{t}/dir.toml"],
                            1, f"error: {t}/dir.toml: is a folder, expected a preset file"),
        "file as model folder": (["slim.cli", "encode", "--run", f"{t}/run3", "--model", f"{t}/afile"], 1,
                                 f"error: {t}/afile: is a file, expected a sentence-transformers folder "
                                 f"(vectors.model)"),
        "dir as .gguf": (["slmrec.cli", "train-teacher", "--run", f"{t}/run4", "--model.base", f"{t}/dir.gguf"], 1,
                         f"error: {t}/dir.gguf: is a folder, expected a model folder or .gguf file "
                         f"(slmrec-teacher.model.base)"),
        "file as --model": (["slim.cli", "serve", "--model", f"{t}/afile"], 1,
                            f"error: {t}/afile: is a file, expected a model folder (--model)"),
        "file as served model": (["slim.cli", "generate-rationales", "--run", f"{t}/run5", "--serve", f"{t}/afile"], 1,
                                 f"error: {t}/afile: is a file, expected a model folder to serve "
                                 f"(slim-teacher-rationales.serve)"),
        "file as recommend --run": (["fusion.cli", "recommend", "--run", f"{t}/afile", "--user", "1"], 1,
                                    f"error: {t}/afile: is a file, expected a run folder"),
        "empty, guessed amazon": ([*prepare, "--run", f"{t}/run6", "--source", f"{t}/empty.json"], 1,
                                  f"error: {t}/empty.json: empty file"),
        "empty u.data": ([*prepare, "--run", f"{t}/run7", "--source", f"{t}/ml", "--format", "movielens"], 1,
                         f"error: {t}/ml/u.data: empty file"),
        "empty, wrong --format": ([*prepare, "--run", f"{t}/run8", "--source", f"{t}/empty.json", "--format",
                                   "movielens"], 1, f"error: {t}/empty.json: is a file, expected a MovieLens folder"),
        "surrogate in title": ([*prepare, "--run", f"{t}/ok1", "--source", str(reviews), "--meta",
                                f"{t}/surrogate_title.json"], 0, ""),
        "odd timestamps": ([*prepare, "--run", f"{t}/ok2", "--source", f"{t}/odd_ts.json", "--meta", str(meta)], 0,
                           f"warning: {t}/odd_ts.json: 4 of 12 timestamps are negative or more than a year in the "
                           f"future (kept as they are)"),
    }
    with ThreadPoolExecutor(len(REAL)) as pool:
        real = {name: pool.submit(_process, cases[name][0]) for name in REAL}
        got = {name: _in_process(args, monkeypatch, capsys) for name, (args, _, _) in cases.items() if name not in REAL}
        got.update({name: future.result() for name, future in real.items()})
    for name, (_, code, stderr) in cases.items():
        assert (got[name][0], got[name][1].strip()) == (code, stderr), (name, got[name][1][-2000:])
    left = {p.name: sorted(p.rglob("*")) for p in t.iterdir() if p.name.startswith("run")}
    assert all(files == [] for files in left.values()), left  # at most the run folder a stage made, empty
    assert pd.read_parquet(t / "ok1" / "data" / "items.parquet")["title"].str.contains("\ufffd").sum() == 1


def test_every_path_setting_is_a_field_of_a_stage_config():
    """PATH_SETTINGS names config classes by name: a renamed class or field would silently go unchecked."""
    import dataclasses
    import typing

    from eval.cli import PATH_SETTINGS
    from fusion.pipeline import PIPELINE

    found: dict[str, set[str]] = {}

    def walk(cls: type) -> None:
        for c in cls.__mro__:
            if dataclasses.is_dataclass(c):
                found[c.__name__] = {f.name for f in dataclasses.fields(c)}
        for hint in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(hint):
                walk(hint)
    for stage in PIPELINE:
        walk(stage.config_class)
    for name, paths in PATH_SETTINGS.items():
        assert name in found and set(paths) <= found[name], name
