"""The versioned prompt templates, shipped as package data so installed copies find them too.

A template's file stem (e.g. `slim_teacher_v1`) is its version; changing a prompt means adding a
file, never editing one that records were already written with.
"""
from __future__ import annotations

from pathlib import Path

from eval.errors import InputError

PROMPTS_DIR = Path(__file__).resolve().parent


def template_path(name_or_path: str) -> Path:
    """A template by version name (a file in this folder) or by path to the user's own file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROMPTS_DIR / f"{name_or_path}.txt"
    if not path.exists():
        raise InputError(f"{path}: prompt template not found")
    return path
