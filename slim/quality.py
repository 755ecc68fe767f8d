"""How good the rationales are, per source: the teacher's, the SLIM student's and the no-LLM control's.

Per source: well-formed share (the three steps, judged by the current parser), distinct share, and
grounding in the catalogue (`slim.grounding`, recomputed on read so every source is judged by the
same matcher): the share of step-3 entries that name a catalogue item, of step-2 entries that name
a catalogue category or brand, the share of step-3 items copied from the user's own history, and the
hit rate of step-3 items on the user's next item (the one right after the history the prompt saw:
the fused models' training target). On the users held out from the student's fine-tuning
(`RUN/slim-student/heldout_users.json`), each source's agreement with the teacher (ROUGE-L F1 and
the cosine of their all-MiniLM-L6-v2 embeddings) and the hit rates on those same users.
Writes RUN/quality/quality.json and quality.md (a section of the run's report).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval.assets import minilm_path
from eval.config import setting
from eval.dataset import SeqDataset, load_dataset
from eval.errors import InputError
from eval.io import MANIFEST, read_json, write_json
from eval.stage import Stage
from eval.tables import markdown_table

from .finetune import HELDOUT, SlimStudentStage
from .grounding import Catalogue, catalogue_of
from .profile import ProfileRationalesStage
from .prompts import instruction_words
from .rationales import TeacherRationalesStage
from .records import RECORDS, parse_steps, rationale_text, read_records, words_of
from .student import StudentRationalesStage

SOURCES = {"teacher": TeacherRationalesStage.name, "student": StudentRationalesStage.name,
           "profile": ProfileRationalesStage.name}  # the control: no LLM
QUALITY_MD = "quality.md"
SOURCE_COLUMNS = ["records", "well_formed", "distinct", "step3_grounded", "step2_grounded", "step3_items",
                  "step3_from_history", "next_item_hit"]
HELDOUT_COLUMNS = ["users", "rouge_l_f1", "cosine", "next_item_hit"]


@dataclass(frozen=True)
class QualityConfig:
    encoder: str | None = setting(None, "sentence-transformers folder of the agreement cosine (none: "
                                        "all-MiniLM-L6-v2, the vectors stage's default).")
    examples: int = setting(2, "Held-out users whose teacher and student rationales the report shows side by side.")


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-case alphanumeric tokens (rouge-score's default tokenisation, no stemming)."""
    a, b = words_of(candidate), words_of(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:  # longest common subsequence, one row at a time
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


def graded(folder: Path, ds: SeqDataset, catalogue: Catalogue) -> dict[int, dict[str, Any]]:
    """A rationale stage's records of its latest run (its manifest's prompt version and model), each
    with its steps re-parsed from its text and grounded against the catalogue and the user's history."""
    counts = read_json(folder / MANIFEST).get("counts", {}) if (folder / MANIFEST).exists() else {}
    out = {}
    for u, rec in read_records(folder / RECORDS, counts.get("prompt_version"), counts.get("model")).items():
        if not 0 <= u < ds.num_users:
            raise InputError(f"{folder / RECORDS}: a record of user {u}, who is not in {ds.path}")
        steps, error = parse_steps(rec.get("text") or "", instruction_words(rec["prompt_version"], ds.domain))
        grounding = catalogue.ground(steps, ds.rationale_history(u).tolist())
        out[u] = {**rec, **steps, **grounding, "error": error, "next_item": int(ds.history(u, "valid")[-1])}
    return out


def _share(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def hit_rate(recs: list[dict[str, Any]]) -> float | None:
    """Share of users whose next item is among the items their step 3 names."""
    return _share(sum(r["next_item"] in r["step3_items"] for r in recs), len(recs))


def source_metrics(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One source's quality over its records (graded)."""
    items = sum(len(r["step3_items"]) for r in recs)
    return {"records": len(recs),
            "well_formed": _share(sum(r["error"] is None for r in recs), len(recs)),
            "distinct": _share(len({rationale_text(r) for r in recs}), len(recs)),
            "step3_grounded": _share(sum(r["step3_grounded"] for r in recs), sum(r["step3_entries"] for r in recs)),
            "step2_grounded": _share(sum(r["step2_grounded"] for r in recs), sum(r["step2_entries"] for r in recs)),
            "step3_items": _share(items, len(recs)),
            "step3_from_history": _share(sum(len(r["step3_in_history"]) for r in recs), items),
            "next_item_hit": hit_rate(recs)}


def heldout_metrics(sources: dict[str, dict[int, dict[str, Any]]], users: list[int],
                    encode) -> dict[str, dict[str, Any]]:
    """On the held-out users every source has a record for: agreement with the teacher and hit rates.
    `encode` maps texts to L2-normalised vectors."""
    rows = {}
    teacher = sources["teacher"]
    for name, recs in sources.items():
        both = [u for u in users if u in recs and u in teacher]
        row: dict[str, Any] = {"users": len(both), "next_item_hit": hit_rate([recs[u] for u in both])}
        if name != "teacher" and both:
            texts = [rationale_text(recs[u]) for u in both]
            refs = [rationale_text(teacher[u]) for u in both]
            row["rouge_l_f1"] = round(float(np.mean([rouge_l_f1(t, r) for t, r in zip(texts, refs)])), 4)
            row["cosine"] = round(float(np.mean(np.sum(encode(texts) * encode(refs), axis=1))), 4)
        rows[name] = row
    return rows


def quality_markdown(q: dict[str, Any]) -> str:
    """quality.md: the per-source table, the held-out table and the side-by-side examples."""
    parts = ["## Rationale quality", "",
             "Shares over each source's records; grounding by tolerant title/category matching against the "
             "catalogue (`slim/grounding.py`); *profile* is the control written with no LLM. step3_grounded: "
             "step-3 entries naming a catalogue item; step2_grounded: step-2 entries naming a catalogue category "
             "or brand; step3_items: catalogue items named per record; step3_from_history: share of them the user "
             "already had; next_item_hit: users whose next item step 3 names.", "",
             markdown_table(q["sources"], columns=SOURCE_COLUMNS)]
    held = q["heldout"]
    parts += ["", f"Held-out users (not in the student's fine-tuning): {held['note']}"]
    if held["sources"]:
        parts += ["", "Agreement with the teacher on them (ROUGE-L F1, cosine of all-MiniLM-L6-v2 embeddings) "
                      "and hit rates on the same users:", "",
                  markdown_table(held["sources"], columns=HELDOUT_COLUMNS)]
    for ex in q["examples"]:
        parts += ["", f"User {ex['raw_user']}, teacher:", "", "```", ex["teacher"], "```", "", "student:", "",
                  "```", ex["student"], "```"]
    return "\n".join(parts) + "\n"


class QualityStage(Stage):
    """Rationale quality of every rationale source of the run (teacher, SLIM student, no-LLM control):
    well-formed, distinct, grounded in the catalogue, agreement on held-out users, next-item hits;
    writes RUN/quality (quality.json, quality.md)."""

    name = "quality"
    config_class = QualityConfig

    def sources(self) -> dict[str, Path]:
        return {name: self.run / folder for name, folder in SOURCES.items() if (self.run / folder / RECORDS).exists()}

    @property
    def heldout_path(self) -> Path:
        return self.run / SlimStudentStage.name / HELDOUT

    def inputs(self) -> dict[str, Path]:
        sources = self.sources()
        if not sources:
            raise InputError(f"{self.run}: no rationale records to judge (run a rationale stage first)")
        files = {"data": self.data_dir, **sources}
        if self.heldout_path.exists():
            files["heldout"] = self.heldout_path
        if self.config.encoder is None:
            files["encoder"] = minilm_path()
        return files

    def heldout_users(self) -> list[int]:
        if not self.heldout_path.exists():
            return []
        users = read_json(self.heldout_path)
        if not isinstance(users, list) or not all(isinstance(u, int) for u in users):
            raise InputError(f"{self.heldout_path}: expected a JSON list of user ids")
        return sorted(users)

    def build(self, out: Path) -> dict[str, Any]:
        ds = load_dataset(self.data_dir)
        catalogue = catalogue_of(ds.items)
        graded_sources = {name: graded(folder, ds, catalogue) for name, folder in self.sources().items()}
        q: dict[str, Any] = {"domain": ds.domain, "sources": {name: source_metrics(list(recs.values()))
                                                              for name, recs in graded_sources.items()}}
        users = self.heldout_users()
        held: dict[str, Any] = {"users": users, "sources": {}}
        if not users:
            held["note"] = f"none ({self.heldout_path} absent or empty)"
        elif "teacher" not in graded_sources:
            held["note"] = f"{len(users)}, but the run has no teacher records"
        else:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(self.config.encoder or minilm_path()))
            held["sources"] = heldout_metrics(graded_sources, users, lambda texts: model.encode(
                texts, normalize_embeddings=True, convert_to_numpy=True))
            held["note"] = f"{len(users)} in {self.heldout_path.name}"
        q["heldout"] = held
        teacher, student = graded_sources.get("teacher", {}), graded_sources.get("student", {})
        shown = [u for u in users if u in teacher and u in student][:self.config.examples]
        q["examples"] = [{"user": u, "raw_user": str(ds.users["raw_id"].iat[u]),
                          "teacher": rationale_text(teacher[u]), "student": rationale_text(student[u])} for u in shown]
        write_json(out / "quality.json", q)
        (out / QUALITY_MD).write_text(quality_markdown(q))
        return {**{name: m["records"] for name, m in q["sources"].items()}, "heldout_users": len(users)}


def quality_section(run: Path) -> str:
    """The run's quality.md, for the run's report ("" when the quality stage has not run)."""
    path = run / QualityStage.name / QUALITY_MD
    return "\n" + path.read_text() if path.exists() else ""
