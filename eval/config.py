"""Nested config dataclasses from plain dicts (TOML presets, JSON manifests), with named errors."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from .errors import InputError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config", base: T | None = None) -> T:
    """`base` (default: `cls()`) with the settings in `data`, recursing into dataclass-typed fields.

    A nested table overrides only the keys it names, so the defaults of the enclosing config survive.
    Unknown keys are an error naming `where` and the key, so a typo in a preset never passes silently."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a table of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{where}: unknown setting '{unknown[0]}' (known: {', '.join(sorted(names))})")
    try:
        base = cls() if base is None else base
    except TypeError as e:
        raise InputError(f"{where}: {e}") from None
    kwargs = {}
    for key, value in data.items():
        sub = hints[key]
        kwargs[key] = from_dict(sub, value, f"{where}.{key}", getattr(base, key)) if dataclasses.is_dataclass(sub) \
            else value
    try:
        return dataclasses.replace(base, **kwargs)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: {e}") from None
