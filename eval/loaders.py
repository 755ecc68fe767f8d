"""Raw data set readers. Each returns two frames in one standard shape:

interactions: user_id (str), item_id (str), rating (float), timestamp (float), in file order
items:        item_id (str), title, categories, brand, year (str, "" where absent)

Everything after this (filters, k-core, ids, splits) lives in `preprocess.py`, so all formats are
treated the same way.
"""
from __future__ import annotations

import gzip
import json
import math
import reprlib
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pandas as pd

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


def _finish(inter: pd.DataFrame, items: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The standard frames, with a warning for odd timestamps."""
    inter = inter.astype({"user_id": str, "item_id": str, "rating": float, "timestamp": float})
    _odd_timestamps(inter["timestamp"], path)
    items = items.reindex(columns=ITEM_COLUMNS).fillna("").astype(str)
    return inter.reset_index(drop=True), items.drop_duplicates("item_id").reset_index(drop=True)


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

def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file, gzipped when named `.gz`. Lines are decoded one
    by one (not in the reader's chunks), so a byte that is not UTF-8 is reported on its own line."""
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(_require(path), "rb") as f:
            for n, raw in enumerate(f, 1):
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
    except gzip.BadGzipFile as e:
        raise InputError(f"{path}: not a gzip file ({e})") from None
    except (EOFError, zlib.error) as e:
        raise InputError(f"{path}: truncated or corrupt gzip file ({e})") from None


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


def load_amazon(reviews: str | Path, meta: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Amazon reviews: 2018 (`reviewerID`, `asin`, `overall`, `unixReviewTime`; 5-core files too) or
    2023 (`user_id`, `parent_asin`, `rating`, `timestamp` in ms), and the metadata file.

    The metadata is required: reviews carry no titles, and without them every item would reach the
    rationale prompts as a bare id. It is asked for after the reviews are read, so a bad reviews file
    is reported first."""
    reviews = Path(reviews)
    rows = []
    for n, obj in _json_lines(reviews):
        rows.append((
            _field(obj, reviews, n, _id, "reviewerID", "user_id"),
            _field(obj, reviews, n, _id, "parent_asin", "asin"),
            _field(obj, reviews, n, _number, "overall", "rating"),
            _field(obj, reviews, n, _number, "unixReviewTime", "timestamp"),
        ))
    if not rows:
        raise InputError(f"{reviews}: no reviews (only blank lines)")
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    if meta is None:
        raise InputError(f"{reviews}: Amazon reviews have no item titles; pass the metadata file "
                         f"(meta_*.json.gz or meta_*.jsonl.gz) with --meta (data.meta)")
    meta = Path(meta)
    rows = []
    for n, obj in _json_lines(meta):
        details = obj.get("details") if isinstance(obj.get("details"), dict) else {}
        rows.append((
            _field(obj, meta, n, _id, "parent_asin", "asin"),
            _text(obj.get("title", "")),
            _text(obj.get("categories") or obj.get("category") or obj.get("main_category") or ""),
            _text(obj.get("brand") or obj.get("store") or details.get("Brand") or ""),
            "",
        ))
    if not rows:
        raise InputError(f"{meta}: no item records (only blank lines)")
    return _finish(inter, pd.DataFrame(rows, columns=ITEM_COLUMNS), reviews)


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
