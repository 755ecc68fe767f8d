"""From raw frames to the prepared data set: the paper protocol, every knob configurable.

Defaults follow SLMRec's paper: keep ratings > 3, iterative 5-core, one interaction per user-item
pair, chronological histories, leave-one-out split (or a global time cut: `split = "temporal"`). The
reference code's flaws are avoided on purpose: histories are ordered by time (never by item id), ids
are contiguous from 1 (0 is padding) and the id mapping is a sort, not a Python set, so it is the same
on every run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from .config import setting
from .errors import InputError
from .loaders import release_memory


@dataclass(frozen=True)
class PrepareConfig:
    source: str = setting("ml-100k", "Embedded data set (ml-100k, ml-1m) or a path to your own.")
    format: str = setting("auto", "recbole | movielens | amazon | auto.")
    meta: str | None = setting(None, "Amazon metadata file (meta_*.json[l].gz): item titles, categories, brands.")
    rating_gt: float | None = setting(3.0, "Keep ratings above this (SLMRec: > 3); none keeps every interaction "
                                           "(the SASRec paper's protocol).")
    user_core: int = setting(5, "Iterative k-core: least interactions per user ...")
    item_core: int = setting(5, "... and per item.")
    dedup: bool = setting(True, "Keep only the first interaction of each user-item pair.")
    negatives: list[int] = setting(help="Sizes of the fixed negative candidate lists.", factory=lambda: [100, 999])
    seed: int = setting(42, "Seed of the candidate lists.")
    split: str = setting("loo", "loo: a user's last item is the test target, the one before it the validation "
                                "target (leave-one-out). temporal: a global time cut (Ji et al., TOIS 2023): a "
                                "user's test target is their first interaction at or after the cut, if its item "
                                "was known before it; later interactions are dropped; users with none are "
                                "trained and validated but not tested; the validation target is the last item "
                                "before the cut. Training, prompts and candidates see only items from before it.")
    cut: float = setting(0.9, "temporal: the cut as a quantile of the interaction timestamps (0.9: the last 10 % "
                              "of interactions are the test period).")
    domain: str | None = setting(None, "What the items are, as the rationale prompts name them (\"movies\", "
                                       "\"beauty products\"); none: from the data (MovieLens: movies; Amazon: its "
                                       "category or file name; else items).")

    def __post_init__(self) -> None:
        if any(n < 1 for n in self.negatives):
            raise InputError(f"negatives: sizes must be positive, got {self.negatives}")
        if self.split not in SPLITS:
            raise InputError(f"split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        if not 0 < self.cut < 1:
            raise InputError(f"cut must be a quantile between 0 and 1 (exclusive), not {self.cut}")


SPLITS = ("loo", "temporal")


def _natural_key(ids: pd.Index) -> np.ndarray:
    """Sort order of raw ids: numerically when all are integers, else as strings."""
    values = ids.to_numpy(dtype=str)
    if all(v.isdigit() for v in values):
        return np.argsort(values.astype(np.int64), kind="stable")
    return np.argsort(values, kind="stable")


def _dense(column: pd.Series) -> np.ndarray:
    """An id column as non-negative integer codes: its own values where they already are such codes."""
    values = column.to_numpy()
    if values.dtype.kind in "iu" and (len(values) == 0 or values.min() >= 0):
        return values
    return pd.factorize(values)[0]


def _counts(codes: np.ndarray) -> np.ndarray:
    """For each row, how many rows have its code."""
    return np.bincount(codes)[codes]


def k_core(inter: pd.DataFrame, user_core: int, item_core: int) -> pd.DataFrame:
    """Drop users and items below their core size, repeating until nothing changes."""
    users, items = _dense(inter["user_id"]), _dense(inter["item_id"])
    rows = np.arange(len(inter))
    while True:
        keep = (_counts(users[rows]) >= user_core) & (_counts(items[rows]) >= item_core)
        if keep.all():
            return inter if len(rows) == len(inter) else inter.iloc[rows]
        rows = rows[keep]


def temporal_cut(inter: pd.DataFrame, quantile: float) -> tuple[pd.DataFrame, float]:
    """Chronological interactions cut at a global time: everything before it, of users with at least a
    training and a validation item there, and each such user's first interaction at or after it when
    its item was known before it (the test target). Returns them and the cut's timestamp."""
    cut = float(np.quantile(inter["timestamp"].to_numpy(dtype=np.float64), quantile, method="higher"))
    before = inter[inter["timestamp"] < cut]
    before = before[before["user_id"].map(before["user_id"].value_counts()) >= 2]
    after = inter[inter["timestamp"] >= cut].drop_duplicates("user_id", keep="first")
    after = after[after["user_id"].isin(before["user_id"]) & after["item_id"].isin(before["item_id"])]
    return pd.concat([before, after]), cut


class Prepared(NamedTuple):
    interactions: pd.DataFrame  # user, item, rating, timestamp: chronological within each user
    users: pd.DataFrame         # user (0..U-1), raw_id, has_test (the user has a test target)
    items: pd.DataFrame         # item (1..I), raw_id
    cut: float | None           # the temporal split's cut timestamp


def _codes(column: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """An id column as integer codes and the distinct ids they index: a categorical's own (the streaming
    Amazon reader's), else factorized. Filtering, k-core and splits work on the codes; ids are strings
    again only for those left at the end."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.codes.to_numpy(), column.cat.categories
    codes, uniques = pd.factorize(column)
    return codes, pd.Index(uniques)


def _id_map(codes: np.ndarray, names: pd.Index, start: int) -> tuple[pd.Index, np.ndarray]:
    """The raw ids of the codes left, in natural order, and each code's new id (from `start`)."""
    kept = np.unique(codes)
    order = _natural_key(names.take(kept))
    new = np.full(len(names), -1, dtype=np.int64)
    new[kept[order]] = np.arange(start, start + len(kept))
    return names.take(kept[order]), new


def prepare(cfg: PrepareConfig, inter: pd.DataFrame) -> Prepared:
    """Filter, k-core, split, map ids and order histories. Users are 0..U-1, items 1..I."""
    src = cfg.source
    users, user_names = _codes(inter["user_id"])
    items, item_names = _codes(inter["item_id"])
    rating, stamp = inter["rating"].to_numpy(), inter["timestamp"].to_numpy()
    # rows (in file order) are picked as positions, and the frame is built once from those k-core keeps
    # compared as float64 (NumPy would compare float32 ratings with a Python float in float32)
    rows = np.arange(len(inter)) if cfg.rating_gt is None else np.flatnonzero(rating > np.float64(cfg.rating_gt))
    # chronological, stable on ties: file order decides between equal timestamps
    rows = rows[np.argsort(stamp[rows], kind="stable")]
    if cfg.dedup:  # the first interaction of each user-item pair
        pair = users[rows].astype(np.int64) * (len(item_names) + 1) + items[rows]
        rows = rows[~pd.Series(pair).duplicated(keep="first").to_numpy()]
        del pair
    cored = k_core(pd.DataFrame({"user_id": users[rows], "item_id": items[rows]}), cfg.user_core, cfg.item_core)
    rows = rows[cored.index.to_numpy()]
    del cored
    inter = pd.DataFrame({"user_id": users[rows], "item_id": items[rows], "rating": rating[rows].astype(np.float64),
                          "timestamp": stamp[rows], "order": rows})
    del users, items, rating, stamp, rows
    cut = None
    if cfg.split == "temporal":
        inter, cut = temporal_cut(inter, cfg.cut)
        if not (inter["timestamp"] >= cut).any():
            raise InputError(f"{src}: no user has an interaction at or after the temporal cut ({cfg.cut} "
                             f"quantile, timestamp {cut:g}) on an item seen before it: lower cut")
    else:  # leave-one-out needs train, validation and test items for every user
        inter = inter[_counts(inter["user_id"].to_numpy()) >= 3]
    if inter.empty:
        raise InputError(f"{src}: no interactions left after filtering "
                         f"(rating_gt={cfg.rating_gt}, user_core={cfg.user_core}, item_core={cfg.item_core})")
    if len(np.unique(inter["item_id"].to_numpy())) < 2:
        raise InputError(f"{src}: fewer than 2 items left after filtering")

    user_codes, item_codes = inter["user_id"].to_numpy(), inter["item_id"].to_numpy()
    user_ids, user_of = _id_map(user_codes, user_names, 0)
    item_ids, item_of = _id_map(item_codes, item_names, 1)
    tested = np.ones(len(user_ids), dtype=bool)
    if cut is not None:
        tested = np.zeros(len(user_ids), dtype=bool)
        tested[user_of[user_codes[inter["timestamp"].to_numpy() >= cut]]] = True
    users = pd.DataFrame({"user": np.arange(len(user_ids)), "raw_id": user_ids, "has_test": tested})
    items = pd.DataFrame({"item": np.arange(1, len(item_ids) + 1), "raw_id": item_ids})

    out = pd.DataFrame({
        "user": user_of[user_codes],
        "item": item_of[item_codes],
        "rating": inter["rating"].to_numpy(),
        "timestamp": inter["timestamp"].to_numpy(),
    })
    # by user, then time, then file order (a total order: np.lexsort sorts by its last key first)
    out = out.iloc[np.lexsort((inter["order"].to_numpy(), out["timestamp"].to_numpy(), out["user"].to_numpy()))]
    del inter
    out = out.reset_index(drop=True)
    release_memory()
    return Prepared(out, users, items, cut)


def item_title(row: pd.Series) -> str:
    """The title, or `item <raw id>` for an item without metadata, so no item is ever shown blank."""
    return row["title"] or f"item {row['raw_id']}"


def item_text(row: pd.Series) -> str:
    """One line of item text for the rationale and text stages."""
    parts = [item_title(row)]
    if row.get("year"):
        parts[0] += f" ({row['year']})"
    if row.get("categories"):
        parts.append(f"categories: {row['categories']}")
    if row.get("brand"):
        parts.append(f"brand: {row['brand']}")
    return "; ".join(parts)


def attach_item_text(items: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
    """Join raw item metadata onto the id map; items without metadata keep empty fields. The metadata of
    the items left is picked first: the join then hashes only those (Amazon 2023 Books has 4.4M records)."""
    meta = meta[meta["item_id"].isin(items["raw_id"])].rename(columns={"item_id": "raw_id"})
    merged = items.merge(meta, on="raw_id", how="left")
    for col in ("title", "categories", "brand", "year"):  # as strings (the streaming reader's are categorical)
        merged[col] = merged[col].astype(object).fillna("").astype(str)
    merged["text"] = merged.apply(item_text, axis=1)
    release_memory()
    return merged


def sample_candidates(sequences: list[np.ndarray], targets: np.ndarray, num_items: int, n: int,
                      seed: int, split: str, users: range | None = None) -> np.ndarray:
    """Fixed candidate lists of `users` (default: every user): column 0 is the true item, then `n`
    negatives drawn uniformly from items the user never interacted with. Seeded per (seed, split, n,
    user): reproducible and the same whether drawn for all users at once or in blocks of them. A user
    with fewer than `n` such items gets all of them, and the rest of the row is padding (0), which
    evaluation ignores."""
    split_code = {"valid": 1, "test": 2}[split]
    users = range(len(sequences)) if users is None else users
    out = np.zeros((len(users), n + 1), dtype=np.int64)
    for row, u in enumerate(users):
        if not targets[u]:  # a user with no target in this split (temporal: none after the cut)
            continue
        rng = np.random.default_rng([seed, split_code, n, u])
        seen = np.unique(sequences[u])
        if len(seen) * 2 > num_items or num_items - len(seen) <= n:
            # dense user: draw from the complement directly
            pool = np.setdiff1d(np.arange(1, num_items + 1), seen, assume_unique=True)
            neg = rng.choice(pool, size=min(n, len(pool)), replace=False)
        else:  # sparse user: rejection sampling, without materialising the complement
            neg = np.empty(0, dtype=np.int64)
            while len(neg) < n:
                draw = rng.integers(1, num_items + 1, size=2 * n)
                draw = draw[~np.isin(draw, seen)]
                _, first = np.unique(np.concatenate([neg, draw]), return_index=True)
                neg = np.concatenate([neg, draw])[np.sort(first)]
            neg = neg[:n]
        out[row, 0] = targets[u]
        out[row, 1:1 + len(neg)] = neg
    return out
