"""Raw data set readers. Each returns two frames in one standard shape:

interactions: user_id (str), item_id (str), rating (float), timestamp (float), in file order (the streaming
              Amazon reader's ids are categorical, its ratings float32 where that holds them exactly)
items:        item_id (str), title, categories, brand, year (str, "" where absent; the streaming Amazon
              reader's categories, brand and year are categorical)

Everything after this (filters, k-core, ids, splits) lives in `preprocess.py`, so all formats are
treated the same way.
"""
from __future__ import annotations

import contextlib
import ctypes
from array import array
import gzip
import io
import itertools
import json
import math
import reprlib
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import msgspec
import numpy as np
import pandas as pd
import pyarrow as pa
from isal import igzip, isal_zlib
from msgspec import UNSET, UnsetType

from .errors import InputError, has_surrogate, user_path, valid_text, warn

ITEM_COLUMNS = ["item_id", "title", "categories", "brand", "year"]
T = TypeVar("T")
FORMATS = ("recbole", "movielens", "amazon", "amazon2018", "amazon2023")
MOVIELENS_RATINGS = ("u.data", "ratings.dat")  # ml-100k / ml-1m and ml-10m
YEAR_S = 365 * 24 * 3600


def _require(path: Path) -> Path:
    """A data file that exists, is a file and is not empty: an empty one would read as no data and fail
    later for another reason (no titles, nothing left after filtering)."""
    user_path(path, "file", "a data file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    return path


def _bad(path: Path, line: int, name: str, problem: str, value: object) -> InputError:
    """The one shape of a bad-value error; the value shortened, and null spelled as in the JSON file."""
    shown = "null" if value is None else reprlib.repr(value)
    return InputError(f"{path}:{line}: field '{name}' {problem}: {shown}")


def _number(value: object, path: Path, line: int, name: str) -> float:
    """A finite number, or a string of one. Null, NaN, inf and bools are refused: they would not fail
    later, they would sort or filter silently wrong (a null timestamp becomes the user's test item)."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            pass
        else:
            if math.isfinite(number):
                return number
    raise _bad(path, line, name, "is not a number", value)


def _id(value: object, path: Path, line: int, name: str) -> str:
    """A user or item id: a non-empty string or an integer, never null, a float or a list. An id with a
    lone surrogate is refused, not repaired: two such ids would become one."""
    if isinstance(value, str) and has_surrogate(value):
        raise _bad(path, line, name, "is not valid Unicode (a lone surrogate)", value)
    if (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.strip()):
        return str(value)
    raise _bad(path, line, name, "is not an id (a non-empty string or an integer)", value)


def _empty_items() -> pd.DataFrame:
    return pd.DataFrame(columns=ITEM_COLUMNS)


def _odd_timestamps(timestamps: pd.Series, path: Path) -> None:
    """Warn with a count of timestamps before 1970 or later than a year from now: the splits read
    their order (a temporal cut is a quantile), so the run goes on, but they are likely a unit or a
    parsing mistake upstream. A file whose typical value lies beyond a year from now counts in
    milliseconds (Amazon 2023)."""
    limit = time.time() + YEAR_S
    if timestamps.median() > limit:
        limit *= 1000
    odd = int(((timestamps < 0) | (timestamps > limit)).sum())
    if odd:
        warn(f"{path}: {odd} of {len(timestamps)} timestamps are negative or more than a year in the future "
             "(kept as they are)")


def _interactions(inter: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The standard interactions frame, with a warning for odd timestamps; categorical ids stay categorical."""
    types = {"user_id": str, "item_id": str, "rating": float, "timestamp": float}
    keep = lambda dtype: isinstance(dtype, pd.CategoricalDtype) or dtype.kind == "f"  # noqa: E731
    inter = inter.astype({c: t for c, t in types.items() if not keep(inter[c].dtype)})
    _odd_timestamps(inter["timestamp"], path)
    return inter.reset_index(drop=True)


def _finish(inter: pd.DataFrame, items: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The standard frames: an item's first record counts."""
    items = items.reindex(columns=ITEM_COLUMNS).fillna("").astype(str)
    return _interactions(inter, path), items.drop_duplicates("item_id").reset_index(drop=True)


# --- RecBole atomic files ------------------------------------------------------------------------

def _utf8(raw: bytes, path: Path, line: int) -> str:
    """One line of a UTF-8 file, decoded on its own so that a bad byte is reported on its line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, header `name:type`; returns columns by bare name."""
    with open(_require(path), "rb") as f:  # pandas names no line for a byte that is not UTF-8: find it
        for n, raw in enumerate(f, 1):
            _utf8(raw, path, n)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(f"{path}: cannot parse as a tab-separated atomic file ({e})") from None
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def _need(df: pd.DataFrame, path: Path, *cols: str) -> None:
    for c in cols:
        if c not in df.columns:
            raise InputError(f"{path}: missing column '{c}' (found: {', '.join(df.columns)})")


def load_recbole(folder: str | Path, name: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`<name>.inter` (+ optional `<name>.item`) from a RecBole data set folder."""
    folder = Path(folder)
    name = name or folder.name
    ipath = folder / f"{name}.inter"
    inter = _read_atomic(ipath)
    _need(inter, ipath, "user_id", "item_id", "timestamp")
    if inter.empty:
        raise InputError(f"{ipath}: no interactions (only a header)")
    if "rating" not in inter.columns:
        inter["rating"] = "1"
    for col, check in (("user_id", _id), ("item_id", _id), ("rating", _number), ("timestamp", _number)):
        inter[col] = [check(v, ipath, n, col) for n, v in enumerate(inter[col].tolist(), 2)]  # line 1: header
    items = _empty_items()
    mpath = folder / f"{name}.item"
    if mpath.exists():
        raw = _read_atomic(mpath)
        _need(raw, mpath, "item_id")
        pick = lambda *names: next((raw[n] for n in names if n in raw.columns), "")  # noqa: E731
        items = pd.DataFrame({
            "item_id": raw["item_id"],
            "title": pick("movie_title", "title"),
            "categories": pick("class", "genre", "categories"),
            "brand": pick("brand"),
            "year": pick("release_year", "year"),
        })
        items["year"] = items["year"].astype(str).str.replace(r"\.0$", "", regex=True)
        items["categories"] = items["categories"].astype(str).str.split().str.join(", ")
    return _finish(inter[["user_id", "item_id", "rating", "timestamp"]], items, ipath)


# --- MovieLens raw files -------------------------------------------------------------------------

def _movie_items(path: Path, sep: str, genre_cols: list[str] | None) -> pd.DataFrame:
    rows = []
    with open(_require(path), encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split(sep)
            if len(parts) < 3:
                raise InputError(f"{path}:{n}: expected at least 3 '{sep}'-separated fields")
            title = parts[1].strip()
            year = ""
            if title.endswith(")") and title[-6:-5] == "(" and title[-5:-1].isdigit():
                title, year = title[:-6].strip(), title[-5:-1]
            if genre_cols is None:  # ml-1m movies.dat: genres joined by '|'
                genres = parts[2].replace("|", ", ")
            else:  # ml-100k u.item: one 0/1 flag per genre
                flags = parts[5:5 + len(genre_cols)]
                genres = ", ".join(g for g, flag in zip(genre_cols, flags) if flag == "1")
            rows.append((parts[0], title, genres, "", year))
    return pd.DataFrame(rows, columns=ITEM_COLUMNS)


ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def load_movielens(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MovieLens raw files: `u.data` + `u.item` (100k) or `ratings.dat` + `movies.dat` (1m/10m)."""
    folder = user_path(folder, "folder", "a MovieLens folder")
    if (folder / "u.data").exists():
        path, sep = _require(folder / "u.data"), "\t"
        items = _movie_items(folder / "u.item", "|", ML100K_GENRES) if (folder / "u.item").exists() else _empty_items()
    elif (folder / "ratings.dat").exists():
        path, sep = _require(folder / "ratings.dat"), "::"
        items = _movie_items(folder / "movies.dat", "::", None) if (folder / "movies.dat").exists() else _empty_items()
    else:
        raise InputError(f"{folder}: neither u.data nor ratings.dat (not a MovieLens folder; --format recbole "
                         f"reads a folder of .inter files)")
    rows = []
    with open(path, encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            parts = line.strip().split(sep)
            if len(parts) < 4:
                raise InputError(f"{path}:{n}: expected 4 fields (user, item, rating, timestamp)")
            rows.append((_id(parts[0], path, n, "user_id"), _id(parts[1], path, n, "item_id"),
                         _number(parts[2], path, n, "rating"), _number(parts[3], path, n, "timestamp")))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    return _finish(inter, items, path)


# --- Amazon reviews (2018 and 2023) --------------------------------------------------------------
#
# Dumps run to tens of millions of lines (Amazon 2023 Books: 29.5M reviews, 4.4M items), so they are read
# as a stream of pieces of whole lines, each parsed by msgspec into only the fields the loader reads, the
# ids dictionary-encoded piece by piece (categorical columns, int32 codes). A piece msgspec cannot read
# exactly as the line-by-line Python reader would (a blank or malformed line, a value of another type, a
# number in a string, an id that is not plain ASCII, a lone surrogate, a byte that is not UTF-8) goes
# through that Python reader instead, which gives the same values or the same one-line error (file, line,
# field). `engine="python"` reads the whole file that way (the reference the stream is tested against).

READ_BYTES = 8 << 20  # what the stream reads (and gunzips) at a time; a piece is that, up to the last newline
ENGINES = ("stream", "python")
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
_READ_ERRORS = (OSError, EOFError, zlib.error, isal_zlib.error)  # igzip's (gzip's file-level checks, its own messages)


def _parse_lines(lines: Iterable[bytes], path: Path, first: int) -> Iterator[tuple[int, dict]]:
    """(line number, object) of JSON lines numbered from `first`. Lines are decoded one by one (not in the
    reader's chunks), so a byte that is not UTF-8 is reported on its own line."""
    for n, raw in enumerate(lines, first):
        line = _utf8(raw, path, n)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{n}: expected a JSON object")
        yield n, obj


def _gzip_error(path: Path, e: Exception) -> InputError:
    if isinstance(e, gzip.BadGzipFile):
        return InputError(f"{path}: not a gzip file ({e})")
    return InputError(f"{path}: truncated or corrupt gzip file ({e})")


def _json_lines(path: Path, start: int = 1) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file from line `start` on, gzipped when named `.gz`."""
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(_require(path), "rb") as f:
            yield from _parse_lines(itertools.islice(f, start - 1, None), path, start)
    except _GZIP_ERRORS as e:
        raise _gzip_error(path, e) from None


def _field(obj: dict, path: Path, n: int, check: Callable[[object, Path, int, str], T], *names: str) -> T:
    """The first of `names` present in the object, checked where it is read so the error has its line."""
    for name in names:
        if name in obj:
            return check(obj[name], path, n, name)
    raise InputError(f"{path}:{n}: missing field " + " or ".join(f"'{x}'" for x in names))


def _text(value: object) -> str:
    """Item text from a JSON field, flattened to one string, lone surrogates replaced where it is read."""
    if isinstance(value, list):
        flat = [v for x in value for v in (x if isinstance(x, list) else [x])]
        return valid_text(", ".join(dict.fromkeys(str(v).strip() for v in flat if str(v).strip())))
    return "" if value is None else valid_text(str(value).strip())


def _pieces(path: Path) -> Iterator[bytes]:
    """The file in pieces of whole lines of about READ_BYTES, gunzipped by ISA-L's igzip (2.4 times as fast
    as gzip here; it refuses the files gzip refuses) when named `.gz`."""
    opener: Callable = igzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        rest = b""
        while block := f.read(READ_BYTES):
            end = block.rfind(b"\n") + 1
            if end:
                yield rest + block[:end]
                rest = block[end:]
            else:  # a line longer than a read
                rest += block
        if rest:
            yield rest


def _stream(path: Path, fast: Callable[[bytes], tuple[T, int] | None],
            slow: Callable[[Path, Iterator[tuple[int, dict]]], T]) -> Iterator[T]:
    """What `fast` makes of each piece of a JSON-lines file (with the piece's line count), or where it returns
    None, what `slow` makes of the piece's (line number, object) from the Python reader. The next piece is
    read (and gunzipped, which frees the GIL) in a thread meanwhile. Where reading fails (a gzip error), the
    Python reader takes over from the piece's first line: it reports the error as the old reader did, at
    the first bad line before it if there is one."""
    pieces = _pieces(_require(path))
    first = 1  # the number of the piece's first line
    try:
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(next, pieces, None)
            while True:
                try:
                    data = ahead.result()
                except _READ_ERRORS:
                    yield slow(path, _json_lines(path, first))
                    return
                if data is None:
                    return
                ahead = pool.submit(next, pieces, None)
                got = fast(data)
                if got is None:
                    yield slow(path, _parse_lines(io.BytesIO(data), path, first))
                    first += data.count(b"\n")
                else:
                    yield got[0]
                    first += got[1]
    finally:
        pieces.close()


def _is_utf8(data: bytes) -> bool:
    """Whether all of `data` is UTF-8 (Arrow's check is as strict as Python's decoder: no surrogates, no
    overlong forms)."""
    if data.isascii():
        return True
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int64))
    try:
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)]).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _plain_ids(ids: list) -> bool:
    """Whether every value is a non-empty string of printable ASCII without spaces: an id `_id` takes as it is."""
    try:
        joined = "".join(ids)
    except TypeError:  # UNSET: the field is absent
        return False
    return all(ids) and joined.isascii() and joined.isprintable() and " " not in joined


class _Review(msgspec.Struct):
    """The fields a review is read from, 2018's names and 2023's (UNSET: absent); a value of another type
    is a msgspec error, and its piece goes to the Python reader (which knows ints as ids, numbers in strings,
    and the errors)."""
    reviewerID: str | UnsetType = UNSET
    user_id: str | UnsetType = UNSET
    parent_asin: str | UnsetType = UNSET
    asin: str | UnsetType = UNSET
    overall: float | UnsetType = UNSET
    rating: float | UnsetType = UNSET
    unixReviewTime: float | UnsetType = UNSET
    timestamp: float | UnsetType = UNSET


class _Details(msgspec.Struct):
    Brand: str | None | UnsetType = UNSET


class _Item(msgspec.Struct):
    """The fields an item's metadata is read from (see `_Review`)."""
    parent_asin: str | UnsetType = UNSET
    asin: str | UnsetType = UNSET
    title: str | None | UnsetType = UNSET
    categories: list[str] | str | None | UnsetType = UNSET
    category: list[str] | str | None | UnsetType = UNSET
    main_category: str | None | UnsetType = UNSET
    brand: str | None | UnsetType = UNSET
    store: str | None | UnsetType = UNSET
    details: _Details | None | UnsetType = UNSET


_REVIEWS, _ITEMS = msgspec.json.Decoder(_Review), msgspec.json.Decoder(_Item)
Reviews = tuple[list, list, list, list]  # user ids, item ids, ratings, timestamps
Items = tuple[list, list, list, list]     # item ids, titles, categories, brands


def _decoded(data: bytes, decoder: msgspec.json.Decoder) -> list | None:
    """Every line of a piece through msgspec, or None if a line is blank, malformed, of another type or
    not UTF-8 (msgspec checks the UTF-8 of the fields it reads only). A piece ends with a newline, but
    for the file's last line."""
    if not _is_utf8(data):
        return None
    lines = data.split(b"\n")
    if not lines[-1]:
        lines.pop()
    try:
        return list(map(decoder.decode, lines))
    except msgspec.DecodeError:
        return None


def _fast_reviews(data: bytes) -> tuple[Reviews, int] | None:
    rows = _decoded(data, _REVIEWS)
    if rows is None:
        return None
    users = [r.user_id if r.reviewerID is UNSET else r.reviewerID for r in rows]
    items = [r.asin if r.parent_asin is UNSET else r.parent_asin for r in rows]
    ratings = [r.rating if r.overall is UNSET else r.overall for r in rows]  # finite: msgspec refuses 1e999
    stamps = [r.timestamp if r.unixReviewTime is UNSET else r.unixReviewTime for r in rows]
    if not (_plain_ids(users) and _plain_ids(items)) or UNSET in ratings or UNSET in stamps:
        return None
    return (users, items, ratings, stamps), len(rows)


def _review(obj: dict, path: Path, n: int) -> tuple[str, str, float, float]:
    return (_field(obj, path, n, _id, "reviewerID", "user_id"), _field(obj, path, n, _id, "parent_asin", "asin"),
            _field(obj, path, n, _number, "overall", "rating"),
            _field(obj, path, n, _number, "unixReviewTime", "timestamp"))


def _slow_reviews(path: Path, objs: Iterator[tuple[int, dict]]) -> Reviews:
    rows = [_review(obj, path, n) for n, obj in objs]
    return tuple(map(list, zip(*rows))) if rows else ([], [], [], [])  # type: ignore[return-value]


def _fast_items(data: bytes) -> tuple[Items, int] | None:
    rows = _decoded(data, _ITEMS)
    if rows is None:
        return None
    ids = [r.asin if r.parent_asin is UNSET else r.parent_asin for r in rows]
    if not _plain_ids(ids):
        return None
    return (ids, [_plain_text(r.title) for r in rows],
            [_plain_text(r.categories or r.category or r.main_category) for r in rows],
            [_plain_text(r.brand or r.store or (r.details.Brand if r.details else None)) for r in rows]), len(rows)


def _plain_text(value: str | list[str] | None | UnsetType) -> str:
    """`_text` of a value as msgspec reads it: a string or a list of strings (never with a lone surrogate:
    msgspec refuses those), None or UNSET."""
    if isinstance(value, list):
        return ", ".join(dict.fromkeys(s for x in value if (s := x.strip())))
    return value.strip() if value else ""


def _item(obj: dict, path: Path, n: int) -> tuple[str, str, str, str]:
    details = obj.get("details") if isinstance(obj.get("details"), dict) else {}
    return (_field(obj, path, n, _id, "parent_asin", "asin"), _text(obj.get("title", "")),
            _text(obj.get("categories") or obj.get("category") or obj.get("main_category") or ""),
            _text(obj.get("brand") or obj.get("store") or details.get("Brand") or ""))


def _slow_items(path: Path, objs: Iterator[tuple[int, dict]]) -> Items:
    rows = [_item(obj, path, n) for n, obj in objs]
    return tuple(map(list, zip(*rows))) if rows else ([], [], [], [])  # type: ignore[return-value]


class _Codes:
    """Strings to int32 codes (first appearance order), piece by piece in bounded memory: each piece is
    dictionary-encoded on its own, and the pieces' dictionaries are merged into one whenever they hold
    more than it (so each string is hashed a bounded number of times on average)."""

    merge_at = 1 << 20  # the least pending dictionary size to merge at

    def __init__(self) -> None:
        self.dictionary = pa.array([], pa.string())
        self.codes = array("i")                      # into self.dictionary (grown in place, not concatenated)
        self.pending: list[pa.DictionaryArray] = []  # into their own dictionaries
        self.pending_size = 0

    def add(self, values: list[str]) -> None:
        piece = pa.array(values, pa.string()).dictionary_encode()
        self.pending.append(piece)
        self.pending_size += len(piece.dictionary)
        if self.pending_size > max(self.merge_at, len(self.dictionary)):
            self._merge()

    def _merge(self) -> None:
        known = pa.DictionaryArray.from_arrays(pa.array(np.arange(len(self.dictionary), dtype=np.int32)),
                                               self.dictionary)
        merged = pa.chunked_array([known, *self.pending], type=known.type).unify_dictionaries()
        self.dictionary = merged.chunk(0).dictionary  # starts with the known strings, in their order
        for piece in merged.chunks[1:]:
            self.codes.frombytes(piece.indices.to_numpy().astype(np.int32, copy=False).tobytes())
        self.pending, self.pending_size = [], 0

    def done(self) -> tuple[np.ndarray, pa.StringArray]:
        """The codes of all strings added, and the strings they index."""
        self._merge()
        return np.frombuffer(self.codes, dtype=np.int32), self.dictionary

    def categorical(self) -> pd.Categorical:
        codes, dictionary = self.done()
        return categorical_from_codes(codes, pd.Index(dictionary.to_pandas()))


def categorical_from_codes(codes: np.ndarray, categories: pd.Index) -> pd.Categorical:
    """A categorical of known-valid codes into known-unique categories. Where pandas (2.x, 3.x) has its
    unchecked dtype constructor, it is used: the public one checks uniqueness by hashing every string as
    a Python object (about 100 bytes each: 0.7 GB for Amazon 2023 Books' 10.3M users); elsewhere the
    public one gives the same categorical with that memory spent."""
    fast = getattr(pd.CategoricalDtype, "_from_fastpath", None)
    dtype = fast(categories, False) if fast is not None else pd.CategoricalDtype(categories, ordered=False)
    return pd.Categorical.from_codes(codes, dtype=dtype, validate=False)


def _read_reviews(path: Path) -> pd.DataFrame:
    users, items, ratings, stamps = _Codes(), _Codes(), array("d"), array("d")  # grown in place
    for u, i, r, t in _stream(path, _fast_reviews, _slow_reviews):
        users.add(u)
        items.add(i)
        ratings.extend(r)
        stamps.extend(t)
    rating = np.frombuffer(ratings, dtype=np.float64)
    if np.array_equal(rating.astype(np.float32), rating):  # Amazon's 1-5 stars: half the bytes, the same values
        rating = rating.astype(np.float32)
    return pd.DataFrame({"user_id": users.categorical(), "item_id": items.categorical(), "rating": rating,
                         "timestamp": np.frombuffer(stamps, dtype=np.float64)}, copy=False)


def _read_items(path: Path) -> pd.DataFrame:
    """The items frame in its standard shape (`_finish`'s: each item's first record), built without a
    Python string per value; categories, brand and year as categorical columns (their values repeat)."""
    ids, titles, texts = _Codes(), [], [_Codes(), _Codes()]
    for item, title, *rest in _stream(path, _fast_items, _slow_items):
        ids.add(item)
        titles.append(pa.array(title, pa.string()))
        for codes, values in zip(texts, rest):
            codes.add(values)
    codes, names = ids.done()  # names: in order of first appearance
    first = np.unique(codes, return_index=True)[1]
    title = pa.chunked_array(titles, pa.string())
    categories, brand = (column.categorical() for column in texts)
    if len(first) < len(codes):
        title, categories, brand = title.take(first), categories[first], brand[first]
    return pd.DataFrame({"item_id": names.to_pandas(), "title": title.to_pandas(), "categories": categories,
                         "brand": brand, "year": pd.Categorical([""] * len(first))}, copy=False)


def release_memory() -> None:
    """Hand the memory Arrow's pool and malloc keep after frees back to the system (glibc's malloc_trim;
    elsewhere Arrow's alone): reading a dump leaves about 50 bytes a review of it, and the data stage's
    peak comes later, with the candidate lists."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _read_python(reviews: Path, meta: Path | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The whole files through the Python reader, rows as tuples: the reference the stream equals."""
    inter = pd.DataFrame([_review(obj, reviews, n) for n, obj in _json_lines(reviews)],
                         columns=["user_id", "item_id", "rating", "timestamp"])
    if meta is None or inter.empty:
        return inter, None
    items = pd.DataFrame([(*_item(obj, meta, n), "") for n, obj in _json_lines(meta)], columns=ITEM_COLUMNS)
    return inter, items


def load_amazon(reviews: str | Path, meta: str | Path | None = None, engine: str = "stream"
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Amazon reviews: 2018 (`reviewerID`, `asin`, `overall`, `unixReviewTime`; 5-core files too) or
    2023 (`user_id`, `parent_asin`, `rating`, `timestamp` in ms), and the metadata file. The ids come as
    categorical columns ("stream", the default) or as strings ("python": the line-by-line reader alone).

    The metadata is required: reviews carry no titles, and without them every item would reach the
    rationale prompts as a bare id. It is asked for after the reviews are read, so a bad reviews file
    is reported first."""
    if engine not in ENGINES:
        raise InputError(f"unknown Amazon reader '{engine}' (choose {' or '.join(ENGINES)})")
    reviews = Path(reviews)
    if engine == "python":
        inter, items = _read_python(reviews, None if meta is None else Path(meta))
    else:
        inter, items = _read_reviews(reviews), None
    if inter.empty:
        raise InputError(f"{reviews}: no reviews (only blank lines)")
    if meta is None:
        raise InputError(f"{reviews}: Amazon reviews have no item titles; pass the metadata file "
                         f"(meta_*.json.gz or meta_*.jsonl.gz) with --meta (data.meta)")
    meta = Path(meta)
    stream = items is None
    if stream:
        items = _read_items(meta)
        release_memory()
    if items.empty:
        raise InputError(f"{meta}: no item records (only blank lines)")
    return (_interactions(inter, reviews), items) if stream else _finish(inter, items, reviews)


def guess_format(path: Path) -> str:
    """The format of a source path: a folder of .inter files or a .inter file is RecBole, another folder
    or a u.data / ratings.dat file is MovieLens, any other file Amazon reviews."""
    if path.is_dir():
        return "recbole" if any(path.glob("*.inter")) else "movielens"
    if path.suffix == ".inter":
        return "recbole"
    return "movielens" if path.name in MOVIELENS_RATINGS else "amazon"


def load_source(source: str, fmt: str = "auto", meta: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Dispatch on an embedded data set name ('ml-100k', 'ml-1m') or a path and format.

    A file where a format reads a folder (or the reverse) is one line saying which it expected; a
    RecBole .inter file or a MovieLens ratings file stands for the folder it is in."""
    from .assets import recbole_dataset

    if fmt not in ("auto", *FORMATS):
        raise InputError(f"unknown data format '{fmt}' (choose recbole, movielens, amazon or auto)")
    embedded = source in ("ml-100k", "ml-1m") and not Path(source).exists()
    path = recbole_dataset(source) if embedded else user_path(source, "any", "a data source")
    if fmt == "auto":  # a metadata file says the reviews are Amazon's, whatever the path looks like
        fmt = "amazon" if meta is not None and not embedded else guess_format(path)
    if meta is not None:
        user_path(meta, "file", "a metadata file")
        if not fmt.startswith("amazon"):
            raise InputError(f"{meta}: a metadata file goes with Amazon reviews only, not with {fmt} data "
                             f"(leave out --meta / data.meta)")
    if fmt == "recbole":
        if path.is_file() and path.suffix != ".inter":
            raise InputError(f"{path}: is a file, expected a RecBole folder or its .inter file")
        if path.is_dir() and not any(path.glob("*.inter")):
            raise InputError(f"{path}: no .inter file (not a RecBole folder)")
        name = path.stem if path.is_file() else sorted(path.glob("*.inter"))[0].stem
        return load_recbole(path if path.is_dir() else path.parent, name)
    if fmt == "movielens":
        return load_movielens(path.parent if path.name in MOVIELENS_RATINGS and path.is_file() else path)
    return load_amazon(user_path(path, "file", "an Amazon reviews file"), meta)
