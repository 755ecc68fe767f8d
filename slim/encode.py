"""Rationale and item-text vectors in LanceDB, re-encoding only rows whose text (or encoder) changed.

Tables (one row per id): id, text, text_sha256, vector (float32, L2-normalised), model, prompt_version.
With rationales at cut points, `user_rationale_cuts` holds the earlier ones (one row per id and
prefix, the history length each saw); `user_rationales` keeps one per user, the end rationale.
`read_vectors` gives the fusion stage numpy matrices aligned to user / item ids.

`processes` > 1 encodes in sentence-transformers' multi-process pool (one process per GPU, or N
processes sharing the CPU cores, each with its share of the threads): the vectors are the
one-process path's to float32 rounding (tests/test_encode_pool: max |difference| under 1e-6,
cosine 1 - 1e-6 and above, on unit vectors).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from eval.assets import minilm_path
from eval.config import setting
from eval.dataset import SeqDataset, load_dataset
from eval.errors import InputError
from eval.io import MANIFEST, read_json
from eval.stage import Stage

from .records import RECORDS, rationale_text, read_cut_records, read_records

USERS_TABLE, ITEMS_TABLE, CUTS_TABLE = "user_rationales", "item_texts", "user_rationale_cuts"
ITEM_VERSION = "item_text"


@dataclass(frozen=True)
class EncodeConfig:
    model: str | None = setting(None, "sentence-transformers folder (none: all-MiniLM-L6-v2).")
    batch_size: int = setting(64, "Texts per encoding batch.")
    prompt_version: str | None = setting(None, "Encode only records of this prompt version (none: any).")
    record_model: str | None = setting(None, "... and of this generating model (none: any; the last record "
                                             "of a user wins).")
    records: str = setting("slim-student-rationales", "The rationale stage whose records are encoded "
                                                      "(slim-student-rationales, profile-rationales, ...).")
    device: str | None = setting(None, "Encoder device (none: automatic).")
    processes: int = setting(1, "Encoding processes (sentence-transformers' multi-process pool): on GPUs one per "
                                "device (cuda:0 ... cuda:N-1), on CPU N processes sharing the cores; 1: this one.")

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise InputError(f"processes: expected at least 1, got {self.processes}")


def pool_devices(device: str | None, processes: int) -> list[str] | None:
    """The devices of an encoding pool of `processes` (None: encode in this process): cuda:0 ... cuda:N-1
    (or another accelerator type's) where the device is one, else N times cpu."""
    if processes == 1:
        return None
    import torch

    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if ":" in kind:
        raise InputError(f"processes = {processes}: device {kind} names one device; give its type ({kind.split(':')[0]}) "
                         f"or none, and the pool takes devices 0 to {processes - 1}")
    if kind == "cpu":
        return ["cpu"] * processes
    count = getattr(torch, kind).device_count() if hasattr(getattr(torch, kind, None), "device_count") else 0
    if processes > count:
        raise InputError(f"processes = {processes}: only {count} {kind} devices here (one process per device)")
    return [f"{kind}:{i}" for i in range(processes)]


class PooledEncoder:
    """A SentenceTransformer that encodes in its multi-process pool over `devices`, started at the first
    `encode` (nothing to encode starts nothing) and stopped by `close`. On CPU each process gets an equal
    share of this process's cores as its threads (OMP_NUM_THREADS while the pool starts)."""

    def __init__(self, model, devices: list[str]):
        self.model, self.devices, self.pool = model, devices, None

    def get_embedding_dimension(self) -> int:
        return self.model.get_embedding_dimension()

    def encode(self, texts: list[str], **kwargs: Any):
        if self.pool is None:
            self.pool = self._start()
        return self.model.encode(texts, pool=self.pool, **kwargs)

    def _start(self):
        if any(d != "cpu" for d in self.devices):
            return self.model.start_multi_process_pool(self.devices)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(max(1, cores // len(self.devices)))
        keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update(dict.fromkeys(keys, threads))  # read by each spawned process as torch starts
        try:
            return self.model.start_multi_process_pool(self.devices)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def close(self) -> None:
        if self.pool is not None:
            self.model.stop_multi_process_pool(self.pool)
            self.pool = None

    def __enter__(self) -> "PooledEncoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_encoder(model_path: str, device: str | None = None, processes: int = 1):
    """A SentenceTransformer, or with `processes` > 1 a `PooledEncoder` of it (close it when done)."""
    from sentence_transformers import SentenceTransformer

    devices = pool_devices(device, processes)
    encoder = SentenceTransformer(model_path, device="cpu" if devices else device)
    return PooledEncoder(encoder, devices) if devices else encoder


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def has_table(db, name: str) -> bool:
    return name in db.list_tables().tables


def upsert_texts(db, table: str, ids: list[int], texts: list[str], versions: list[str], encoder, model_name: str,
                 batch_size: int = 64, prefixes: list[int] | None = None) -> dict[str, int]:
    """Make `table` hold exactly these rows, encoding only new or changed ones; a row is keyed by its
    id, or by (id, prefix) when `prefixes` are given (the cut points' rationales).

    The returned `content_sha256` changes exactly when the table's texts or encoder do (for a
    downstream stage's up-to-date check)."""
    hashes = [sha256(t) for t in texts]
    on = ["id"] if prefixes is None else ["id", "prefix"]
    keys = list(ids) if prefixes is None else list(zip(ids, prefixes))
    old: dict = {}
    if has_table(db, table):
        cols = db.open_table(table).to_arrow().select([*on, "text_sha256", "model"]).to_pydict()
        old_keys = cols["id"] if prefixes is None else zip(cols["id"], cols["prefix"])
        old = {k: (h, m) for k, h, m in zip(old_keys, cols["text_sha256"], cols["model"])}
    todo = [k for k, (key, h) in enumerate(zip(keys, hashes)) if old.get(key) != (h, model_name)]
    stale = sorted(set(old) - set(keys))
    if todo:
        vecs = encoder.encode([texts[k] for k in todo], batch_size=batch_size, normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=len(todo) > batch_size).astype(np.float32)
        rows = pa.table({
            "id": pa.array([ids[k] for k in todo], pa.int64()),
            **({} if prefixes is None else {"prefix": pa.array([prefixes[k] for k in todo], pa.int64())}),
            "text": [texts[k] for k in todo],
            "text_sha256": [hashes[k] for k in todo],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), vecs.shape[1]),
            "model": [model_name] * len(todo),
            "prompt_version": [versions[k] for k in todo]})
        if len(todo) == len(ids):  # nothing kept (new table or new encoder, maybe a new dim): rewrite
            db.create_table(table, data=rows, mode="overwrite")
            stale = []
        else:
            db.open_table(table).merge_insert(on).when_matched_update_all().when_not_matched_insert_all().execute(rows)
    if stale:
        where = (f"id IN ({', '.join(map(str, stale))})" if prefixes is None
                 else " OR ".join(f"(id = {i} AND prefix = {p})" for i, p in stale))
        db.open_table(table).delete(where)
    content = sha256("".join(f"{k}:{h}\n" for k, h in sorted(zip(keys, hashes))) + model_name)
    return {"rows": len(ids), "encoded": len(todo), "deleted": len(stale), "content_sha256": content}


def read_vectors(db_path: str | Path, table: str, keys: tuple[str, ...] = ("id",)) -> tuple[np.ndarray, ...]:
    """(each key column as int64, then a float32 matrix whose row k is row k's vector), sorted by the keys."""
    import lancedb

    db = lancedb.connect(str(db_path))
    if not has_table(db, table):
        raise InputError(f"{db_path}: no table '{table}' (run slim encode)")
    t = db.open_table(table).to_arrow().select([*keys, "vector"]).sort_by([(k, "ascending") for k in keys])
    dim = t.schema.field("vector").type.list_size
    vectors = t["vector"].combine_chunks().flatten().to_numpy().reshape(len(t), dim).astype(np.float32)
    return (*(t[k].to_numpy() for k in keys), vectors)


def read_cut_vectors(db_path: str | Path, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, prefixes, vectors) of the rationales at earlier cut points, by user then prefix;
    empty where the vectors stage wrote none."""
    import lancedb

    if not has_table(lancedb.connect(str(db_path)), CUTS_TABLE):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return read_vectors(db_path, CUTS_TABLE, ("id", "prefix"))


class VectorsStage(Stage):
    """Encode a rationale stage's records (the SLIM student's by default) and every item's text into
    LanceDB (tables user_rationales, item_texts, and user_rationale_cuts when the rationale stage writes
    several per user), re-encoding only changed rows; writes RUN/vectors."""

    name = "vectors"
    config_class = EncodeConfig
    in_place = True

    def inputs(self) -> dict[str, Path]:
        files = {"data": self.data_dir, "records": self.run / self.config.records}
        if self.config.model is None:  # the embedded default may change with its package; a path is in the config
            files["encoder"] = minilm_path()
        return files

    def build(self, out: Path) -> dict[str, Any]:
        import lancedb

        cfg = self.config
        model_path = str(cfg.model or minilm_path())
        ds = load_dataset(self.data_dir)
        records = self.run / self.config.records / RECORDS
        recs = read_records(records, cfg.prompt_version, cfg.record_model)
        users = sorted(u for u, r in recs.items() if rationale_text(r))
        if not users:
            raise InputError(f"{records}: no rationale text to encode")
        encoder = load_encoder(model_path, cfg.device, cfg.processes)
        db = lancedb.connect(str(out))
        items = ds.items.sort_values("item")
        try:
            counts = {
                USERS_TABLE: upsert_texts(db, USERS_TABLE, users, [rationale_text(recs[u]) for u in users],
                                          [recs[u]["prompt_version"] for u in users], encoder, model_path,
                                          cfg.batch_size),
                ITEMS_TABLE: upsert_texts(db, ITEMS_TABLE, items["item"].astype(int).tolist(),
                                          items["text"].fillna("").tolist(), [ITEM_VERSION] * len(items), encoder,
                                          model_path, cfg.batch_size),
            }
            cuts = self.cut_records(ds)
            if cuts:
                pairs = sorted(cuts)
                counts[CUTS_TABLE] = upsert_texts(db, CUTS_TABLE, [u for u, _ in pairs],
                                                  [rationale_text(cuts[k]) for k in pairs],
                                                  [cuts[k]["prompt_version"] for k in pairs], encoder, model_path,
                                                  cfg.batch_size, prefixes=[p for _, p in pairs])
            elif has_table(db, CUTS_TABLE):  # the rationale stage no longer asks for cuts
                db.drop_table(CUTS_TABLE)
        finally:
            if isinstance(encoder, PooledEncoder):
                encoder.close()
        return {**counts, "dim": encoder.get_embedding_dimension()}

    def cut_records(self, ds: SeqDataset) -> dict[tuple[int, int], dict[str, Any]]:
        """The records at earlier cut points that the rationale stage's `cuts` setting asks for (its
        append-only records may hold more, written with another setting), with text."""
        folder = self.run / self.config.records
        cuts = read_json(folder / MANIFEST).get("config", {}).get("cuts", 1) if (folder / MANIFEST).exists() else 1
        if cuts == 1:
            return {}
        recs = read_cut_records(folder / RECORDS, self.config.prompt_version, self.config.record_model)
        return {(u, p): r for (u, p), r in recs.items()
                if rationale_text(r) and p in ds.rationale_prefixes(u, cuts)[:-1]}

    def digest(self, out: Path, counts: dict[str, Any]) -> str:
        """The tables' content (ids, text hashes, encoder), not LanceDB's files, which change on every write."""
        tables = [counts[t]["content_sha256"] for t in (USERS_TABLE, ITEMS_TABLE, CUTS_TABLE) if t in counts]
        return sha256("".join(tables))


@dataclass(frozen=True)
class ProfileEncodeConfig(EncodeConfig):
    records: str = setting("profile-rationales", "The rationale stage whose records are encoded (the no-LLM "
                                                 "profile control by default).")


class ProfileVectorsStage(VectorsStage):
    """The same encoding over the no-LLM profile records, so any fused model can read the control
    (`vectors = "vectors-profile"` in its table); writes RUN/vectors-profile. `fusion run` builds it
    only for a preset with a [vectors-profile] table (the study and paper presets)."""

    name = "vectors-profile"
    config_class = ProfileEncodeConfig
    optional = True
