"""Config dataclasses: the one place a default lives, and how settings from anywhere are checked.

Every stage's config is a frozen dataclass. A field's default and its `help` (field metadata, as in
peft) are all the command line, the presets and the manifests know about it; `from_dict` builds a
config from a preset table, `--set` overrides or command options, checking every value against the
field's type where it is read, so a wrong value is one line naming the setting.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from typing import Any, Callable, TypeVar, Union

from .errors import InputError

T = TypeVar("T")
NoneType = type(None)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            cli: bool = True) -> Any:
    """A config field with its help text; `cli=False` keeps it out of the command options (derived values)."""
    meta = {"help": help, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON values (what manifests record and compare)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def parse_value(raw: str) -> Any:
    """A command-line value: a TOML literal (number, boolean, list, quoted string) or else the bare text."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(a) if a is not NoneType else "none" for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (arg,) = typing.get_args(hint) or (Any,)
        return "a list of " + {int: "integers", float: "numbers", str: "texts"}.get(arg, "values")
    return getattr(hint, "__name__", str(hint))


def check(value: Any, hint: Any, where: str) -> Any:
    """`value` as the type `hint` asks for (numbers and lists may come as text), or an error naming `where`."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if NoneType in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for arg in (a for a in args if a is not NoneType):
            try:
                return check(value, arg, where)
            except InputError:
                pass
        raise InputError(f"{where}: expected {_describe(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is list:
        if isinstance(value, str):  # a command-line list: comma-separated
            value = [parse_value(v.strip()) for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # a one-item list given as a plain value
        if not isinstance(value, list):
            raise InputError(f"{where}: expected {_describe(hint)}, got {value!r}")
        (arg,) = typing.get_args(hint) or (Any,)
        return [check(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a table, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            value = parse_value(value)
        ok = isinstance(value, int) or (hint is float and isinstance(value, float))
        if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise InputError(f"{where}: expected {_describe(hint)}, got {value!r}")
        return hint(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a path or name that happens to be a number
        if not isinstance(value, str):
            raise InputError(f"{where}: expected text, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config", base: T | None = None) -> T:
    """`base` (default: `cls()`) with the settings in `data`, each checked against its field's type.

    A nested table overrides only the keys it names, so the defaults of the enclosing config survive.
    Unknown keys are an error naming `where` and the key, so a typo in a preset never passes silently."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a table of settings, got {data!r}")
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
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            kwargs[key] = from_dict(sub, value, f"{where}.{key}", getattr(base, key))
        else:
            kwargs[key] = check(value, sub, f"{where}.{key}")
    try:
        return dataclasses.replace(base, **kwargs)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: {e}") from None


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data[a][b][c] = value for 'a.b.c', creating tables on the way."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
        if not isinstance(data, dict):
            raise InputError(f"--set {dotted}: '{p}' is a setting, not a table")
    data[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`key.path=value` of `--set`, the value read as a TOML literal or else taken as text."""
    if "=" not in item:
        raise InputError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    return key.strip(), parse_value(raw)


@dataclasses.dataclass(frozen=True)
class Option:
    """One leaf setting of a config as a command-line option."""
    path: str          # dotted path in the config, e.g. "train.epochs"
    hint: Any
    default: Any
    help: str


def options_of(cls: type, prefix: str = "") -> list[Option]:
    """The command-line options of a config: every leaf field, nested configs by dotted path."""
    hints = typing.get_type_hints(cls)
    base = cls()
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        value, hint = getattr(base, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += [dataclasses.replace(o, default=_get(value, o.path.removeprefix(prefix + f.name + ".")))
                    for o in options_of(hint, f"{prefix}{f.name}.")]
        else:
            out.append(Option(prefix + f.name, hint, value, f.metadata.get("help", "")))
    return out


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
