"""Where a rationale touches the catalogue: the categories its step 2 names, the items its step 3 names.

One tolerant matcher serves the records (grounding fields), the quality stage and the evidence of
`fusion recommend`: words are compared lower-case, without accents, apostrophes or punctuation, and
articles and years are optional, so "Godfather, The" matches "the godfather (1972)". Whole words
only ("Movie 1" is not in "Movie 10"); a title found inside a longer one that is also found ("Scream"
in "Scream 2") does not count; where one title names several items, the year written after it picks
among them, then the user's own item. Categories also match their plural ("thrillers", "comedies").
"""
from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

from eval.preprocess import item_title

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_YEAR = re.compile(r"(?:1[89]|20)\d\d")
_ARTICLES = frozenset({"the", "a", "an"})
# list separators of a step: new lines, semicolons, list markers ("1.", "2)", "-", "*")
_ENTRY = re.compile(r"\n|;|(?:^|\s)(?:\d{1,2}[.)]|[-*•])\s")
# commas between entries, but not the one of a moved article ("Matrix, The" ends an entry, or a year follows)
_COMMA = re.compile(r",(?!\s*(?:the|a|an)\s*(?:\(?\d{4}\)?)?\s*(?:[,.;]|$))", re.I)
Word = tuple[str, int, int]  # normalised word, start and end in the original text
Span = tuple[int, int]       # first and last word position of a match


def words(text: str | None) -> list[Word]:
    """The words of `text` with their spans: lower-case, accents and apostrophes dropped."""
    out = []
    for m in _WORD.finditer(text or ""):
        w = unicodedata.normalize("NFKD", m.group()).encode("ascii", "ignore").decode().lower()
        w = w.replace("'", "").replace("’", "")
        if w:
            out.append((w, m.start(), m.end()))
    return out


def _optional(word: str) -> bool:
    """Articles and years: a title matches with or without them ("Godfather, The" = "The Godfather (1972)")."""
    return word in _ARTICLES or bool(_YEAR.fullmatch(word))


def key_words(text: str) -> list[str]:
    """What must appear for a title or category to match: its words without articles and years
    (all of them when nothing else is left, e.g. the title "1941")."""
    ws = [w for w, _, _ in words(text)]
    return [w for w in ws if not _optional(w)] or ws


def _spans(needle: list[str] | tuple[str, ...], hay: list[Word]) -> Iterator[Span]:
    """Every place `needle`'s words occur in order in `hay` (articles and years between them skipped)."""
    if not needle:
        return
    for i, (w, _, _) in enumerate(hay):
        if w != needle[0]:
            continue
        n, last = 1, i
        for k in range(i + 1, len(hay)):
            if n == len(needle):
                break
            if hay[k][0] == needle[n]:
                n, last = n + 1, k
            elif not _optional(hay[k][0]):
                break
        if n == len(needle):
            yield i, last


def find(needle: list[str], hay: list[Word]) -> tuple[int, int] | None:
    """The character span of the first place `needle` occurs in `hay`, or None."""
    for i, j in _spans(needle, hay):
        return hay[i][1], hay[j][2]
    return None


def split_categories(value: Any) -> list[str]:
    """An item's categories: items.parquet holds them comma-separated."""
    return [c.strip() for c in str(value or "").split(",") if c.strip()]


def _stem(word: str) -> str:
    """A plural's singular, roughly ("comedies" -> "comedy", "thrillers" -> "thriller")."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


class Vocabulary:
    """Names (titles, categories) indexed by their first key word, all found in a text in one pass."""

    def __init__(self, keys: dict[Hashable, list[str]], stem: bool = False):
        """`keys`: the key words of each name (what must appear for it to match)."""
        self.stem = stem
        self.keys: dict[tuple[str, ...], list[Hashable]] = defaultdict(list)  # key words -> what they name
        for name_id, kw in keys.items():
            if kw:
                self.keys[tuple(self._norm(kw))].append(name_id)
        self.first: dict[str, list[tuple[str, ...]]] = defaultdict(list)
        for kw in self.keys:
            self.first[kw[0]].append(kw)

    def _norm(self, ws: list[str]) -> list[str]:
        return [_stem(w) for w in ws] if self.stem else ws

    def hay(self, text: str | None) -> list[Word]:
        return [(_stem(w), s, e) for w, s, e in words(text)] if self.stem else words(text)

    def matches(self, hay: list[Word]) -> list[tuple[tuple[str, ...], Span]]:
        """(key words, span) of every name found, without those lying inside a longer match."""
        found = [(kw, span) for w in dict.fromkeys(w for w, _, _ in hay)
                 for kw in self.first.get(w, ()) for span in _spans(kw, hay)]
        return [(kw, (i, j)) for kw, (i, j) in found
                if not any(a <= i and j <= b and b - a > j - i for _, (a, b) in found)]


def entries(text: str | None, commas: bool) -> list[tuple[int, int]]:
    """Character ranges of the entries a step lists (lines, ';' items, numbered or bulleted items, and
    with `commas` or a one-line list, ',' items); a lead-in line ending in ':' is no entry."""
    text = text or ""
    cuts = [(m.start(), m.end()) for m in _ENTRY.finditer(text)]
    if commas or not cuts:
        cuts = sorted(cuts + [(m.start(), m.end()) for m in _COMMA.finditer(text)])
    out, start = [], 0
    for a, b in [*cuts, (len(text), len(text))]:
        piece = text[start:a]
        if words(piece) and not piece.rstrip().endswith(":"):
            out.append((start, a))
        start = max(start, b)
    return out


@dataclass(frozen=True)
class Grounding:
    """What a step names in the catalogue, and how many of its entries name something there."""
    named: list                  # item ids (step 3) or category names (step 2), in order of appearance
    entries: int
    grounded: int


def title_key(title: str, year: str) -> list[str]:
    """A title's key words: articles and its release year are optional, a year inside the name is not
    ("Blues Brothers 2000" needs its 2000, so it is not "The Blues Brothers" followed by a year)."""
    ws = [w for w, _, _ in words(title)]
    return [w for w in ws if w not in _ARTICLES and w != year] or ws


class Catalogue:
    """A data set's item titles, categories and brands, to ground rationale steps in."""

    def __init__(self, items: pd.DataFrame):
        rows = items.to_dict("records")
        self.years = {int(r["item"]): str(r.get("year") or "") for r in rows}
        self.titles = Vocabulary({int(r["item"]): title_key(item_title(r), self.years[int(r["item"])]) for r in rows})
        names = {c for r in rows for c in split_categories(r.get("categories"))}
        names |= {str(r["brand"]).strip() for r in rows if str(r.get("brand") or "").strip()}
        self.categories = Vocabulary({c: key_words(c) for c in sorted(names)}, stem=True)

    def _ground(self, vocab: Vocabulary, text: str | None, commas: bool, history: set[int]) -> Grounding:
        hay = vocab.hay(text)
        found = vocab.matches(hay)
        named = []
        for kw, (_, j) in sorted(found, key=lambda m: m[1]):
            ids = vocab.keys[kw]
            year = hay[j + 1][0] if j + 1 < len(hay) and _YEAR.fullmatch(hay[j + 1][0]) else None
            # one title, several items: the year written after it decides, then the user's own item
            for fits in (lambda i: self.years.get(i) == year, lambda i: i in history):
                ids = [i for i in ids if fits(i)] or ids
            named += ids
        spans = [(hay[i][1], hay[j][2]) for _, (i, j) in found]
        ranges = entries(text, commas)
        grounded = sum(any(a < e and s < b for s, e in spans) for a, b in ranges)
        return Grounding(list(dict.fromkeys(named)), len(ranges), grounded)

    def step2(self, text: str | None) -> Grounding:
        return self._ground(self.categories, text, commas=True, history=set())

    def step3(self, text: str | None, history: set[int] = frozenset()) -> Grounding:
        return self._ground(self.titles, text, commas=False, history=history)

    def ground(self, steps: dict[str, Any], history: list[int] | set[int]) -> dict[str, Any]:
        """The grounding fields of a record: step-2 categories, step-3 items, those in the user's history."""
        seen = set(int(i) for i in history)
        s2, s3 = self.step2(steps.get("step2")), self.step3(steps.get("step3"), seen)
        return {"step2_categories": s2.named, "step2_entries": s2.entries, "step2_grounded": s2.grounded,
                "step3_items": s3.named, "step3_entries": s3.entries, "step3_grounded": s3.grounded,
                "step3_in_history": [i for i in s3.named if i in seen]}


_LAST: list[tuple[pd.DataFrame, Catalogue]] = []


def catalogue_of(items: pd.DataFrame) -> Catalogue:
    """The catalogue of an item table, built once while that same table is in use."""
    if not (_LAST and _LAST[0][0] is items):
        _LAST[:] = [(items, Catalogue(items))]
    return _LAST[0][1]
