"""Atomic artifact writes and manifests.

A stage writes into a temporary sibling and renames it into place, so a killed run never leaves a
half-written artifact that a later run would mistake for a finished one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

MANIFEST = "manifest.json"       # every stage folder: inputs, config, counts, digest
METRICS_FILE = "metrics.json"    # test metrics of a trained model (and the report's results)
TRAIN_LOG = "train_log.json"     # a trained model's training log
REPORT = "report.md"             # a report's Markdown
CONFIG = "config.json"           # a model folder: its config (with model_type) ...
WEIGHTS = "model.safetensors"    # ... and its weights


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def share_modes(path: Path) -> None:
    """Give every file and folder under `path` the modes the umask allows (as a plain open() would):
    mkdtemp and some writers (safetensors) make them private, and an artifact is meant to be shared."""
    os.chmod(path, 0o777 & ~_UMASK)
    for p in path.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_UMASK)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        share_modes(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # the mode a plain open() would give, not mkstemp's 0600
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_npy_rows(path: str | Path, shape: tuple[int, ...], dtype: Any, blocks: Iterable[np.ndarray]) -> None:
    """Write an .npy array of `shape` from consecutive blocks of its rows, so that an array larger than
    memory never has to be whole in it; the bytes are those `np.save` writes for the whole array."""
    dtype = np.dtype(dtype)
    rows = 0
    with atomic_file(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
        for block in blocks:
            if block.shape[1:] != tuple(shape[1:]):
                raise ValueError(f"{path}: a block of shape {block.shape} for an array of shape {shape}")
            f.write(np.ascontiguousarray(block, dtype=dtype).data)
            rows += len(block)
        if rows != shape[0]:
            raise ValueError(f"{path}: {rows} rows written for an array of {shape[0]}")


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def file_hash(path: str | Path, exclude: tuple[str, ...] = (), chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of every file under a directory (sorted, names included, top-level `exclude` left out)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] not in exclude) \
        if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def versions(*packages: str) -> dict[str, str]:
    """Versions of the packages that shaped an artifact (for its manifest)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "pandas", "transformers", "peft", *packages):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def manifest(stage: str, *, inputs: dict[str, Any], config: dict[str, Any], seed: int | None,
             counts: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The small record every stage writes beside its outputs."""
    return {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": inputs,
        "config": config,
        "seed": seed,
        "counts": counts,
        "versions": versions(),
        "argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
        **(extra or {}),
    }
