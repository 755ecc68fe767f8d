"""Property-style: every reader of a user's file, fed generated malformed input (empty, truncated, a
value of the wrong type, a folder in its place, invalid Unicode, huge values), either reads it or
raises one InputError line naming the file, and a failed read writes nothing.

Hypothesis draws the damage. The readers are called in-process (a command starts in ~10 s here: the
real commands get the same kinds of input in test_bad_input_data.py's table); a data set goes through
the data stage itself, so "nothing written" is the run folder after a failed prepare.
"""
from __future__ import annotations

import gzip
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from eval.dataset import prepare_dataset
from eval.errors import InputError
from eval.preprocess import PrepareConfig
from eval.registry import load_model
from slim.records import RecordLog, read_records

EXAMPLES = settings(max_examples=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# values of the wrong type and huge ones, as a field of a JSON line or a cell of a text file holds them
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.lists(st.integers(0, 9), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                                       st.integers(), max_size=1),
    st.text(max_size=6), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10 ** 400, -10 ** 400, 1e308, -1e308, "9" * 400, "1e999", "-inf", "\ud800", "a\udfffb", ""]))
# damage to a file's bytes once written; "value" puts an odd value in one field of one line instead
DAMAGE = st.one_of(
    st.tuples(st.just("empty")), st.tuples(st.just("folder")),
    st.tuples(st.just("truncate"), st.floats(0.05, 0.95)),
    st.tuples(st.just("bytes"), st.floats(0, 1), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])),
    st.tuples(st.just("value"), st.integers(0, 30), st.integers(0, 5), ODD_VALUES))


def damaged(path: Path, damage: tuple) -> None:
    """Apply byte-level damage to a written file (a "value" damage is applied when rows are written)."""
    data = path.read_bytes()
    if damage[0] == "empty":
        path.write_bytes(b"")
    elif damage[0] == "folder":
        path.unlink()
        path.mkdir()
    elif damage[0] == "truncate":
        path.write_bytes(data[:int(len(data) * damage[1])])
    elif damage[0] == "bytes":
        at = int(len(data) * damage[1])
        path.write_bytes(data[:at] + damage[2] + data[at:])


def with_value(rows: list[list[Any]], damage: tuple) -> list[list[Any]]:
    """`rows` with one field replaced by the damage's odd value (when the damage is of that kind)."""
    if damage[0] != "value":
        return rows
    _, line, field, value = damage
    rows = [list(r) for r in rows]
    row = rows[line % len(rows)]
    row[field % len(row)] = value
    return rows


def cell(value: Any) -> str:
    """A value as a text-file cell (a string with a lone surrogate as its escape: files hold bytes)."""
    return value.encode("utf-8", "backslashreplace").decode() if isinstance(value, str) else str(value)


def one_line_naming(error: InputError, folder: Path) -> None:
    msg = str(error)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    assert str(folder) in msg, msg  # the file (or the folder) it is about
    event("refused: " + re.sub(r"\d+", "N", msg.replace(str(folder), ""))[:90])  # --hypothesis-show-statistics


def prepared_or_one_line(source: Path, folder: Path, **kw: Any) -> None:
    """The data stage either writes a whole data set with valid text or fails with one line, leaving the
    run as it was."""
    run = folder / "run"
    cfg = PrepareConfig(source=str(source), rating_gt=None, user_core=1, item_core=1, negatives=[1], **kw)
    try:
        ds = prepare_dataset(cfg, run)
    except InputError as e:
        one_line_naming(e, folder)
        assert not run.exists() or not any(run.iterdir()), sorted(run.rglob("*"))
        return
    for text in ds.items["text"]:
        text.encode("utf-8")  # strict: a lone surrogate would raise here


INTERACTIONS = [[f"u{u}", f"i{(u + t) % 6}", 5, 1000 + t] for u in range(4) for t in range(5)]
TITLES = [[f"i{i}", f"Movie {i} (199{i})", "Drama"] for i in range(6)]


@EXAMPLES
@given(damage=DAMAGE, target=st.sampled_from(["inter", "item"]))
def test_recbole_files(damage, target):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "d"
        folder.mkdir()
        rows = {"inter": INTERACTIONS, "item": TITLES}
        header = {"inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float",
                  "item": "item_id:token\tmovie_title:token_seq\tclass:token_seq"}
        for name, table in rows.items():
            table = with_value(table, damage) if name == target else table
            (folder / f"d.{name}").write_text("\n".join([header[name], *("\t".join(map(cell, r)) for r in table)]) + "\n")
        damaged(folder / f"d.{target}", damage)
        prepared_or_one_line(folder, Path(tmp))


@EXAMPLES
@given(damage=DAMAGE, layout=st.sampled_from(["100k", "1m"]), target=st.sampled_from(["ratings", "items"]))
def test_movielens_files(damage, layout, target):
    sep, files = ("\t", ("u.data", "u.item")) if layout == "100k" else ("::", ("ratings.dat", "movies.dat"))
    item_rows = [[i, title, "01-Jan-1995", "", "", *(["0", "1"] * 10)[:19]] if layout == "100k" else [i, title, g]
                 for i, title, g in TITLES]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ml"
        folder.mkdir()
        for name, table, s in ((files[0], INTERACTIONS, sep), (files[1], item_rows, "|" if layout == "100k" else sep)):
            table = with_value(table, damage) if name == files[target == "items"] else table
            (folder / name).write_text("".join(s.join(map(cell, r)) + "\n" for r in table), encoding="latin-1",
                                       errors="backslashreplace")
        damaged(folder / files[target == "items"], damage)
        prepared_or_one_line(folder / files[0] if target == "ratings" else folder, Path(tmp))


def write_json_lines(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)  # a lone surrogate is written as its JSON escape
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


AMAZON = {"2018": ("reviewerID", "asin", "overall", "unixReviewTime"),
          "2023": ("user_id", "parent_asin", "rating", "timestamp")}


@EXAMPLES
@given(damage=DAMAGE, version=st.sampled_from(sorted(AMAZON)), target=st.sampled_from(["reviews", "meta"]),
       gz=st.booleans())
def test_amazon_files(damage, version, target, gz):
    keys = AMAZON[version]
    reviews = [dict(zip(keys, [u, i, r, t * 1000 if version == "2023" else t])) for u, i, r, t in INTERACTIONS]
    meta = [{keys[1]: i, "title": title, "categories": [g]} for i, title, g in TITLES]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = {"reviews": folder / f"reviews.json{'.gz' if gz else ''}", "meta": folder / "meta.jsonl"}
        for name, rows in (("reviews", reviews), ("meta", meta)):
            if name == target and damage[0] == "value":
                rows = [dict(zip(r, v)) for r, v in zip(rows, with_value([list(r.values()) for r in rows], damage))]
            write_json_lines(paths[name], rows)
        damaged(paths[target], damage)
        prepared_or_one_line(paths["reviews"], folder, meta=str(paths["meta"]))


RECORD = {"user": 0, "prompt_version": "v", "model": "m", "step1": "a", "step2": "b", "step3": "c", "text": "t",
          "error": None}


@EXAMPLES
@given(damage=DAMAGE)
def test_rationale_records(damage):
    rows = with_value([list({**RECORD, "user": u}.values()) for u in range(4)], damage)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.jsonl"
        path.write_text("".join(json.dumps(dict(zip(RECORD, r))) + "\n" for r in rows))
        damaged(path, damage)
        before = sorted(p.name for p in Path(tmp).iterdir())
        for read in (read_records, RecordLog):
            try:
                got = read(path)
            except InputError as e:
                one_line_naming(e, Path(tmp))
                continue
            if isinstance(got, RecordLog):
                got.close()
            else:
                json.dumps(got, ensure_ascii=False).encode("utf-8")  # what a writer of the records would do
        assert sorted(p.name for p in Path(tmp).iterdir()) == before


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from slmrec.sasrec import SASRec, SASRecConfig

    folder = tmp_path_factory.mktemp("model") / "sasrec"
    SASRec(SASRecConfig(num_items=6, hidden=8, layers=1, heads=1, max_len=5)).save_pretrained(folder)
    return folder


@EXAMPLES
@given(damage=DAMAGE, target=st.sampled_from(["config.json", "model.safetensors"]))
def test_model_folders(model_folder, damage, target):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sasrec"
        shutil.copytree(model_folder, folder)
        if damage[0] == "value" and target == "config.json":
            cfg = json.loads((folder / target).read_text())
            key = sorted(cfg)[damage[2] % len(cfg)]
            (folder / target).write_text(json.dumps({**cfg, key: damage[3]}))
        elif damage[0] != "value":
            damaged(folder / target, damage)
        try:
            load_model(folder)
        except InputError as e:
            one_line_naming(e, folder)
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in model_folder.iterdir())
