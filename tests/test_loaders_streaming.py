"""The streaming Amazon reader (msgspec pieces, Python reader for the odd ones) against the line-by-line
Python reader it replaces: the same frames, the same prepared data folder byte for byte, and the same
one-line error for a bad line wherever it falls (a small READ_BYTES puts it in a later piece)."""
from __future__ import annotations

import contextlib
import functools
import gzip
import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eval.loaders as loaders
from eval.dataset import prepare_dataset
from eval.errors import InputError
from eval.io import file_hash
from eval.loaders import load_amazon
from eval.preprocess import PrepareConfig, prepare


@contextlib.contextmanager
def pieces_of(size: int):
    """The stream reads `size` bytes at a time (a few lines a piece) while inside."""
    before = loaders.READ_BYTES
    loaders.READ_BYTES = size
    try:
        yield
    finally:
        loaders.READ_BYTES = before


def _line(k: int, x: dict | str | bytes) -> bytes:
    """A row as JSON, every other one with its non-ASCII text unescaped (escaped where it cannot be: a
    lone surrogate); a str or bytes line as it is."""
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode()
    text = json.dumps(x, ensure_ascii=k % 2 == 0)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        return json.dumps(x).encode() + b"\n"


def write(path: Path, lines: list) -> Path:
    """JSON lines, gzipped when the name ends in .gz."""
    data = b"".join(_line(k, x) for k, x in enumerate(lines))
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def outcome(call) -> tuple:
    """("ok", the frames as plain lists) or ("error", the message)."""
    try:
        inter, items = call()
    except InputError as e:
        return "error", str(e)
    inter, items = (frame.astype({c: str for c, t in frame.dtypes.items() if isinstance(t, pd.CategoricalDtype)})
                    for frame in (inter, items))  # the stream's ids, categories, brand and year are categorical
    inter = inter.astype({"rating": float})  # and its ratings float32 where that holds them exactly
    return "ok", inter.to_dict("list"), items.to_dict("list"), list(inter.dtypes.astype(str)), list(items.dtypes.astype(str))


def both(reviews: Path, meta: Path | None) -> tuple[tuple, tuple]:
    return (outcome(lambda: load_amazon(reviews, meta)), outcome(lambda: load_amazon(reviews, meta, engine="python")))


# --- a synthetic Amazon-2023 dump with the odd cases ------------------------------------------------

def dump(folder: Path, gz: bool, n: int = 600, seed: int = 0) -> tuple[Path, Path]:
    """Reviews and metadata in the 2023 layout, with 2018-style lines, missing optional fields, unicode
    (escaped and raw, emoji, a lone surrogate in text), duplicate reviews, blank and CRLF lines, numbers
    in strings, integer ids, equal timestamps and a line longer than a piece."""
    rng = random.Random(seed)
    users = [f"A{rng.getrandbits(60):015X}" for _ in range(40)] + ["7", "ü-user"]
    items = [f"B0{rng.getrandbits(32):08X}" for _ in range(25)] + ["0143127748"]
    reviews: list = []
    for k in range(n):
        row = {"rating": float(rng.choice([1, 2, 3, 4, 5, 5, 5])), "title": rng.choice(["Great", "Meh 😀", "Caf\u00e9"]),
               "text": "x" * rng.randrange(0, 300), "images": [], "asin": "X" + str(k % 3),
               "parent_asin": rng.choice(items), "user_id": rng.choice(users[:40]),
               "timestamp": 1_500_000_000_000 + rng.randrange(0, 10**9) // 1000 * 1000, "helpful_vote": k % 4,
               "verified_purchase": k % 2 == 0}
        odd = k % 50
        if odd == 1:
            reviews.append(reviews[-1])  # a duplicate review, line for line
            continue
        if odd == 2:
            row = {"reviewerID": rng.choice(users[:40]), "asin": rng.choice(items), "overall": 5.0,
                   "unixReviewTime": 1_400_000_000, "reviewText": "2018 style"}
        elif odd == 3:
            row["rating"] = "4.0"  # a number in a string
        elif odd == 4:
            row["user_id"] = 7  # an integer id
        elif odd == 5:
            row["user_id"] = "ü-user"  # a non-ASCII id
        elif odd == 6:
            row["text"] = "lone \ud800 surrogate"
        elif odd == 7:
            reviews.append("\n")
            reviews.append("   \t\n")
        elif odd == 8:
            reviews.append(json.dumps(row) + "\r\n")
            continue
        elif odd == 9:
            row["text"] = "long " * 2000  # longer than a piece in the tests
        elif odd == 10:
            row.pop("asin")
            row.pop("images")
        elif odd == 11:
            row["timestamp"] = reviews[-1]["timestamp"] if isinstance(reviews[-1], dict) else 0  # a tie
        elif odd == 12:
            row["rating"] = 4  # an integer rating
        reviews.append(row)
    meta: list = []
    for k, item in enumerate(items + [items[0], "UNREVIEWED"]):  # a duplicate record: the first counts
        row = {"main_category": rng.choice(["Books", "Kindle Store", None]), "title": f"Title {k} \u2013 n\u00ba{k}",
               "average_rating": 4.5, "rating_number": k, "features": ["f"], "description": ["d"], "price": None,
               "images": [{"thumb": "t", "large": "l", "variant": "MAIN", "hi_res": None}], "videos": [],
               "store": rng.choice(["Penguin", None, ""]), "categories": rng.choice([[], ["Books", " Fiction ", "Books"]]),
               "details": rng.choice([{"Publisher": "P"}, {"Brand": " Acme "}, {}]), "parent_asin": item,
               "bought_together": None}
        odd = k % 9
        if odd == 1:
            row.pop("title")
        elif odd == 2:
            row["title"] = "surrogate \udfff in a title"
        elif odd == 3:
            row["categories"] = [["Office", "Pens"], "Pens"]  # nested, as 2014's files
        elif odd == 4:
            row = {"asin": item, "title": "2018 item", "category": ["Office"], "brand": "Bic"}
        elif odd == 5:
            row["details"] = "not a dict"
        elif odd == 6:
            row["title"] = 12345
        elif odd == 7:
            meta.append("\n")
        meta.append(row)
    suffix = ".jsonl.gz" if gz else ".jsonl"
    return write(folder / f"reviews{suffix}", reviews), write(folder / f"meta{suffix}", meta)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("piece", [700, 5000, 32 << 20])
def test_stream_reads_the_same_frames(tmp_path, gz, piece):
    reviews, meta = dump(tmp_path, gz)
    with pieces_of(piece):
        stream, python = both(reviews, meta)
    assert stream[0] == "ok" and stream[1:3] == python[1:3]
    inter, _ = load_amazon(reviews, meta)
    assert all(isinstance(inter[c].dtype, pd.CategoricalDtype) for c in ("user_id", "item_id"))


def test_clean_pieces_take_the_fast_path(tmp_path, monkeypatch):
    rows = [{"user_id": f"U{k % 7}", "parent_asin": f"P{k % 5}", "rating": 5.0, "timestamp": k} for k in range(300)]
    reviews = write(tmp_path / "r.jsonl.gz", rows)
    meta = write(tmp_path / "m.jsonl", [{"parent_asin": f"P{k}", "title": "t"} for k in range(5)])
    slow = []
    monkeypatch.setattr(loaders, "_slow_reviews", lambda *a: slow.append(a))
    monkeypatch.setattr(loaders, "_slow_items", lambda *a: slow.append(a))
    with pieces_of(1000):
        inter, items = load_amazon(reviews, meta)
    assert not slow and len(inter) == 300 and len(items) == 5


def test_codes_merge_piece_dictionaries_in_first_appearance_order(monkeypatch):
    monkeypatch.setattr(loaders._Codes, "merge_at", 3)
    rng = random.Random(1)
    pieces = [[f"s{rng.randrange(40)}" for _ in range(rng.randrange(0, 9))] for _ in range(60)]
    codes = loaders._Codes()
    for piece in pieces:
        codes.add(piece)
    got = codes.categorical()
    values = [v for piece in pieces for v in piece]
    assert list(got) == values and list(got.categories) == list(dict.fromkeys(values))


def _prepared(run: Path, reviews: Path, meta: Path, engine: str, monkeypatch, **kw) -> dict[str, str]:
    """The data folder `fusion prepare` writes (through DataStage) with the given reader."""
    monkeypatch.setattr(loaders, "load_amazon", functools.partial(load_amazon, engine=engine))
    cfg = PrepareConfig(source=str(reviews), meta=str(meta), format="amazon", negatives=[3, 20], **kw)
    ds = prepare_dataset(cfg, run)
    monkeypatch.undo()
    return {p.name: file_hash(p) for p in sorted(ds.path.iterdir()) if p.name != "manifest.json"}


@pytest.mark.parametrize("settings", [{}, {"rating_gt": None, "user_core": 2, "item_core": 2, "dedup": False},
                                      {"split": "temporal", "cut": 0.8, "user_core": 3, "item_core": 3},
                                      {"rating_gt": 3.9999999, "user_core": 2, "item_core": 2}],
                         ids=["paper", "all-ratings", "temporal", "threshold-between-float32s"])
def test_prepared_folder_is_byte_identical(tmp_path, monkeypatch, settings):
    reviews, meta = dump(tmp_path, gz=True, n=1500)
    with pieces_of(4000):
        new = _prepared(tmp_path / "new", reviews, meta, "stream", monkeypatch, **settings)
    old = _prepared(tmp_path / "old", reviews, meta, "python", monkeypatch, **settings)
    assert new == old and {"interactions.parquet", "users.parquet", "items.parquet"} <= set(new)


def test_prepare_is_the_same_on_categorical_and_string_ids(tmp_path):
    reviews, meta = dump(tmp_path, gz=False, n=900)
    cfg = PrepareConfig(source="x", user_core=2, item_core=2)
    a = prepare(cfg, load_amazon(reviews, meta)[0])
    b = prepare(cfg, load_amazon(reviews, meta, engine="python")[0])
    for x, y in zip(a[:3], b[:3]):
        pd.testing.assert_frame_equal(x, y)


def test_unchecked_categorical_equals_pandas_checked_one():
    """The stream's id columns skip pandas' uniqueness check of the categories (they are unique by
    construction); the result is the categorical the checked constructor gives."""
    codes = np.array([2, 0, 1, 2, 0], dtype=np.int32)
    categories = pd.Index(["b", "a", "c"])
    fast = loaders.categorical_from_codes(codes, categories)
    checked = pd.Categorical.from_codes(codes, categories=categories)
    pd.testing.assert_extension_array_equal(fast, checked)
    assert list(fast) == ["c", "b", "a", "c", "b"]


# --- bad lines: the same one-line error, wherever the line is -------------------------------------

R23 = {"rating": 5.0, "title": "t", "text": "some text", "asin": "X", "parent_asin": "P", "user_id": "U",
       "timestamp": 1_700_000_000_000}
BAD = {
    "wrong type": {**R23, "rating": "five"}, "null": {**R23, "rating": None}, "bool": {**R23, "rating": True},
    "missing": {k: v for k, v in R23.items() if k not in ("parent_asin", "asin")}, "empty id": {**R23, "user_id": " "},
    "float id": {**R23, "user_id": 3.5}, "lone surrogate id": {**R23, "user_id": "U\ud800"},
    "malformed": '{"user_id": "U", \n', "not an object": "[1, 2]\n", "two objects": json.dumps(R23) * 2 + "\n",
    "nan": json.dumps(R23).replace("5.0", "NaN") + "\n", "huge": json.dumps(R23).replace("5.0", "1e999") + "\n",
    "not utf-8": '{"user_id": "Jos\xe9"}\n'.encode("latin-1"), "nbsp line": "\u00a0\n",
}


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_line_in_a_later_piece_has_the_same_error(tmp_path, gz, case):
    lines = [{**R23, "user_id": f"U{k}"} for k in range(60)]
    lines.insert(41, BAD[case])
    path = write(tmp_path / f"r.jsonl{'.gz' if gz else ''}", lines)
    meta = write(tmp_path / "m.jsonl", [{"parent_asin": "P", "title": "t"}])
    with pieces_of(1000):
        stream, python = both(path, meta)
    assert stream == python
    if case != "nbsp line":
        assert stream[0] == "error" and stream[1].startswith(f"{path}:42: "), stream


@pytest.mark.parametrize("bad_line", [True, False])
def test_truncated_gzip_reports_as_before(tmp_path, bad_line):
    lines = [{**R23, "user_id": f"U{k}", "text": f"{k} " * 50} for k in range(3000)]
    if bad_line:
        lines[5] = {**R23, "rating": "five"}
    data = gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode())
    path = tmp_path / "r.jsonl.gz"
    path.write_bytes(data[:len(data) * 2 // 3])
    meta = write(tmp_path / "m.jsonl", [{"parent_asin": "P", "title": "t"}])
    with pieces_of(50_000):
        stream, python = both(path, meta)
    assert stream == python and stream[0] == "error"
    assert stream[1] == f"{path}:6: field 'rating' is not a number: 'five'" if bad_line else \
        stream[1].startswith(f"{path}: truncated or corrupt gzip file (")


# --- odd values drawn by Hypothesis: the same frames or the same error -----------------------------

ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.lists(st.one_of(st.text(max_size=3), st.lists(st.text(max_size=2), max_size=2)), max_size=3),
    st.dictionaries(st.sampled_from(["Brand", "x"]), st.one_of(st.none(), st.text(max_size=3), st.integers()), max_size=2),
    st.sampled_from([10**400, "5", " 4.5 ", "1_0", "nan", "\ud800", "", " ", "\u00a0", "A\u00e9", "B\u3000"]))
REVIEW_KEYS = ["user_id", "parent_asin", "rating", "timestamp", "reviewerID", "asin", "overall", "unixReviewTime", "text"]
META_KEYS = ["parent_asin", "asin", "title", "categories", "category", "main_category", "brand", "store", "details"]
RAW = st.sampled_from(["\n", " \n", "\u00a0\n", "{}\n", "[1]\n", "{\n", '{"a": 1} {"b": 2}\n', "\ufeff{}\n"])


def odd_lines(base: dict, keys: list[str]):
    """Lines of good rows, some with one field odd or dropped, and now and then a raw odd line."""
    change = st.tuples(st.sampled_from(keys), ODD, st.sampled_from(["set", "drop"]))
    line = st.one_of(st.none(), st.none(), st.none(), change, RAW)

    def make(k, c):
        if isinstance(c, str):
            return c
        row = {**base, "user_id": f"U{k % 4}", "parent_asin": f"P{k % 3}"} if "rating" in base else \
            {**base, "parent_asin": f"P{k}"}
        if c is not None and c[2] == "set":
            row[c[0]] = c[1]
        elif c is not None:
            row.pop(c[0], None)
        return row
    return st.lists(line, min_size=1, max_size=10).map(lambda cs: [make(k, c) for k, c in enumerate(cs)])


ODD_SETTINGS = settings(max_examples=120, deadline=None, database=None,
                        suppress_health_check=[HealthCheck.function_scoped_fixture])
GOOD_REVIEWS = [{**R23, "user_id": f"U{k}", "parent_asin": f"P{k % 3}"} for k in range(5)]
GOOD_META = [{"parent_asin": f"P{k}", "title": "t"} for k in range(3)]


@ODD_SETTINGS
@given(reviews=odd_lines(R23, REVIEW_KEYS), piece=st.sampled_from([1, 150, 1 << 20]))
def test_odd_review_values_read_the_same(tmp_path, reviews, piece):
    r, m = write(tmp_path / "r.jsonl", reviews), write(tmp_path / "m.jsonl", GOOD_META)
    with pieces_of(piece):
        stream, python = both(r, m)
    assert stream == python


@ODD_SETTINGS
@given(meta=odd_lines({"title": "t", "categories": ["c"], "store": "s"}, META_KEYS),
       piece=st.sampled_from([1, 150, 1 << 20]))
def test_odd_metadata_values_read_the_same(tmp_path, meta, piece):
    r, m = write(tmp_path / "r.jsonl", GOOD_REVIEWS), write(tmp_path / "m.jsonl", meta)
    with pieces_of(piece):
        stream, python = both(r, m)
    assert stream == python
