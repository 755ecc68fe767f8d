"""The stage contract: every step of a run is a `Stage`, and `run_stage` alone does the bookkeeping.

A stage names its folder in the run (its `name`, which is also its preset table), lists the
artifacts it reads (`inputs`), holds a frozen config and builds its outputs (`build`). `run_stage`
decides whether the outputs are up to date (the same input fingerprints and config as the manifest
records), builds into a temporary folder that is renamed into place (or into the folder itself, for
append-only outputs that resume), writes the manifest and says whether the stage ran.

Under torchrun / accelerate launch every process calls `run_stage` (a training stage trains on all
of them): rank 0 alone writes the outputs and the manifest; the others build into a temporary folder
and wait for rank 0 before they return its counts.

Fingerprints are by content: a stage's manifest records a digest of what it wrote, and the stages
downstream compare that digest, so a rerun that writes the same bytes invalidates nothing.

Adding a stage: subclass `Stage` in a module of its own and add the class to the pipeline's list.
"""
from __future__ import annotations

import os
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .config import config_dict
from .errors import InputError
from .io import MANIFEST, METRICS_FILE, TRAIN_LOG, atomic_dir, file_hash, manifest, read_json, share_modes, write_json


DATA = "data"  # the prepared data set's folder: the one input every other stage reads


@dataclass(frozen=True)
class StageResult:
    name: str
    status: str            # "ran" | "up to date"
    seconds: float
    counts: dict[str, Any]


class Stage(ABC):
    """One step of the pipeline: `RUN/<folder>` built from `inputs()` and `config`."""

    name: ClassVar[str]           # the stage's preset table and, by default, its folder in the run
    config_class: ClassVar[type]
    in_place: ClassVar[bool] = False  # build into the folder itself (append-only, resumable outputs)
    missing_what: ClassVar[str] = "units of work unfinished"  # what `missing` counts, for the error
    # files that describe how the build went (timings, test metrics), not what it built: a rebuild
    # that writes the same artifact with other timings keeps the stages downstream up to date
    notes: ClassVar[tuple[str, ...]] = (METRICS_FILE, TRAIN_LOG)
    optional: ClassVar[bool] = False  # `fusion run` builds it only when the preset has its table

    def __init__(self, run: str | Path, config: Any = None, folder: str | None = None):
        self.run = Path(run)
        self.config = self.config_class() if config is None else config
        self.folder = folder or self.default_folder()

    def default_folder(self) -> str:
        return self.name

    @classmethod
    def config_classes(cls) -> list[type]:
        """Every config class the stage's settings may take (one per kind of model, for a stage that
        trains several kinds): the command-line options are theirs."""
        return [cls.config_class]

    @classmethod
    def config_class_of(cls, settings: Any, where: str) -> type:
        """The config class of a table of settings (`where` in the preset): one of `config_classes`."""
        return cls.config_class

    @property
    def out(self) -> Path:
        return self.run / self.folder

    @property
    def data_dir(self) -> Path:
        return self.run / DATA

    def inputs(self) -> dict[str, Path]:
        """The files and folders this stage reads (other stages' folders, raw files)."""
        return {}

    @abstractmethod
    def build(self, out: Path) -> dict[str, Any]:
        """Write the outputs into `out`; return the counts the manifest records."""

    def digest(self, out: Path, counts: dict[str, Any]) -> str:
        """What downstream stages compare: by default the content of every file written but the notes."""
        return file_hash(out, exclude=(MANIFEST, *self.notes))

    def missing(self, counts: dict[str, Any]) -> int:
        """Units of work that did not finish (e.g. users whose request failed); a rerun resumes them."""
        return 0

    def seed(self) -> int | None:
        """The config's seed (or its training config's), for the manifest."""
        for cfg in (self.config, getattr(self.config, "train", None)):
            if hasattr(cfg, "seed"):
                return cfg.seed
        return None

    def finished(self) -> None:
        """Called once the outputs are in place (e.g. to drop resumable checkpoints)."""


def fingerprint(path: Path) -> str:
    """A stage folder's recorded output digest, or the content hash of any other file or folder."""
    m = path / MANIFEST
    if m.is_file():
        recorded = _manifest(path)
        if recorded and "outputs_sha256" in recorded:
            return recorded["outputs_sha256"]
    if not path.exists():
        raise InputError(f"{path}: not found (run the stage that writes it first)")
    return file_hash(path)


def _manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a stage folder, or None when there is none or it is unreadable (then the stage reruns)."""
    try:
        m = read_json(out / MANIFEST)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def is_main_process() -> bool:
    """Under torchrun / accelerate launch only rank 0 writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def process_state() -> Any:
    """accelerate's PartialState of this process (under torchrun / accelerate launch it starts the
    process group) on the device the Trainer uses: CUDA when there is one, else the CPU (gloo)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def wait_for_everyone() -> None:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): wait until every process gets here. One
    process: nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        process_state().wait_for_everyone()


def up_to_date(stage: Stage, inputs: dict[str, str], config: dict[str, Any]) -> dict[str, Any] | None:
    """The stage's manifest if its outputs were built from these inputs and config and finished, else None."""
    old = _manifest(stage.out)
    if old and old.get("inputs") == inputs and old.get("config") == config and not old.get("missing"):
        return old
    return None


def run_stage(stage: Stage, force: bool = False) -> StageResult:
    """Build the stage unless it is up to date; write its manifest; say whether it ran."""
    t0 = time.perf_counter()
    inputs = {k: fingerprint(Path(p)) for k, p in stage.inputs().items()}
    config = config_dict(stage.config)
    old = None if force else up_to_date(stage, inputs, config)
    if old is not None:
        return StageResult(stage.folder, "up to date", round(time.perf_counter() - t0, 1), old["counts"])

    def finish(out: Path) -> dict[str, Any]:
        counts = stage.build(out)
        missing = stage.missing(counts)
        write_json(out / MANIFEST, manifest(stage.folder, inputs=inputs, config=config, seed=stage.seed(),
                                            counts=counts, extra={"outputs_sha256": stage.digest(out, counts),
                                                                  "missing": missing}))
        return counts

    wait_for_everyone()  # every process has found the outputs out of date before rank 0 replaces them
    if not is_main_process():  # other ranks train alongside rank 0 but write nothing
        with tempfile.TemporaryDirectory() as tmp:
            counts = stage.build(Path(tmp))
        wait_for_everyone()  # until rank 0 has written the outputs and the manifest: its counts are the run's
        counts = (_manifest(stage.out) or {}).get("counts", counts)
    else:
        if stage.in_place:
            stage.out.mkdir(parents=True, exist_ok=True)
            (stage.out / MANIFEST).unlink(missing_ok=True)  # an interrupted build must not pass as the old one
            counts = finish(stage.out)
            share_modes(stage.out)
        else:
            with atomic_dir(stage.out) as tmp:
                counts = finish(tmp)
        stage.finished()
        wait_for_everyone()
    missing = stage.missing(counts)
    if missing:
        raise InputError(f"{stage.out}: {missing} {stage.missing_what} (see its manifest); rerun to resume")
    return StageResult(stage.folder, "ran", round(time.perf_counter() - t0, 1), counts)
