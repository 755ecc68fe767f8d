"""The prepared data set: the one artifact every stage reads histories, item texts and candidates from.

Layout of a data folder:
  interactions.parquet   user, item, rating, timestamp (chronological within each user)
  users.parquet          user (0..U-1), raw_id, has_test
  items.parquet          item (1..I), raw_id, title, categories, brand, year, text
  candidates_{valid,test}_{n}.npy   [U, n+1] int64, column 0 = the true item (a row of 0: no target)
  manifest.json
Leave-one-out: a user's last item is the test target, the one before it the validation target. The
temporal split keeps the same layout: a user's sequence is what happened before the cut, then their
test target if they have one (`has_test`); every split below is read through `pre_cut`, so training,
validation and prompts never reach past the cut.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from .errors import InputError
from .io import MANIFEST, read_json, save_npy_rows
from .loaders import load_source, release_memory
from .preprocess import PrepareConfig, attach_item_text, prepare, sample_candidates
from .stage import DATA, Stage, run_stage

SPLITS = ("train", "valid", "test")
INTERACTIONS_FILE, USERS_FILE, ITEMS_FILE = "interactions.parquet", "users.parquet", "items.parquet"  # a data folder's tables
MOVIES, ITEMS = "movies", "items"  # the domains of MovieLens data and of data the loaders cannot name
CANDIDATE_BLOCK_BYTES = 64 << 20  # candidate lists are drawn and written in blocks of users this large
MIN_CUT = 3  # the shortest history prefix an earlier (cut) rationale is written from
_AMAZON_FILE = re.compile(r"^(?:reviews_|meta_)?(?P<name>.+?)(?:_5)?(?:\.jsonl?)?(?:\.gz)?$", re.I)


def _domain_name(category: str) -> str:
    """An Amazon category as the prompts name its items: "Books" -> books, "All_Beauty" -> beauty products."""
    name = re.sub(r"^all\s+", "", category.replace("_", " ").replace("&", "and").strip(), flags=re.I).lower()
    if "movie" in name:
        return MOVIES
    return name if name.endswith("s") else f"{name} products"


def infer_domain(source: str, fmt: str, meta: str | None, items: pd.DataFrame) -> str:
    """What the items of a data set are: MovieLens -> movies; Amazon -> the top category most items
    share, else the category in the file name (reviews_Beauty_5.json.gz); anything else -> items."""
    path = Path(source)
    if source in ("ml-100k", "ml-1m") or fmt == "movielens" or re.match(r"ml-|movielens", path.name, re.I):
        return MOVIES
    if fmt.startswith("amazon") or (fmt == "auto" and ".json" in path.name):
        tops = Counter(c.split(",")[0].strip() for c in items["categories"].fillna("") if c.strip())
        if tops and tops.most_common(1)[0][1] * 2 >= len(items):
            return _domain_name(tops.most_common(1)[0][0])
        m = _AMAZON_FILE.match(Path(meta or source).name)
        if m and m["name"].lower() not in ("reviews", "meta", "data"):
            return _domain_name(m["name"])
    return ITEMS


@dataclass
class SeqDataset:
    path: Path
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    manifest: dict

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        """Real items are 1..num_items; 0 is padding."""
        return len(self.items)

    @cached_property
    def sequences(self) -> list[np.ndarray]:
        """Each user's full chronological item sequence (train + valid + test)."""
        inter = self.interactions
        bounds = np.searchsorted(inter["user"].to_numpy(), np.arange(self.num_users + 1))
        items = inter["item"].to_numpy(dtype=np.int64, copy=True)
        return [items[bounds[u]:bounds[u + 1]] for u in range(self.num_users)]

    @cached_property
    def has_test(self) -> np.ndarray:
        """Whether each user has a test target (always, leave-one-out; temporal: an interaction after the cut)."""
        if "has_test" not in self.users:  # a data folder written before the temporal split
            return np.ones(self.num_users, dtype=bool)
        return self.users["has_test"].to_numpy(dtype=bool)

    def pre_cut(self, user: int) -> int:
        """How many of a user's items come before their test target (all of them without one)."""
        return len(self.sequences[user]) - int(self.has_test[user])

    def eval_users(self, split: str) -> np.ndarray:
        """The users with a target in `split`: every user for validation, those with a test target for test."""
        return np.flatnonzero(self.has_test) if split == "test" else np.arange(self.num_users)

    def history(self, user: int, split: str) -> np.ndarray:
        """The input history for a split: training items for train/valid, + the validation item for test."""
        end = self.pre_cut(user)
        return self.sequences[user][:end if split == "test" else max(end - 1, 0)]

    def rationale_history(self, user: int) -> np.ndarray:
        """What a rationale about a user may see: the training history without its last item.

        That last item is the fused models' training target, and validation/test targets come
        after it, so a rationale never mentions an item it is later asked to predict."""
        return self.sequences[user][:max(self.pre_cut(user) - 2, 0)]

    def rationale_prefixes(self, user: int, cuts: int = 1) -> list[int]:
        """Lengths of the history prefixes a user's rationales are written from, ascending: the last is
        `rationale_history`'s, the others up to `cuts` - 1 evenly spaced below it, none shorter than
        MIN_CUT items (a short history gets fewer). A rationale from a prefix informs only later positions."""
        end = len(self.rationale_history(user))
        return sorted({p for k in range(1, cuts) if (p := end * k // cuts) >= MIN_CUT} | {end})

    def target(self, split: str) -> np.ndarray:
        """The true next item of every user for 'valid' or 'test' (0: the user has none)."""
        if split not in ("valid", "test"):
            raise InputError(f"split must be 'valid' or 'test', not {split!r}")
        ends = [self.pre_cut(u) for u in range(self.num_users)]
        if split == "valid":
            return np.array([s[end - 1] for s, end in zip(self.sequences, ends)], dtype=np.int64)
        return np.array([s[end] if end < len(s) else 0 for s, end in zip(self.sequences, ends)], dtype=np.int64)

    def train_sequences(self) -> list[np.ndarray]:
        """Each user's training history: what came before their validation item."""
        return [s[:max(self.pre_cut(u) - 1, 0)] for u, s in enumerate(self.sequences)]

    def candidates(self, split: str, negatives: int) -> np.ndarray:
        path = self.path / f"candidates_{split}_{negatives}.npy"
        if not path.exists():
            have = sorted(p.name for p in self.path.glob("candidates_*.npy"))
            raise InputError(f"{path}: no fixed candidates for {negatives} negatives (have: {', '.join(have)})")
        return np.load(path, mmap_mode="r")  # rows are read as evaluated: the file can exceed memory

    @cached_property
    def item_popularity(self) -> np.ndarray:
        """Training-interaction count of each item id (index 0 = padding = 0)."""
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for s in self.train_sequences():
            np.add.at(counts, s, 1)
        return counts

    @property
    def domain(self) -> str:
        """What the items are, as the rationale prompts name them (the data stage records it; a data
        folder written before it did is inferred from its recorded source)."""
        counts, cfg = self.manifest.get("counts", {}), self.manifest.get("config", {})
        if "domain" in counts:
            return counts["domain"]
        return infer_domain(str(cfg.get("source", "")), cfg.get("format", "auto"), cfg.get("meta"), self.items)

    @property
    def fingerprint(self) -> str:
        """Content hash of the data files (recorded by the data stage)."""
        return self.manifest["outputs_sha256"]

    def item_texts(self) -> list[str]:
        """Item text by id (index 0 is the empty padding item)."""
        return ["", *self.items.sort_values("item")["text"].tolist()]


def pad_left(seqs: list[np.ndarray], max_len: int | None = None) -> torch.Tensor:
    """Left-pad (0) a batch of histories so the latest item is always in the last column."""
    max_len = max_len or max(1, max(len(s) for s in seqs))
    out = torch.zeros(len(seqs), max_len, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[-max_len:]
        if len(s):
            out[i, -len(s):] = torch.from_numpy(np.array(s, dtype=np.int64))
    return out


def load_dataset(path: str | Path) -> SeqDataset:
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise InputError(f"{path}: not a prepared data set (no {MANIFEST}; run the prepare stage)")
    ds = SeqDataset(
        path=path,
        interactions=pd.read_parquet(path / INTERACTIONS_FILE),
        users=pd.read_parquet(path / USERS_FILE),
        items=pd.read_parquet(path / ITEMS_FILE),
        manifest=read_json(path / MANIFEST),
    )
    return ds


def source_path(cfg: PrepareConfig) -> Path:
    """The raw source: an embedded data set's folder or the user's path."""
    from .assets import recbole_dataset

    if cfg.source in ("ml-100k", "ml-1m") and not Path(cfg.source).exists():
        return recbole_dataset(cfg.source)
    return Path(cfg.source)


class DataStage(Stage):
    """Read raw data, filter, k-core, split (leave-one-out or at a global time cut) and sample fixed
    candidates; writes RUN/data."""

    name = DATA
    config_class = PrepareConfig

    def inputs(self) -> dict[str, Path]:
        files = {"source": source_path(self.config)}
        if self.config.meta is not None:
            files["meta"] = Path(self.config.meta)
        for path in files.values():
            if not path.exists():
                raise InputError(f"{path}: data source not found")
        return files

    def build(self, out: Path) -> dict:
        cfg = self.config
        raw_inter, raw_items = load_source(cfg.source, cfg.format, cfg.meta)
        inter, users, items, cut = prepare(cfg, raw_inter)
        items = attach_item_text(items, raw_items)
        inter.to_parquet(out / INTERACTIONS_FILE, index=False)
        users.to_parquet(out / USERS_FILE, index=False)
        items.to_parquet(out / ITEMS_FILE, index=False)
        ds = SeqDataset(out, inter, users, items, {})
        short: dict[str, int] = {}  # users with fewer never-seen items than the negatives asked for
        for split in ("valid", "test"):
            targets, evaluated = ds.target(split), np.zeros(ds.num_users, dtype=bool)
            evaluated[ds.eval_users(split)] = True
            for n in cfg.negatives:
                short[f"{split}_{n}"] = self.write_candidates(ds, split, targets, evaluated, n, out)
        lengths = np.array([len(s) for s in ds.sequences])
        domain = cfg.domain or infer_domain(cfg.source, cfg.format, cfg.meta, items)
        split = {} if cut is None else {"cut_timestamp": cut, "test_users": int(ds.has_test.sum())}
        return {"domain": domain, "users": ds.num_users, "items": ds.num_items, "interactions": len(inter), **split,
                "raw_interactions": len(raw_inter), "avg_length": round(float(lengths.mean()), 2),
                "density": round(len(inter) / (ds.num_users * ds.num_items), 5),
                "users_with_short_candidate_lists": short}

    def write_candidates(self, ds: SeqDataset, split: str, targets: np.ndarray, evaluated: np.ndarray, n: int,
                         out: Path) -> int:
        """Draw and write one candidate file in blocks of users (an Amazon category's lists are
        gigabytes); returns how many `evaluated` users got fewer than `n` negatives."""
        release_memory()  # what the data stage freed before (its parquet writes)
        step = max(1, CANDIDATE_BLOCK_BYTES // (8 * (n + 1)))
        short = 0

        def blocks() -> Iterator[np.ndarray]:
            nonlocal short
            for start in range(0, ds.num_users, step):
                users = range(start, min(start + step, ds.num_users))
                block = sample_candidates(ds.sequences, targets, ds.num_items, n, self.config.seed, split, users)
                short += int((block[evaluated[start:users.stop], -1] == 0).sum())
                yield block

        save_npy_rows(out / f"candidates_{split}_{n}.npy", (ds.num_users, n + 1), np.int64, blocks())
        return short

    def digest(self, out: Path, counts: dict) -> str:
        """The files' content, and a domain given in the settings: the prompts of later stages say it."""
        files = super().digest(out, counts)
        return files if self.config.domain is None else hashlib.sha256(f"{files}:{counts['domain']}".encode()).hexdigest()


def prepare_dataset(cfg: PrepareConfig, run: str | Path) -> SeqDataset:
    """Run the data stage of `run` (unless up to date) and load the data set."""
    stage = DataStage(run, cfg)
    run_stage(stage)
    return load_dataset(stage.out)
