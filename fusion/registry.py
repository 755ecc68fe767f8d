"""Load any trained model of a run by the `model_type` in its config.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from eval.errors import InputError
from eval.evaluate import Scorer
from eval.io import CONFIG, MANIFEST
from slmrec.pretrain import BACKBONES


def _fusion(path: Path) -> Scorer:
    from .model import FusedRecommender
    return FusedRecommender.from_pretrained(path)


def _llmrec(path: Path) -> Scorer:
    from slmrec.llm import LLMRec
    return LLMRec.from_pretrained(path).eval()


LOADERS: dict[str, Callable[[Path], Scorer]] = {
    **{kind: cls.from_pretrained for kind, cls in BACKBONES.items()}, "fusion": _fusion, "slmrec-llm": _llmrec}


def register(model_type: str, loader: Callable[[Path], Scorer]) -> None:
    LOADERS[model_type] = loader


def load_model(path: str | Path) -> Scorer:
    path = Path(path)
    cfg = path / CONFIG
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
    cfg = json.loads((path / CONFIG).read_text())
    if "max_len" in cfg:
        return int(cfg["max_len"])
    manifest = path / MANIFEST
    train = json.loads(manifest.read_text()).get("config", {}).get("train", {}) if manifest.exists() else {}
    if "max_len" not in train:
        raise InputError(f"{path}: no max_len in config.json or in the manifest's training config")
    return int(train["max_len"])
