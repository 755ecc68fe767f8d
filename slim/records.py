"""Append-only JSONL rationale records, keyed by (user, prompt version, model, prefix).

A user's end rationale (written from `SeqDataset.rationale_history`) has no "prefix"; an earlier
one, written at a cut point (`SeqDataset.rationale_prefixes`), carries `"prefix": n`, the length of
the history it saw. Readers wanting one rationale per user get the end one (`read_records`).

Each record is one line written with flush + fsync, so a killed run loses at most the line it was
writing; that torn last line is dropped on the next open and the run resumes after the last
complete record, never writing a key twice.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from eval.config import setting
from eval.dataset import MIN_CUT
from eval.errors import InputError, user_path, valid_text

RECORDS = "records.jsonl"  # the file of records in a rationale stage's folder
STEPS = ("step1", "step2", "step3")
# any "Step N" line label: a step past the third ends the third (small models run on to "Step 4...")
_LABEL = re.compile(r"^[#*\s-]*step\s*(\d+)\s*\**\s*[:.)-]?\s*\**\s*", re.I | re.M)
_PLACEHOLDER = re.compile(r"^<[^<>]*>$")
_WORD = re.compile(r"[a-z0-9]+")
ECHO_SHARE = 0.8  # a step with this share of its words from the prompt's instructions copies them

Key = tuple[int, str, str, int | None]
KEY_TYPES = {"user": int, "prompt_version": str, "model": str, "prefix": int}  # the fields of a key


def key_of(rec: dict[str, Any]) -> Key:
    return int(rec["user"]), rec["prompt_version"], rec["model"], rec.get("prefix")


def cuts_setting() -> Any:
    """The `cuts` setting of the rationale stages that cover every user (the student's, the profile's)."""
    return setting(1, "Rationales per user: 1 writes one from the history up to the fused models' last training "
                      "target; more adds earlier ones from evenly spaced shorter prefixes (at least "
                      f"{MIN_CUT} items each), which joint fusion reads at the positions after their prefix.")


def check_cuts(cuts: int, stage: str) -> None:
    if cuts < 1:
        raise InputError(f"{stage}.cuts must be at least 1, not {cuts}")


def words_of(text: str) -> list[str]:
    """Lower-case alphanumeric tokens: how answers are compared with their prompt and with each other."""
    return _WORD.findall(text.lower())


def parse_steps(text: str, instructions: frozenset[str] = frozenset()) -> tuple[dict[str, str], str | None]:
    """The three steps of an answer as fields, and an error naming what is missing (None if complete).

    `instructions` are the words of the prompt's own instructions (without the history): a step made
    of them is a small model copying the format line ("Step 2: categories of movies to recommend")."""
    marks = list(_LABEL.finditer(text or ""))
    steps: dict[str, str] = {}
    for m, nxt in zip(marks, [*marks[1:], None]):
        name = f"step{m.group(1)}"
        body = text[m.end():nxt.start() if nxt else len(text)].strip()
        if name in STEPS and name not in steps and body:
            steps[name] = body
    missing = [s for s in STEPS if s not in steps]
    if missing:
        return {s: steps.get(s, "") for s in STEPS}, f"missing {', '.join(missing)}"
    echoed = [s for s in STEPS if _PLACEHOLDER.match(steps[s])]  # a small model copying the format line
    if echoed:
        return steps, f"placeholder in {', '.join(echoed)}"
    copied = [s for s in STEPS if instructions and _copied(words_of(steps[s]), instructions)]
    return steps, (f"copies the prompt's instructions in {', '.join(copied)}" if copied else None)


def _copied(body: list[str], instructions: frozenset[str]) -> bool:
    return sum(w in instructions for w in body) >= ECHO_SHARE * len(body)


def rationale_text(rec: dict[str, Any]) -> str:
    """The canonical text of a record: its three steps, labelled (the raw answer if unparsed)."""
    if all(rec.get(s) for s in STEPS):
        return "\n".join(f"Step {i}: {rec[s]}" for i, s in enumerate(STEPS, 1))
    return (rec.get("text") or "").strip()


def _read(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a file, each checked for its key fields and its text made valid
    Unicode (a lone surrogate, as a JSON escape, would fail the next writer: parquet, the encoder)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return  # torn last line of a killed run
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not a JSON record ({e.msg})") from None
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not isinstance(rec, dict) or not {"user", "prompt_version", "model"} <= rec.keys():
                raise InputError(f"{path}:{n}: record lacks user/prompt_version/model")
            for name, kind in KEY_TYPES.items():
                if name in rec and (isinstance(rec[name], bool) or not isinstance(rec[name], kind)):
                    raise InputError(f"{path}:{n}: field '{name}' is not {'an integer' if kind is int else 'text'}: "
                                     f"{rec[name]!r}")
            yield valid_text(rec)


def _matching(path: str | Path, prompt_version: str | None, model: str | None,
              ok_only: bool) -> Iterator[dict[str, Any]]:
    """The records of a file in order, filtered by prompt version / model / no error."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no rationale records")
    for rec in _read(user_path(path, "file", "a rationale records file")):
        if (prompt_version in (None, rec["prompt_version"]) and model in (None, rec["model"])
                and not (ok_only and rec.get("error"))):
            yield rec


def read_records(path: str | Path, prompt_version: str | None = None, model: str | None = None,
                 ok_only: bool = False) -> dict[int, dict[str, Any]]:
    """Each user's end rationale record (the last one per user wins; cut records are left out),
    filtered by prompt version / model / no error."""
    return {int(rec["user"]): rec for rec in _matching(path, prompt_version, model, ok_only) if "prefix" not in rec}


def read_cut_records(path: str | Path, prompt_version: str | None = None,
                     model: str | None = None) -> dict[tuple[int, int], dict[str, Any]]:
    """The earlier (cut) rationale records by (user, prefix), the last one per pair winning."""
    return {(int(rec["user"]), int(rec["prefix"])): rec
            for rec in _matching(path, prompt_version, model, False) if "prefix" in rec}


class RecordLog:
    """An open append-only record file that knows which keys it already holds."""

    def __init__(self, path: str | Path):
        self.path = user_path(path, "file", "a rationale records file", must_exist=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keys: set[Key] = set()
        self._f = open(self.path, "a", encoding="utf-8")
        try:  # one writer at a time: a second run on the same file would interleave and duplicate
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            raise InputError(f"{self.path}: another run is writing these records") from None
        if self.path.stat().st_size:
            try:
                self.keys = {key_of(rec) for rec in _read(self.path)}
            except InputError:
                self._f.close()
                raise
            with open(self.path, "rb") as f:
                good = f.read().rfind(b"\n") + 1
            os.truncate(self.path, good)

    def append(self, rec: dict[str, Any]) -> None:
        """Write a record (its text made valid Unicode: a model's answer may carry a lone surrogate)."""
        rec = valid_text(rec)
        key = key_of(rec)
        if key in self.keys:
            return
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.keys.add(key)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "RecordLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
