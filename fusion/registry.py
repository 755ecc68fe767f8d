"""Load any trained model of a run by the `model_type` in its config.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from eval.errors import InputError
from eval.evaluate import Scorer


def _sasrec(path: Path) -> Scorer:
    from slmrec.sasrec import SASRec
    return SASRec.from_pretrained(path)


def _gru4rec(path: Path) -> Scorer:
    from slmrec.gru4rec import GRU4Rec
    return GRU4Rec.from_pretrained(path)


def _fusion(path: Path) -> Scorer:
    from .model import FusedRecommender
    return FusedRecommender.from_pretrained(path)


def _llmrec(path: Path) -> Scorer:
    from slmrec.llm import LLMRec
    return LLMRec.from_pretrained(path).eval()


LOADERS: dict[str, Callable[[Path], Scorer]] = {"sasrec": _sasrec, "gru4rec": _gru4rec, "fusion": _fusion,
                                                 "slmrec-llm": _llmrec}


def register(model_type: str, loader: Callable[[Path], Scorer]) -> None:
    LOADERS[model_type] = loader


def load_model(path: str | Path) -> Scorer:
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.exists():
        raise InputError(f"{path}: no config.json; not a model folder")
    kind = json.loads(cfg.read_text()).get("model_type")
    if kind not in LOADERS:
        raise InputError(f"{cfg}: unknown model_type {kind!r} (known: {', '.join(sorted(LOADERS))})")
    return LOADERS[kind](path)


def max_len_of(path: str | Path) -> int:
    """The history length the model in `path` was trained with (evaluation feeds it the same).

    Read from config.json (SASRec, GRU4Rec, fusion) or else from the training config in manifest.json (LLMRec)."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    if "max_len" in cfg:
        return int(cfg["max_len"])
    manifest = path / "manifest.json"
    train = json.loads(manifest.read_text()).get("config", {}).get("train", {}) if manifest.exists() else {}
    if "max_len" not in train:
        raise InputError(f"{path}: no max_len in config.json or in the manifest's training config")
    return int(train["max_len"])
