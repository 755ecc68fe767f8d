"""`fusion run`: the whole pipeline from a preset, stage by stage, skipping what is up to date.

Each stage is a `Stage` (eval.stage) whose preset table is its name; the pipeline is this list.
Adding a stage is one module with a `Stage` subclass and one line here; adding an ID backbone is a
registered model (`slmrec.pretrain.backbone_names`) and a table of its name in the preset; adding a
kind of fused model is a registered `fusion.model.FusedRecommender` subclass and `[fusion.NAME]`
tables with `mode = "KIND"`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from eval.cli import settings_data
from eval.config import from_dict
from eval.dataset import DataStage
from eval.errors import InputError
from eval.io import read_json, write_json
from eval.stage import Stage, run_stage
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


def run_pipeline(run: str | Path, stages: list[Stage], until: str | None = None) -> list[dict[str, Any]]:
    """Run the stages in order (each skipped when up to date); log status and seconds in RUN/pipeline.json."""
    run = Path(run)
    log_path = run / "pipeline.json"
    log = read_json(log_path) if log_path.exists() else {"stages": []}
    t_all = time.perf_counter()
    for stage in stages:
        console.rule(f"[bold]{stage.folder}")
        result = run_stage(stage)
        console.print(f"{stage.folder}: {result.status} ({result.seconds} s)")
        log["stages"].append({"stage": stage.folder, "status": result.status, "seconds": result.seconds,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        write_json(log_path, log)
        if stage.folder == until:
            break
    console.print(f"pipeline finished in {time.perf_counter() - t_all:.0f} s; report in {run / ReportStage.name}")
    return log["stages"]
