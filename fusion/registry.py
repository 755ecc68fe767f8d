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


LOADERS: dict[str, Callable[[Path], Scorer]] = {"sasrec": _sasrec}


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


def max_len_of(model: Scorer) -> int:
    """The history length a model was trained with (evaluation feeds it the same)."""
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_len", 200))
