"""The one model registry: every model class joins it with `@register_model`, and any model folder
loads by the `model_type` in its config.json.

A model class has a `model_type`, `save_pretrained(path)` and `from_pretrained(path)`, and scores
through `eval.scoring.DotScorer`. The project's models register when their package is imported
(`import slmrec`, `import fusion`); a model of your own joins by decorating its class.
"""
from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .config import check
from .errors import InputError, user_path
from .io import CONFIG, MANIFEST

if TYPE_CHECKING:
    import torch

MODELS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_model(cls: T) -> T:
    MODELS[cls.model_type] = cls
    return cls


def read_config(path: str | Path) -> dict[str, Any]:
    """A model folder's config.json, or one line naming what is wrong with it."""
    file = user_path(path, "model", "a model folder") / CONFIG
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{file}: expected a JSON object")
    return cfg


def model_type(path: str | Path) -> str | None:
    return read_config(path).get("model_type")


def registered_type(path: str | Path) -> str:
    """The model_type of a model folder, checked against the registry; an error names this folder only."""
    kind = model_type(path)
    if not isinstance(kind, str) or kind not in MODELS:
        raise InputError(f"{Path(path) / CONFIG}: unknown model_type {kind!r} (known: {', '.join(sorted(MODELS))})")
    return kind


def load_model(path: str | Path) -> Any:
    """The model in a folder. A config.json value of the right type the model cannot be built with (a
    dropout of 2, a size past what memory holds) is one line naming the file, as a wrong type is."""
    kind = registered_type(path)
    try:
        return MODELS[kind].from_pretrained(path)
    except (ValueError, TypeError, OverflowError, RuntimeError, MemoryError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(f"{Path(path) / CONFIG}: cannot build a {kind} model from it ({reason})") from None


def max_len_of(path: str | Path) -> int:
    """The history length the model in `path` was trained with (evaluation feeds it the same).

    Read from config.json (SASRec, GRU4Rec, fusion) or else from the training config in manifest.json (LLMRec)."""
    path = Path(path)
    cfg = read_config(path)
    if "max_len" in cfg:
        return check(cfg["max_len"], int, f"{path / CONFIG}: max_len")
    manifest = path / MANIFEST
    train = json.loads(manifest.read_text()).get("config", {}).get("train", {}) if manifest.exists() else {}
    if "max_len" not in train:
        raise InputError(f"{path}: no max_len in config.json or in the manifest's training config")
    return int(train["max_len"])


def model_config(path: str | Path, config_class: type, kind: str) -> Any:
    """The config dataclass of a model folder, checked: its model_type, every key known and every value
    of its field's type (text where a size belongs would otherwise fail deep inside torch)."""
    return model_configs(path, (config_class,), kind)[0]


def model_configs(path: str | Path, config_classes: tuple[type, ...], kind: str) -> tuple[Any, ...]:
    """`model_config` for a config.json that holds the fields of several dataclasses side by side (e.g. a
    model's shape and its settings): one checked instance of each, every key going to the first class
    that has the field (an unknown key: the first class, which names it)."""
    raw = read_config(path)
    file = Path(path) / CONFIG
    if raw.pop("model_type", None) != kind:
        raise InputError(f"{file}: model_type is not {kind!r}")
    hints = [typing.get_type_hints(c) for c in config_classes]
    parts: list[dict[str, Any]] = [{} for _ in config_classes]
    for key, value in raw.items():
        i = next((i for i, h in enumerate(hints) if key in h), 0)
        parts[i][key] = check(value, hints[i][key], f"{file}: {key}") if key in hints[i] else value
    try:
        return tuple(c(**typed) for c, typed in zip(config_classes, parts))
    except (TypeError, ValueError, InputError) as e:
        raise InputError(f"{file}: {e}") from None


def read_weights(file: str | Path) -> dict[str, "torch.Tensor"]:
    """A safetensors file, or one line saying it is missing, empty or truncated."""
    from safetensors.torch import load_file

    file = Path(file)
    if not file.is_file():
        raise InputError(f"{file}: weights file not found")
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error type for empty and truncated files
        raise InputError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def load_state(module: "torch.nn.Module", state: dict[str, "torch.Tensor"], source: str | Path,
               required: set[str] | None = None) -> None:
    """Load `state` into `module`; any mismatch is one line naming the file and the tensor.

    `required` are the tensors the file must hold (default: all of the module's)."""
    full = module.state_dict()
    for name, tensor in state.items():
        if name not in full:
            raise InputError(f"{source}: unexpected tensor '{name}' (checkpoint does not match its config)")
        if tensor.shape != full[name].shape:
            raise InputError(f"{source}: tensor '{name}' has shape {list(tensor.shape)}, expected "
                             f"{list(full[name].shape)} (checkpoint does not match its config)")
    missing = sorted((set(full) if required is None else required) - set(state))
    if missing:
        raise InputError(f"{source}: missing {len(missing)} tensors, e.g. '{missing[0]}'")
    module.load_state_dict(state, strict=False)
