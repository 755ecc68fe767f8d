"""`fusion run`: the whole pipeline from a preset, stage by stage, skipping what is up to date.

Each stage is a `Stage` (eval.stage) whose preset table is its name; the pipeline is this list.
Adding a stage is one module with a `Stage` subclass and one line here; adding an ID backbone is a
registered model (`slmrec.pretrain.backbone_names`) and a table of its name in the preset; adding a
kind of fused model is a registered `fusion.model.FusedRecommender` subclass and `[fusion.NAME]`
tables with `mode = "KIND"`.

With `nproc` > 1 (`fusion run --nproc N`), each training stage (`TRAINING`) runs on N processes of
this machine: torchrun starts `fusion stage FOLDER` with the run's preset and overrides, whose every
process trains (DDP) and whose rank 0 writes the stage; every other stage runs once, here.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from eval.cli import settings_data
from eval.config import config_dict, from_dict
from eval.dataset import DataStage
from eval.errors import InputError
from eval.io import read_json, write_json
from eval.stage import Stage, StageResult, fingerprint, run_stage, up_to_date
from eval.presets import expand
from slim.encode import ProfileVectorsStage, VectorsStage
from slim.finetune import SlimStudentStage
from slim.profile import ProfileRationalesStage
from slim.quality import QualityStage
from slim.rationales import TeacherRationalesStage
from slim.student import StudentRationalesStage
from slmrec.llm_train import StudentStage, TeacherStage
from slmrec.pretrain import BackboneStage, PretrainConfig, backbone_names

from .report import ReportStage
from .train import FusionStage

console = Console(width=160)

PIPELINE: list[type[Stage]] = [
    DataStage,                 # data
    BackboneStage,             # sasrec, then one per other backbone table ([gru4rec], ...)
    TeacherStage,              # slmrec-teacher
    StudentStage,              # slmrec-student
    TeacherRationalesStage,    # slim-teacher-rationales
    SlimStudentStage,          # slim-student
    StudentRationalesStage,    # slim-student-rationales
    ProfileRationalesStage,    # profile-rationales (the no-LLM control)
    QualityStage,              # quality
    VectorsStage,              # vectors
    ProfileVectorsStage,       # vectors-profile (the control's vectors)
    FusionStage,               # fusion/<name>, one per [fusion.<name>] table
    ReportStage,               # report
]

# the stages that train on every process under torchrun (data parallel); `fusion run --nproc N` launches
# them on N processes (a new training stage: add it here too)
TRAINING: tuple[type[Stage], ...] = (BackboneStage, TeacherStage, StudentStage, SlimStudentStage, FusionStage)


def build_stages(run: str | Path, preset: str, overrides: list[str] = ()) -> list[Stage]:
    """Every stage of the pipeline with its settings from the preset and `--set` overrides."""
    data = settings_data(preset, overrides)
    backbones = [name for name in backbone_names() if name in data and name != BackboneStage.name]
    known = [cls.name for cls in PIPELINE] + backbones
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"{preset}: unknown table '{unknown[0]}' (stages: {', '.join(known)}; a registered "
                         f"backbone: {', '.join(backbone_names())})")
    stages: list[Stage] = []
    for cls in PIPELINE:
        table = data.get(cls.name, {})
        if cls is FusionStage:
            if not isinstance(table, dict):
                raise InputError(f"{preset}: fusion: expected one table per fused model")
            for name, t in table.items():  # each table's `mode` names its kind of fused model
                where = f"{cls.name}.{name}"
                t = expand(t, where)
                stages.append(cls(run, from_dict(cls.config_class_of(t, where), t, where), folder=f"{cls.name}/{name}"))
        elif cls is BackboneStage:  # RUN/<backbone> is what SLMRec and the fused models read
            for name in [cls.name, *backbones]:
                cfg = from_dict(PretrainConfig, expand(data.get(name, {}), name), name, PretrainConfig(model=name))
                if cfg.model != name:
                    raise InputError(f"{preset}: {name}.model must be '{name}' (a table per backbone)")
                stages.append(cls(run, cfg))
        elif cls.name in data or not cls.optional:
            stages.append(cls(run, from_dict(cls.config_class, expand(table, cls.name), cls.name)))
    matched_control(stages, preset)
    return stages


def matched_control(stages: list[Stage], preset: str) -> None:
    """The profile control must read the history window the student's prompts show, or "LLM vs template"
    would compare unequal information."""
    found = {stage.name: stage.config for stage in stages}
    profile, student = found.get(ProfileRationalesStage.name), found.get(StudentRationalesStage.name)
    for key in ("history_tokens", "tokenizer") if profile and student else ():
        mine, theirs = getattr(profile, key), getattr(student, key)
        if mine != theirs:
            raise InputError(f"{preset}: {ProfileRationalesStage.name}.{key} = {mine!r} differs from "
                             f"{StudentRationalesStage.name}.{key} = {theirs!r}: the control must read the "
                             "history the LLM prompts show")


def stage_of(stages: list[Stage], folder: str, preset: str) -> Stage:
    """The stage of the pipeline whose folder in the run is `folder`."""
    for stage in stages:
        if stage.folder == folder:
            return stage
    raise InputError(f"{preset}: no stage '{folder}' (stages: {', '.join(s.folder for s in stages)})")


def launch_stage(stage: Stage, nproc: int, preset: str, overrides: list[str] = ()) -> StageResult:
    """Run a training stage on `nproc` processes: torchrun starts `fusion stage FOLDER` with the preset
    and overrides the stage came from (rank 0 writes it), unless the stage is up to date. Ctrl-C or
    SIGTERM here stops torchrun and its workers (they run in a process group of their own)."""
    t0 = time.perf_counter()
    inputs = {k: fingerprint(Path(p)) for k, p in stage.inputs().items()}
    config = config_dict(stage.config)
    old = up_to_date(stage, inputs, config)
    if old is not None:
        return StageResult(stage.folder, "up to date", round(time.perf_counter() - t0, 1), old["counts"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--module",
           "--", "fusion.cli", "stage", stage.folder, "--run", str(stage.run), "--preset", str(preset),
           *(a for o in overrides for a in ("--set", o))]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        code = proc.wait()
    finally:
        stop(proc)
    if code:
        raise InputError(f"{stage.folder}: the {nproc}-process run failed (exit code {code}; its output is above)")
    done = up_to_date(stage, inputs, config)
    if done is None:
        raise InputError(f"{stage.out}: no finished manifest after the {nproc}-process run")
    return StageResult(stage.folder, "ran", round(time.perf_counter() - t0, 1), done["counts"])


def stop(proc: subprocess.Popen) -> None:
    """End a process started in a group of its own and every process of that group (SIGTERM, then
    SIGKILL after 30 s); nothing when they have all exited."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break  # the group is gone
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def run_pipeline(run: str | Path, stages: list[Stage], until: str | None = None, nproc: int = 1,
                 preset: str | None = None, overrides: list[str] = ()) -> list[dict[str, Any]]:
    """Run the stages in order (each skipped when up to date); log status and seconds in RUN/pipeline.json.

    `nproc` > 1: the training stages run on that many processes (`launch_stage`), each rebuilt there
    from `preset` and `overrides`, which must be those `stages` were built from."""
    if nproc < 1:
        raise InputError(f"--nproc must be at least 1, not {nproc}")
    if nproc > 1 and preset is None:
        raise InputError("--nproc: the training stages are launched from a preset; give the one the stages came from")
    run = Path(run)
    log_path = run / "pipeline.json"
    log = read_json(log_path) if log_path.exists() else {"stages": []}
    t_all = time.perf_counter()
    for stage in stages:
        console.rule(f"[bold]{stage.folder}")
        launched = nproc > 1 and isinstance(stage, TRAINING)
        result = launch_stage(stage, nproc, preset, overrides) if launched else run_stage(stage)
        console.print(f"{stage.folder}: {result.status} ({result.seconds} s)")
        log["stages"].append({"stage": stage.folder, "status": result.status, "seconds": result.seconds,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              **({"processes": nproc} if launched and result.status == "ran" else {})})
        write_json(log_path, log)
        if stage.folder == until:
            break
    console.print(f"pipeline finished in {time.perf_counter() - t_all:.0f} s; report in {run / ReportStage.name}")
    return log["stages"]
