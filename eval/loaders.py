"""Raw data set readers. Each returns two frames in one standard shape:

interactions: user_id (str), item_id (str), rating (float), timestamp (float), in file order
items:        item_id (str), title, categories, brand, year (str, "" where absent)

Everything after this (filters, k-core, ids, splits) lives in `preprocess.py`, so all formats are
treated the same way.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from .errors import InputError

ITEM_COLUMNS = ["item_id", "title", "categories", "brand", "year"]


def _require(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    return path


def _empty_items() -> pd.DataFrame:
    return pd.DataFrame(columns=ITEM_COLUMNS)


def _finish(inter: pd.DataFrame, items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    inter = inter.astype({"user_id": str, "item_id": str, "rating": float, "timestamp": float})
    items = items.reindex(columns=ITEM_COLUMNS).fillna("").astype(str)
    return inter.reset_index(drop=True), items.drop_duplicates("item_id").reset_index(drop=True)


# --- RecBole atomic files ------------------------------------------------------------------------

def _read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, header `name:type`; returns columns by bare name."""
    _require(path)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
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
    if "rating" not in inter.columns:
        inter["rating"] = "1"
    for col in ("rating", "timestamp"):
        bad = pd.to_numeric(inter[col], errors="coerce").isna()
        if bad.any():
            line = int(bad.to_numpy().argmax()) + 2
            raise InputError(f"{ipath}:{line}: field '{col}' is not a number: {inter[col][bad].iloc[0]!r}")
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
    return _finish(inter[["user_id", "item_id", "rating", "timestamp"]], items)


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
    folder = Path(folder)
    if (folder / "u.data").exists():
        path, sep = folder / "u.data", "\t"
        items = _movie_items(folder / "u.item", "|", ML100K_GENRES) if (folder / "u.item").exists() else _empty_items()
    else:
        path, sep = _require(folder / "ratings.dat"), "::"
        items = _movie_items(folder / "movies.dat", "::", None) if (folder / "movies.dat").exists() else _empty_items()
    rows = []
    with open(path, encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            parts = line.strip().split(sep)
            if len(parts) < 4:
                raise InputError(f"{path}:{n}: expected 4 fields (user, item, rating, timestamp)")
            try:
                rows.append((parts[0], parts[1], float(parts[2]), float(parts[3])))
            except ValueError:
                raise InputError(f"{path}:{n}: rating or timestamp is not a number") from None
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    return _finish(inter, items)


# --- Amazon reviews (2018 and 2023) --------------------------------------------------------------

def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    with opener(_require(path), "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{n}: expected a JSON object")
            yield n, obj


def _field(obj: dict, path: Path, n: int, *names: str) -> object:
    for name in names:
        if name in obj:
            return obj[name]
    raise InputError(f"{path}:{n}: missing field " + " or ".join(f"'{x}'" for x in names))


def _text(value: object) -> str:
    if isinstance(value, list):
        flat = [v for x in value for v in (x if isinstance(x, list) else [x])]
        return ", ".join(dict.fromkeys(str(v).strip() for v in flat if str(v).strip()))
    return "" if value is None else str(value).strip()


def load_amazon(reviews: str | Path, meta: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Amazon reviews: 2018 (`reviewerID`, `asin`, `overall`, `unixReviewTime`; 5-core files too) or
    2023 (`user_id`, `parent_asin`, `rating`, `timestamp` in ms), with optional metadata."""
    reviews = Path(reviews)
    rows = []
    for n, obj in _json_lines(reviews):
        rows.append((
            _field(obj, reviews, n, "reviewerID", "user_id"),
            _field(obj, reviews, n, "parent_asin", "asin"),
            _field(obj, reviews, n, "overall", "rating"),
            _field(obj, reviews, n, "unixReviewTime", "timestamp"),
        ))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = _empty_items()
    if meta is not None:
        meta = Path(meta)
        rows = []
        for n, obj in _json_lines(meta):
            details = obj.get("details") if isinstance(obj.get("details"), dict) else {}
            rows.append((
                str(_field(obj, meta, n, "parent_asin", "asin")),
                _text(obj.get("title", "")),
                _text(obj.get("categories") or obj.get("category") or obj.get("main_category") or ""),
                _text(obj.get("brand") or obj.get("store") or details.get("Brand") or ""),
                "",
            ))
        items = pd.DataFrame(rows, columns=ITEM_COLUMNS)
    return _finish(inter, items)


def load_source(source: str, fmt: str = "auto", meta: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Dispatch on an embedded data set name ('ml-100k', 'ml-1m') or a path and format."""
    from .assets import recbole_dataset

    if source in ("ml-100k", "ml-1m") and not Path(source).exists():
        return load_recbole(recbole_dataset(source))
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: data source not found")
    if fmt == "auto":
        if path.is_dir() and any(path.glob("*.inter")):
            fmt = "recbole"
        elif path.is_dir():
            fmt = "movielens"
        else:
            fmt = "amazon"
    if fmt == "recbole":
        name = next(path.glob("*.inter")).stem if path.is_dir() else path.stem
        return load_recbole(path if path.is_dir() else path.parent, name)
    if fmt == "movielens":
        return load_movielens(path)
    if fmt in ("amazon", "amazon2018", "amazon2023"):
        return load_amazon(path, meta)
    raise InputError(f"unknown data format '{fmt}' (choose recbole, movielens, amazon or auto)")
