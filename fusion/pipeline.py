"""`fusion run`: the whole pipeline from a preset, stage by stage, skipping what is up to date.

prepare -> SASRec -> SLMRec teacher -> SLMRec student -> teacher rationales (local server or API)
-> SLIM student fine-tuning -> student rationales -> LanceDB vectors -> fused models -> report.

Every stage writes its outputs atomically or append-only with a manifest, and every stage checks
its own manifest before working, so a killed run restarted with the same preset redoes nothing
that finished. RUN/pipeline.json logs each stage's status and seconds.
"""
from __future__ import annotations

import json
import os
import re
import time
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from eval.config import from_dict
from eval.dataset import load_dataset, prepare_dataset, source_inputs
from eval.errors import InputError
from eval.io import is_up_to_date, manifest, read_json, write_json
from eval.preprocess import PrepareConfig
from slim.encode import EncodeConfig, encode
from slim.finetune import FinetuneConfig, finetune_student
from slim.rationales import RationaleConfig
from slim.student import StudentConfig
from slmrec.llm_train import DistillRunConfig, TeacherConfig, distill, train_teacher
from slmrec.pretrain import PretrainConfig, pretrain

from .train import FuseConfig

EMBEDDED = "embedded"  # `rationales.serve = "embedded"`: serve the embedded SmolLM2-135M-Instruct
console = Console(width=160)


@dataclass
class PipelineConfig:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    sasrec: PretrainConfig = field(default_factory=PretrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: DistillRunConfig = field(default_factory=DistillRunConfig)
    rationales: RationaleConfig = field(default_factory=RationaleConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    student_rationales: StudentConfig = field(default_factory=StudentConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    fusion: dict[str, FuseConfig] = field(default_factory=dict)
    analysis_protocol: str = "full"


# --- presets ---

def preset_path(preset: str) -> Path:
    """A preset name shipped in fusion/presets, or a TOML file of the user's."""
    if Path(preset).suffix == ".toml":
        if not Path(preset).exists():
            raise InputError(f"{preset}: preset file not found")
        return Path(preset)
    shipped = resources.files("fusion") / "presets" / f"{preset}.toml"
    if not shipped.is_file():
        names = sorted(p.name.removesuffix(".toml") for p in (resources.files("fusion") / "presets").iterdir())
        raise InputError(f"unknown preset '{preset}' (shipped: {', '.join(names)}; or give a .toml file)")
    return Path(str(shipped))


def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def _expand(value: Any, where: str) -> Any:
    """${VAR} in a string setting comes from the environment (paths of the user's models and data)."""
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, where) for v in value]
    if not isinstance(value, str):
        return value

    def env(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise InputError(f"{where}: needs the environment variable {m.group(1)} (or --set {where}=...)")
        return os.environ[m.group(1)]
    return re.sub(r"\$\{(\w+)\}", env, value)


def parse_override(item: str) -> tuple[str, Any]:
    """`key.path=value`, the value read as TOML (numbers, booleans, lists) or else taken as a string."""
    if "=" not in item:
        raise InputError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def load_preset(preset: str, overrides: list[str] = ()) -> PipelineConfig:
    path = preset_path(preset)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: {e}") from None
    for item in overrides:
        _set(data, *parse_override(item))
    data = _expand(data, path.stem)
    models = data.pop("fusion", {}).get("models", {})
    cfg = from_dict(PipelineConfig, data, path.name)
    if cfg.sasrec.model != "sasrec":  # RUN/sasrec is what SLMRec and the presets' fused models read
        raise InputError(f"{path.name}: sasrec.model must be 'sasrec'; train other backbones with "
                         f"`slmrec pretrain --model {cfg.sasrec.model}`")
    cfg.fusion = {name: from_dict(FuseConfig, m, f"{path.name}: fusion.models.{name}") for name, m in models.items()}
    return cfg


# --- stages ---

def _created(out: Path) -> str | None:
    m = out / "manifest.json"
    return read_json(m).get("created") if m.exists() else None


def _generation_done(out: Path, cfg: RationaleConfig, model: str | None = None) -> bool:
    """Rationale records complete for this config (and generating model): no server needs to start."""
    if not (out / "manifest.json").exists():
        return False
    m = read_json(out / "manifest.json")
    same = all(m["config"].get(k) == v for k, v in _json(cfg.to_dict()).items())
    return same and m["counts"]["complete"] == m["counts"]["users"] and (model is None or m["config"]["model"] == model)


def _json(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


class Pipeline:
    def __init__(self, run: str | Path, cfg: PipelineConfig):
        self.run, self.cfg = Path(run), cfg
        self.data = self.run / "data"
        self.log_path = self.run / "pipeline.json"

    def stages(self) -> list[tuple[str, Path, Callable[[], Any]]]:
        r, c = self.run, self.cfg
        stages = [
            ("prepare", self.data, self.prepare),
            ("sasrec", r / "sasrec", lambda: pretrain(self.data, r / "sasrec", c.sasrec)),
            ("slmrec teacher", r / "teacher", lambda: train_teacher(self.data, r / "sasrec", r / "teacher", c.teacher)),
            ("slmrec student", r / "student", self.distill),
            ("teacher rationales", r / "rationales" / "teacher", self.teacher_rationales),
            ("slim student fine-tuning", r / "slim-student", self.finetune),
            ("student rationales", r / "rationales" / "student", self.student_rationales),
            ("rationale vectors", r / "vectors", self.encode),
        ]
        stages += [(f"fusion {name}", r / "fusion" / name, self._fuse(name, fc)) for name, fc in c.fusion.items()]
        return stages + [("report", r / "report", self.report)]

    def run_all(self, until: str | None = None) -> None:
        self.run.mkdir(parents=True, exist_ok=True)
        log = read_json(self.log_path) if self.log_path.exists() else {"stages": []}
        write_json(self.run / "preset.json", _json(asdict(self.cfg)))
        t_all = time.perf_counter()
        for name, out, fn in self.stages():
            before = _created(out)
            console.rule(f"[bold]{name}")
            t0 = time.perf_counter()
            fn()
            seconds = round(time.perf_counter() - t0, 1)
            status = "ran" if _created(out) != before or before is None else "up to date"
            console.print(f"{name}: {status} ({seconds} s)")
            log["stages"].append({"stage": name, "status": status, "seconds": seconds,
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            write_json(self.log_path, log)
            if name == until:
                break
        console.print(f"pipeline finished in {time.perf_counter() - t_all:.0f} s; report in {self.run / 'report'}")

    def prepare(self) -> None:
        if not is_up_to_date(self.data, source_inputs(self.cfg.prepare), self.cfg.prepare.to_dict()):
            prepare_dataset(self.cfg.prepare, self.data)

    def distill(self) -> None:
        online = self.cfg.student.distill.mode == "online"
        distill(self.data, None if online else self.run / "teacher", self.run / "student", self.cfg.student,
                sasrec=self.run / "sasrec")

    def teacher_rationales(self) -> None:
        from eval.assets import smollm2_path
        from slim.rationales import generate_rationales

        cfg = self.cfg.rationales
        if cfg.serve == EMBEDDED:
            cfg.serve = str(smollm2_path())
        out = self.run / "rationales" / "teacher"
        if not _generation_done(out, cfg):
            summary = generate_rationales(self.data, out, cfg)
            _require_complete(summary, out)

    def finetune(self) -> None:
        finetune_student(self.data, self.run / "rationales" / "teacher" / "records.jsonl", self.run / "slim-student",
                         self.cfg.finetune)

    def student_rationales(self) -> None:
        from slim.student import generate_student, student_label

        cfg = self.cfg.student_rationales
        cfg.adapter = str(self.run / "slim-student")
        out = self.run / "rationales" / "student"
        if not _generation_done(out, cfg.rationale, student_label(cfg.adapter)):
            _require_complete(generate_student(self.data, out, cfg), out)

    def encode(self) -> None:
        encode(self.data, self.run / "rationales" / "student" / "records.jsonl", self.run / "vectors",
               self.cfg.encode)

    def _fuse(self, name: str, fc: FuseConfig) -> Callable[[], Any]:
        def fuse() -> None:
            from .train import train_fused
            from .vectors import load_vectors
            train_fused(self.run, name, fc, load_vectors(self.run / "vectors", self.cfg.encode.users_table,
                                                         self.cfg.encode.items_table))
        return fuse

    def report(self) -> None:
        from .report import evaluate_run, find_models

        out = self.run / "report"
        inputs = {"data": load_dataset(self.data).fingerprint,
                  "models": {n: _created(p) for n, p in find_models(self.run).items()}}
        config = {"analysis_protocol": self.cfg.analysis_protocol}
        if is_up_to_date(out, inputs, config):
            console.print((out / "report.md").read_text())
            return
        evaluate_run(self.run, out, self.cfg.analysis_protocol)
        write_json(out / "manifest.json", manifest("report", inputs=inputs, config=config, seed=None,
                                                   counts={"models": len(inputs["models"])}))


def _require_complete(summary: dict, out: Path) -> None:
    """Requests that failed after all retries stop the pipeline here; rerunning resumes them."""
    if summary["complete"] < summary["users"]:
        raise InputError(f"{out}: {summary['users'] - summary['complete']} users have no record yet "
                         f"(requests failed); rerun to resume")
