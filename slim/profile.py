"""A rationale source with no LLM: the three steps written from the same history by a template.

It is the control every LLM rationale is measured against (quality, and what fusion gains from it):
step 1 states the user's category shares and eras, step 2 names the top categories, step 3 lists the
most recent titles. It reads exactly what a teacher or student prompt shows: the same prefixes
(`SeqDataset.rationale_history`, and with `cuts` the shorter ones of `rationale_prefixes`) cut to the
same token budget (`history_tokens`, `slim.prompts.HistoryWindow`), so "LLM vs template" compares two
writers of the same information; it writes the same records, so encoding and fusion take it as is.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from eval.assets import smollm2_path
from eval.config import setting
from eval.dataset import load_dataset
from eval.preprocess import item_title
from eval.stage import Stage

from .grounding import catalogue_of
from .prompts import HistoryWindow
from .records import RECORDS, check_cuts, cuts_setting, rationale_text

PROFILE_VERSION = "profile_v1"


@dataclass(frozen=True)
class ProfileConfig:
    categories: int = setting(5, "Most frequent categories named in steps 1 and 2.")
    recent: int = setting(10, "Most recent titles listed in step 3.")
    history_tokens: int = setting(128, "Token budget of the history read (most recent items kept), as the LLM "
                                       "prompts' history_tokens: the pipeline requires the student rationales' value.")
    tokenizer: str | None = setting(None, "Tokenizer that counts history tokens (none: SmolLM2's), as the LLM "
                                          "prompts' tokenizer.")
    cuts: int = cuts_setting()

    def __post_init__(self) -> None:
        check_cuts(self.cuts, "profile-rationales")


def _shares(values: list[str], top: int) -> list[tuple[str, float]]:
    counts = Counter(values)
    total = sum(counts.values())
    return [(v, n / total) for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def profile_steps(items: pd.DataFrame, history: list[int], cfg: ProfileConfig) -> dict[str, str]:
    """The three steps for one history; `items` is the data set's item table indexed by item id."""
    rows = items.loc[history] if history else items.iloc[:0]
    cats = [c.strip() for cs in rows["categories"] for c in str(cs).split(",") if c.strip()]
    eras = [f"{y[:3]}0s" for y in rows["year"].astype(str) if y[:4].isdigit()]
    top = _shares(cats, cfg.categories)
    step1 = "Interacted with " + (", ".join(f"{c} ({share:.0%})" for c, share in top) or "items without categories")
    if eras:
        step1 += "; mostly from the " + ", ".join(f"{e} ({share:.0%})" for e, share in _shares(eras, 2))
    step2 = ", ".join(c for c, _ in top) or "none known"
    recent = [item_title(r) + (f" ({r['year']})" if r.get("year") else "") for _, r in rows.iloc[::-1].iterrows()]
    step3 = "; ".join(list(dict.fromkeys(recent))[:cfg.recent]) or "none"
    return {"step1": step1 + ".", "step2": step2 + ".", "step3": step3 + "."}


class ProfileRationalesStage(Stage):
    """Template rationales with no LLM (category shares, top categories, recent titles) for every
    user: the control of the LLM rationales; writes RUN/profile-rationales/records.jsonl."""

    name = "profile-rationales"
    config_class = ProfileConfig

    def inputs(self) -> dict[str, Path]:
        return {"data": self.data_dir}

    def build(self, out: Path) -> dict[str, Any]:
        ds = load_dataset(self.data_dir)
        items, catalogue = ds.items.set_index("item"), catalogue_of(ds.items)
        window = HistoryWindow(ds.items, self.config.history_tokens, self.config.tokenizer or smollm2_path())
        written = 0
        with open(out / RECORDS, "w", encoding="utf-8") as f:
            for u in range(ds.num_users):
                prefixes = ds.rationale_prefixes(u, self.config.cuts)
                for prefix in prefixes:  # the earlier cuts' records carry the prefix they saw; the end one never did
                    history = window(ds.sequences[u][:prefix].tolist())
                    steps = profile_steps(items, history, self.config)
                    rec = {"user": u, "raw_user": str(ds.users["raw_id"].iat[u]), "prompt_version": PROFILE_VERSION,
                           "model": "profile", **({} if prefix == prefixes[-1] else {"prefix": prefix}), **steps,
                           **catalogue.ground(steps, history), "error": None}
                    f.write(json.dumps({**rec, "text": rationale_text(rec)}, ensure_ascii=False) + "\n")
                written += len(prefixes)
        return {"users": ds.num_users, "complete": ds.num_users, "rationales": written}
