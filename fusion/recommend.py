"""What a finished run gives a person: a user's history, their rationale and top-k items with evidence.

`Recommender` loads one model of a run (the best fused model by default) with the run's data,
rationale records and text vectors. Items are retrieved from the model's item vectors stored in
LanceDB (`RUN/serving`, written once per model checkpoint): exact search for small catalogues, an
IVF-PQ index for large ones (`ann_recall` measures what the index loses). Every recommended item
comes with the evidence that links it to the user's rationale: the step-2 categories it has, the
step-3 title it matches, and the cosine of its text vector to the rationale vector.

Ids outside this module are the data set's raw ids (users.parquet / items.parquet `raw_id`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from eval.dataset import SeqDataset, load_dataset, pad_left
from eval.errors import InputError, user_path
from eval.io import CONFIG, MANIFEST, METRICS_FILE, read_json
from eval.preprocess import item_title
from eval.registry import load_model, max_len_of
from eval.scoring import DotScorer
from eval.stage import DATA, fingerprint
from slim.encode import VectorsStage, has_table
from slim.grounding import Word, find, key_words, split_categories, words
from slim.records import RECORDS, read_records
from slim.student import StudentRationalesStage

from .model import FusedRecommender, vectors_to_tensors
from .report import ReportConfig, ReportStage, best_by_selection, find_models, selection_scores
from .vectors import load_vectors

SERVING = "serving"        # RUN/serving: LanceDB tables of the served models' item vectors
RECENT = 10                # history items shown (the most recent)
MAX_K = 100                # most items one answer recommends
ANN_MIN_ROWS = 50_000      # catalogues this large get an IVF-PQ index (exact search: ~8 ms at 20k rows, ~60 at 200k)
NPROBES, REFINE = 50, 10   # IVF partitions probed; candidates re-ranked exactly per result (recall@10 0.94 on
                           # 20k random 64-dim vectors, 78 partitions; 20 probes: 0.68)


class UnknownId(InputError):
    """A user or item id the data set does not have (HTTP 404; other input errors are 422)."""


@dataclass(frozen=True)
class Rationale:
    """A rationale record's steps 2 and 3 as words, read once per answer."""
    step2: list[Word]
    step3_text: str
    step3: list[Word]

    @classmethod
    def of(cls, rec: dict[str, Any] | None) -> "Rationale | None":
        if not rec:
            return None
        return cls(words(rec.get("step2")), rec.get("step3") or "", words(rec.get("step3")))

    def categories(self, categories: list[str]) -> list[str]:
        return [c for c in categories if find(key_words(c), self.step2)]

    def title(self, title: str) -> str | None:
        """The part of step 3 that names `title`, as written there."""
        span = find(key_words(title), self.step3)
        return None if span is None else self.step3_text[span[0]:span[1]]


# --- retrieval over the model's item vectors ---

class ItemIndex:
    """One model's item vectors in a LanceDB table, searched by dot product (the models' score)."""

    def __init__(self, table: Any, ann: bool, nprobes: int = NPROBES, refine: int = REFINE):
        self.table, self.ann, self.nprobes, self.refine = table, ann, nprobes, refine

    @classmethod
    def create(cls, folder: str | Path, name: str, ids: np.ndarray, vectors: np.ndarray, ann: bool) -> "ItemIndex":
        """The table `name` in `folder` holding these rows (written unless it exists: names are content-addressed),
        with an IVF-PQ index when `ann` (LanceDB needs >= 256 rows to train one)."""
        import lancedb
        from lancedb.index import IvfPq

        db = lancedb.connect(str(folder))
        if has_table(db, name):
            table = db.open_table(name)
        else:
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            table = db.create_table(name, data=pa.table({
                "id": pa.array(np.asarray(ids, dtype=np.int64)),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])}))
        if ann and len(ids) < 256:
            raise InputError(f"{name}: an IVF-PQ index needs at least 256 rows, not {len(ids)}")
        if ann and not table.list_indices():
            dim = vectors.shape[1]
            table.create_index("vector", config=IvfPq(
                distance_type="dot", num_partitions=max(1, math.isqrt(len(ids))),  # LanceDB caps it at rows/256
                num_sub_vectors=max(d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0)))  # ~4 dims a code
        return cls(table, ann)

    def search(self, query: np.ndarray, k: int, exclude: set[int] = frozenset()) -> np.ndarray:
        """Ids of the k rows with the largest dot product with `query`, never one in `exclude`."""
        q = self.table.search(np.asarray(query, dtype=np.float32)).distance_type("dot").limit(k)
        if exclude:
            q = q.where(f"id NOT IN ({', '.join(map(str, sorted(exclude)))})", prefilter=True)
        if self.ann:
            q = q.nprobes(self.nprobes).refine_factor(self.refine)
        return q.select(["id", "_distance"]).to_arrow()["id"].to_numpy()


def ann_recall(vectors: np.ndarray, queries: np.ndarray, k: int, folder: str | Path,
               nprobes: int = NPROBES, refine: int = REFINE) -> float:
    """Recall@k of IVF-PQ search against exact search over the same vectors, averaged over the queries."""
    ids = np.arange(len(vectors))
    exact = ItemIndex.create(folder, "exact", ids, vectors, ann=False)
    ann = ItemIndex.create(folder, "ann", ids, vectors, ann=True)
    ann.nprobes, ann.refine = nprobes, refine
    hits = sum(len(set(exact.search(q, k)) & set(ann.search(q, k))) for q in queries)
    return hits / (k * len(queries))


# --- the recommender of a run ---

def check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise InputError(f"k: must be between 1 and {MAX_K}, not {k}")


def default_model(run: Path) -> str:
    """The run's fused model with the best validation MRR on every user under the report's protocol,
    else SASRec. Each model's own training log is no measure: they select on different users."""
    fused = {name: path for name, path in find_models(run).items() if name.startswith("fusion/")}
    if fused:
        return best_by_selection(_selection(run, fused))
    if (run / "sasrec" / CONFIG).exists():
        return "sasrec"
    raise InputError(f"{run}: no trained model to recommend with (run `fusion run` first)")


def _selection(run: Path, fused: dict[str, Path]) -> dict[str, dict[str, float]]:
    """The report's selection table when the report scored these very models, else the same scores now."""
    report = run / ReportStage.name
    manifest = read_json(report / MANIFEST) if (report / MANIFEST).is_file() else {}
    if all(manifest.get("inputs", {}).get(name) == fingerprint(path) for name, path in fused.items()):
        scores = read_json(report / METRICS_FILE).get("selection", {})
        if set(scores) == set(fused):
            return scores
    protocol = manifest.get("config", {}).get("analysis_protocol", ReportConfig().analysis_protocol)
    return selection_scores(fused, load_dataset(run / DATA), protocol)


@torch.inference_mode()
def new_user_vector(model: DotScorer, histories: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """The user vector of someone the model was not trained with: a fused model reads the history and
    the rationale vector (or its learned "missing" vector; `FusedRecommender.new_user_vectors`), where
    its `user_vectors` looks the text vector up by user id; any other model reads the history."""
    if isinstance(model, FusedRecommender):
        return model.new_user_vectors(histories, text)
    return model.user_vectors(torch.zeros(len(histories), dtype=torch.long), histories)  # backbones ignore the id


class Recommender:
    """One model of a run with everything an answer shows; loaded once, then asked many times."""

    def __init__(self, run: str | Path, name: str | None = None, ann_min_rows: int = ANN_MIN_ROWS):
        self.run = Path(run)
        self.ds: SeqDataset = load_dataset(self.run / DATA)
        self.name = name or default_model(self.run)
        path = user_path(self.run / self.name, "model", "a model folder of the run")  # this folder alone
        self.model = load_model(path)
        self.max_len = max_len_of(path)
        with torch.inference_mode():
            self.item_vectors = self.model.item_vectors().detach().float()
        n = self.ds.num_items
        table = f"{self.name.replace('/', '--')}-{fingerprint(path)[:16]}"
        self.index = ItemIndex.create(self.run / SERVING, table, np.arange(1, n + 1), self.item_vectors[1:].numpy(),
                                      ann=n >= max(ann_min_rows, 256))
        self.users = {str(r): int(u) for u, r in zip(self.ds.users["user"], self.ds.users["raw_id"])}
        items = self.ds.items.sort_values("item")
        self.items = {str(r): int(i) for i, r in zip(items["item"], items["raw_id"])}
        self.item_rows = [None, *items.to_dict("records")]  # by item id
        self.rationales = self._rationales()
        self.user_text = self.item_text = None  # rationale / item-text vectors by id, with has-vector masks
        if (self.run / VectorsStage.name).exists():
            v = load_vectors(self.run / VectorsStage.name)
            self.user_text = vectors_to_tensors(v.user_ids, v.user_vectors, self.ds.num_users, v.dim)
            self.item_text = vectors_to_tensors(v.item_ids, v.item_vectors, self.ds.num_items + 1, v.dim)

    @property
    def rationale_stage(self) -> str:
        """The rationale stage whose records the vectors encode (the SLIM student's by default)."""
        return self.vectors_config().get("records") or StudentRationalesStage.name

    def _rationales(self) -> dict[int, dict[str, Any]]:
        """The records the vectors stage encoded, by user (none for a run without the SLIM stages)."""
        records = self.run / self.rationale_stage / RECORDS
        if not records.exists():
            return {}
        cfg = self.vectors_config()
        return read_records(records, cfg.get("prompt_version"), cfg.get("record_model"))

    def vectors_config(self) -> dict[str, Any]:
        """The settings the vectors stage ran with (encoder, which records); {} when unknown."""
        manifest = self.run / VectorsStage.name / MANIFEST
        return read_json(manifest).get("config", {}) if manifest.exists() else {}

    # --- ids ---
    def user_of(self, raw: str) -> int:
        if str(raw) not in self.users:
            raise UnknownId(f"unknown user '{raw}' (user ids are the data set's raw ids, e.g. "
                            f"'{self.ds.users['raw_id'].iat[0]}')")
        return self.users[str(raw)]

    def items_of(self, raws: list[str]) -> list[int]:
        unknown = [str(r) for r in raws if str(r) not in self.items]
        if unknown:
            raise UnknownId(f"unknown item id{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown[:5]))}"
                            f"{' ...' if len(unknown) > 5 else ''} (item ids are the data set's raw ids)")
        return [self.items[str(r)] for r in raws]

    def item(self, item: int) -> dict[str, Any]:
        row = self.item_rows[item]
        return {"id": str(row["raw_id"]), "title": item_title(row), "year": row["year"] or None,
                "categories": split_categories(row["categories"])}

    def item_details(self, raw: str) -> dict[str, Any]:
        (item,) = self.items_of([raw])
        row = self.item_rows[item]
        return {**self.item(item), "brand": row["brand"] or None, "text": row["text"],
                "interactions": int(self.ds.item_popularity[item])}

    # --- answers ---
    def for_user(self, raw: str, k: int = 10) -> dict[str, Any]:
        """A known user: their full sequence, the rationale the run wrote for them, the model's top k."""
        check_k(k)
        u = self.user_of(raw)
        history = self.ds.sequences[u]
        with torch.inference_mode():
            vec = self.model.user_vectors(torch.tensor([u]), pad_left([history], self.max_len))[0]
        text = self.user_text[0][u] if self.user_text is not None and self.user_text[1][u] else None
        return self.answer(str(raw), history, vec, k, self.rationales.get(u), text)

    def for_history(self, items: list[int], k: int, rationale: dict[str, Any] | None,
                    text: torch.Tensor | None) -> dict[str, Any]:
        """A new user: a history of item ids and the rationale (and its vector) written for it."""
        check_k(k)
        if not items:
            raise InputError("history: give at least one item id")
        vec = new_user_vector(self.model, pad_left([np.array(items)], self.max_len), text)[0]
        return self.answer(None, np.array(items), vec, k, rationale, text)

    def answer(self, user: str | None, history: np.ndarray, vec: torch.Tensor, k: int,
               rationale: dict[str, Any] | None, text: torch.Tensor | None) -> dict[str, Any]:
        """The answer both entry points give: history, rationale, top k with evidence (as JSON values)."""
        ids = self.index.search(vec.numpy(), k, exclude={int(i) for i in history})
        scores = (self.item_vectors[torch.tensor(ids, dtype=torch.long)] @ vec).tolist()
        ranked = sorted(zip(ids.tolist(), scores), key=lambda p: -p[1])  # exact scores decide the order
        steps = Rationale.of(rationale)
        recs = []
        for rank, (item, score) in enumerate(ranked, 1):
            info = self.item(item)
            cosine = None
            if text is not None and self.item_text is not None and self.item_text[1][item]:
                cosine = round(float(F.cosine_similarity(text, self.item_text[0][item], dim=0)), 4)
            evidence = {"categories": steps.categories(info["categories"]) if steps else [],
                        "title": steps.title(info["title"]) if steps else None, "cosine": cosine}
            recs.append({"rank": rank, **info, "score": round(score, 4), "evidence": evidence})
        return {"user": user, "model": self.name, "history_length": len(history),
                "history": [self.item(int(i)) for i in history[::-1][:RECENT]],
                "rationale": None if rationale is None else
                {f: rationale.get(f) for f in ("step1", "step2", "step3", "text", "error", "model")},
                "recommendations": recs}


def label(item: dict[str, Any]) -> str:
    return f"{item['title']} ({item['year']})" if item.get("year") else item["title"]


def show(answer: dict[str, Any]) -> None:
    """An answer for the terminal: history, rationale, and the recommendations with their evidence."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    out = Console(width=160, highlight=False)
    out.print(f"[bold]user {escape(str(answer['user']))}[/bold]: {answer['history_length']} items; "
              f"model {escape(answer['model'])}")
    out.print("Recent history, latest first:")
    for item in answer["history"]:
        out.print(f"  - {escape(label(item))}")
    r = answer["rationale"]
    if r is None:
        out.print("Rationale: none written for this user")
    elif r["error"]:
        out.print(f"Rationale ({escape(str(r['model']))}), off-format ({escape(r['error'])}):")
        out.print(f"  {escape(r['text'] or '')}")
    else:
        out.print(f"Rationale ({escape(str(r['model']))}):")
        for i in (1, 2, 3):
            out.print(f"  Step {i}: {escape(r[f'step{i}'])}")
    table = Table(title=f"Top {len(answer['recommendations'])}")
    for col in ("#", "item", "title", "score", "step-2 category", "step-3 title", "cosine"):
        table.add_column(col, justify="right" if col in ("#", "score", "cosine") else "left")
    for x in answer["recommendations"]:
        ev = x["evidence"]
        table.add_row(str(x["rank"]), escape(x["id"]), escape(label(x)), f"{x['score']:.4f}",
                      escape(", ".join(ev["categories"])) or "-", escape(ev["title"] or "-"),
                      "-" if ev["cosine"] is None else f"{ev['cosine']:.3f}")
    out.print(table)
