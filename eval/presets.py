"""Reading presets: TOML files with one table per stage (the stage's name).

The shipped ones live in the `presets` data package (`demo`: the embedded CPU default, `study`: its
ablation study at full size, `paper`: the papers' setting); a user's own .toml file works the same
way. String settings may use ${VAR} from the environment (paths of the user's data and models).
"""
from __future__ import annotations

import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InputError


def preset_path(preset: str) -> Path:
    """A preset name shipped here, or a TOML file of the user's."""
    if Path(preset).suffix == ".toml":
        if not Path(preset).is_file():
            raise InputError(f"{preset}: preset file not found")
        return Path(preset)
    shipped = resources.files("presets") / f"{preset}.toml"
    if not shipped.is_file():
        names = sorted(p.name.removesuffix(".toml") for p in resources.files("presets").iterdir()
                       if p.name.endswith(".toml"))
        raise InputError(f"unknown preset '{preset}' (shipped: {', '.join(names)}; or give a .toml file)")
    return Path(str(shipped))


def read_preset(preset: str) -> dict[str, Any]:
    """The preset's tables as written (${VAR} not yet expanded: `--set` may replace those settings)."""
    path = preset_path(preset)
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: {e}") from None


def expand(value: Any, where: str) -> Any:
    """${VAR} in a string setting comes from the environment."""
    if isinstance(value, dict):
        return {k: expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, where) for v in value]
    if not isinstance(value, str):
        return value

    def env(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise InputError(f"{where}: needs the environment variable {m.group(1)} (or --set {where}=...)")
        return os.environ[m.group(1)]
    return re.sub(r"\$\{(\w+)\}", env, value)
