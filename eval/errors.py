"""Bad input: one error type, so every CLI can print it as one clear line, and the checks every reader
shares (a path of the user's, text that is not valid Unicode, a warning where going on is right)."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from .io import CONFIG

_SURROGATE = re.compile(r"[\ud800-\udfff]")  # what a JSON "\ud800" escape reads as: no encoder writes it


class InputError(Exception):
    """Bad user input (a file, a line, a field). The message names where the problem is."""


def user_path(path: str | Path, kind: str, what: str, must_exist: bool = True) -> Path:
    """`path` (`what` it should be, with its article: "a run folder") checked before anything reads or writes it: it exists (unless `must_exist` is False) and
    is a "file", a "folder", a "model" folder (one with config.json) or "any" of them, as `kind` says. A wrong kind
    would otherwise fail deep inside a library (IsADirectoryError, a server that exits) or, worse,
    read as no data at all."""
    path = Path(path)
    if not path.exists():
        if must_exist:
            raise InputError(f"{path}: not found (expected {what})")
        return path
    if kind == "file" and path.is_dir():
        raise InputError(f"{path}: is a folder, expected {what}")
    if kind in ("folder", "model") and not path.is_dir():
        raise InputError(f"{path}: is a file, expected {what}")
    if kind == "model" and not (path / CONFIG).is_file():
        raise InputError(f"{path}: no config.json, so not {what}")
    return path


def has_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def valid_text(value: Any) -> Any:
    """`value` (a string, or JSON made of them) with every lone surrogate replaced by U+FFFD: done once
    where user text is read, so no writer (parquet, JSON records, a tokenizer) fails on it later."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {valid_text(k): valid_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [valid_text(v) for v in value]
    return value


def warn(message: str) -> None:
    """One line on stderr about input that is odd but usable: the run goes on."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
