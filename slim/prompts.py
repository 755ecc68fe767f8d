"""Versioned prompt templates and safe rendering of untrusted item text into them.

A template's version (its file stem, see `prompts/`) is stored with every record. Templates name
the items with `${domain}` (the data set's `domain`: movies, beauty products, ...), never a fixed word.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from string import Template

import pandas as pd

from eval.errors import InputError
from eval.preprocess import item_title
from prompts import template_path

from .records import words_of

TEACHER = "slim_teacher_v4"
STUDENT = "slim_student_v2"

_DELIMS = re.compile(r"</?\s*history\s*>|[<>]", re.I)
_STEP_LABEL = re.compile(r"\b(step)\s*(\d+)\s*[:.)-]", re.I)
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class PromptTemplate:
    version: str
    text: str
    path: Path

    def render(self, history: str, domain: str) -> str:
        return Template(self.text).substitute(history=history, domain=domain)


@lru_cache
def instruction_words(version: str, domain: str) -> frozenset[str]:
    """The words of a template's own instructions (rendered without a history), to tell an answer that
    copies them; empty for a template that is no longer at hand."""
    try:
        return frozenset(words_of(load_template(version).render("", domain)))
    except InputError:
        return frozenset()


@lru_cache
def load_template(name_or_path: str) -> PromptTemplate:
    """A template by version name (looked up in prompts/) or by file path."""
    path = template_path(name_or_path)
    text = path.read_text()
    if "${history}" not in text:
        raise InputError(f"{path}: template has no ${{history}} placeholder")
    return PromptTemplate(version=path.stem, text=text.rstrip("\n"), path=path)


def clean_field(value: object, max_chars: int) -> str:
    """One line of plain text: no newlines, no template delimiters, no fake 'Step N:' labels."""
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    text = _DELIMS.sub(" ", text)
    text = _STEP_LABEL.sub(r"\1 \2", text)
    text = _SPACE.sub(" ", text).strip()
    return text[:max_chars].rstrip()


def item_line(row: pd.Series, max_chars: int = 160) -> str:
    """`- title (year); categories; brand`, each field cleaned and the whole line capped."""

    title = clean_field(item_title(row), max_chars)
    year = clean_field(row.get("year"), 8)
    parts = [f"{title} ({year})" if year else title]
    parts += [clean_field(row.get(col), max_chars) for col in ("categories", "brand")]
    return "- " + clean_field("; ".join(p for p in parts if p), max_chars)


def recent_fit(tokens: list[int], budget: int) -> int:
    """How many of the most recent items fit the budget (their tokens + 1 per newline); the latest always."""
    used = 0
    for kept, n in enumerate(reversed(tokens)):
        used += n + 1
        if used > budget and kept:
            return kept
    return len(tokens)


class HistoryWindow:
    """The items of a history a prompt shows: the most recent whose rendered lines fit a token budget.
    The profile control reads the same window, so it never knows more than the LLM was shown."""

    def __init__(self, items: pd.DataFrame, budget: int, tokenizer_path: str | Path):
        from transformers import AutoTokenizer

        self.budget = budget
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self.lines = {int(i): item_line(row) for i, row in items.set_index("item").iterrows()}
        self.tokens = {i: len(tok(line, add_special_tokens=False)["input_ids"]) for i, line in self.lines.items()}

    def __call__(self, history: list[int]) -> list[int]:
        ids = [int(i) for i in history]
        return ids[len(ids) - recent_fit([self.tokens[i] for i in ids], self.budget):]


class PromptBuilder:
    """Renders a user's history into a template, within a token budget; `domain` names the items."""

    def __init__(self, items: pd.DataFrame, template: str, budget: int, tokenizer_path: str | Path, domain: str):
        self.template = load_template(template)
        self.window = HistoryWindow(items, budget, tokenizer_path)
        self.domain = clean_field(domain, 40)

    def __call__(self, history: list[int]) -> str:
        block = "\n".join(self.window.lines[i] for i in self.window(history))
        return self.template.render(block, self.domain)
