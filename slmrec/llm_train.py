"""The `slmrec-teacher` and `slmrec-student` stages: HF Trainer loops with validation-MRR model selection.

The Trainer gives resumable checkpoints and multi-GPU training unchanged under `accelerate launch`
or `torchrun`. Its checkpoints hold only the trainable tensors (adapters, projections, heads) and the
item table, never the frozen base. Model selection and test metrics go through the shared protocol
(`eval.evaluate`) on the data set's fixed candidates.

Several processes (data parallel; --train.batch-size is per process, an optimizer step takes
batch_size x processes x grad_accum examples; validation and test metrics are over every user, as
`eval.evaluate` gives them to every process; only rank 0 writes files, the others wait for it):
  accelerate launch --multi_gpu --num_processes 4 $(which slmrec) train-teacher --run RUN \
      --model.base /models/llama-2-7b --model.dtype bfloat16 --train.bf16
  torchrun --standalone --nproc_per_node 4 -- $(which slmrec) distill --run RUN --student.dtype bfloat16 --train.bf16
(`--` keeps torchrun from reading the command's `--run` as its own `--run-path`.)

Output folder of a stage (`RUN/slmrec-teacher`, `RUN/slmrec-student`, `RUN/ablation/<variant>`):
  config.json, model.safetensors   the model (LLMRec.from_pretrained)
  teacher/                         online KD only: the teacher trained alongside
  metrics.json                     test metrics by protocol (same layout as SASRec's)
  train_log.json, manifest.json
"""
from __future__ import annotations

import math
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from eval.config import config_dict, setting
from eval.dataset import SeqDataset, load_dataset
from eval.errors import InputError
from eval.evaluate import evaluate
from eval.io import METRICS_FILE, TRAIN_LOG, read_json, write_json
from eval.scoring import CachedScorer
from eval.stage import Stage, fingerprint, is_main_process, process_state, run_stage
from eval.tables import write_metrics_report

from .distill import DistillConfig, Distiller, student_aux_layers
from .llm import LLMRec, LLMRecConfig, checkpoint_state
from .pretrain import BackboneStage, test_metrics
from .seqrec import load_item_embeddings
from .trainer import next_item_pairs

POSITIONS = ("all", "last")


@dataclass(frozen=True)
class LLMTrainConfig:
    epochs: float = setting(1.0, "Training epochs (fractions allowed).")
    batch_size: int = setting(32, "Per-device training batch size.")
    grad_accum: int = setting(1, "Gradient accumulation steps: an optimizer step takes batch_size x "
                                 "processes x grad_accum examples.")
    lr: float = setting(2e-3, "Peak learning rate (cosine schedule).")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    warmup_ratio: float = setting(0.05, "Share of the steps spent warming up the learning rate.")
    max_len: int = setting(20, "Most recent history items the model reads.")
    positions: str = setting("all", "Train on every prefix ('all') or the last item only ('last', E4SRec).")
    evals_per_epoch: int = setting(2, "Validation-MRR checks (and checkpoints) per epoch.")
    valid_users: int | None = setting(None, "Validate on a seeded sample of this many users (none: all).")
    select_protocol: str = setting("full", "Candidate protocol of the validation MRR used for model selection.")
    eval_batch_size: int = setting(64, "Users per batch when scoring.")
    bf16: bool = setting(False, "bf16 mixed precision (GPU).")
    seed: int = setting(42, "Random seed.")

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise InputError(f"positions '{self.positions}' is not one of {', '.join(POSITIONS)}")
        for name in ("batch_size", "grad_accum", "evals_per_epoch"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Schedule:
    """The Trainer's step counts for `examples` training rows on `world` processes: a process's
    dataloader holds ceil(examples / (batch_size x world)) batches (accelerate evens the shares out),
    an optimizer step takes grad_accum of them."""

    steps_per_epoch: int
    steps: int         # the whole run (epochs may be fractional)
    eval_every: int    # validation and checkpoint every this many steps (and at the last step)
    warmup_steps: int

    @classmethod
    def of(cls, examples: int, cfg: LLMTrainConfig, world: int = 1) -> Schedule:
        per_epoch = max(1, math.ceil(examples / (cfg.batch_size * world * cfg.grad_accum)))
        return cls(per_epoch, math.ceil(per_epoch * cfg.epochs), max(1, per_epoch // cfg.evals_per_epoch),
                   int(cfg.warmup_ratio * per_epoch * cfg.epochs))


def _one_seed(table: str, model: LLMRecConfig) -> None:
    """train.seed is the one seed of a trained model (data order and initial weights): a second one in
    the model's table would disagree with it."""
    if model.seed is not None:
        raise InputError(f"{table}.seed: the initial weights are seeded by train.seed; set that instead")


@dataclass(frozen=True)
class SLMRecTeacherConfig:
    model: LLMRecConfig = setting(factory=lambda: LLMRecConfig(layers=8))
    train: LLMTrainConfig = setting(factory=LLMTrainConfig)

    def __post_init__(self) -> None:
        _one_seed("model", self.model)


@dataclass(frozen=True)
class SLMRecStudentConfig:
    student: LLMRecConfig = setting(factory=lambda: LLMRecConfig(layers=4))  # base none = the teacher's
    distill: DistillConfig = setting(factory=DistillConfig)
    train: LLMTrainConfig = setting(factory=LLMTrainConfig)
    online_teacher_layers: int = setting(8, "Online KD: depth of the teacher trained from scratch alongside.")

    def __post_init__(self) -> None:
        _one_seed("student", self.student)


class NextItems(torch.utils.data.Dataset):
    """Each user's training history (left-padded) with its next-item targets."""

    def __init__(self, ds: SeqDataset, cfg: LLMTrainConfig):
        _, self.inputs, targets = next_item_pairs(ds, cfg.max_len)
        self.targets = targets if cfg.positions == "all" else targets[:, -1]

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"histories": self.inputs[i], "targets": self.targets[i]}


class RecTrainer(Trainer):
    """Trainer whose evaluation is the shared protocol's validation metrics of `scored`."""

    def __init__(self, *args, ds: SeqDataset, scored: LLMRec, rec_cfg: LLMTrainConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.ds, self.scored, self.rec_cfg = ds, scored, rec_cfg
        self.terms: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        for k, v in out.items():
            if k.startswith("loss_"):
                self.terms[k].append(float(v))
        return (out["loss"], out) if return_outputs else out["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Each distillation term is logged on its own, so a term that is off cannot hide."""
        if "loss" in logs:
            logs.update({k: round(float(np.mean(v)), 4) for k, v in self.terms.items() if v})
            self.terms.clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        self.scored.eval()
        users = np.asarray(eval_dataset if eval_dataset is not None else self.eval_dataset)
        m = evaluate(self.scored, self.ds, "valid", self.rec_cfg.select_protocol, users=users,
                     batch_size=self.rec_cfg.eval_batch_size, max_len=self.rec_cfg.max_len)
        metrics = {f"{metric_key_prefix}_{k}": m[k] for k in ("MRR", "NDCG@10", "HR@10")}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints hold the trainable tensors and the item table, not the frozen base."""
        super()._save(output_dir, state_dict=checkpoint_state(self.accelerator.unwrap_model(self.model)))

    def _issue_warnings_after_load(self, load_result) -> None:
        """The frozen base is expected to be missing from a checkpoint; anything else is an error."""
        missing = set(load_result.missing_keys) & set(checkpoint_state(self.model))
        if missing or load_result.unexpected_keys:
            raise InputError(f"checkpoint does not match the model: missing {sorted(missing)[:3]}, "
                             f"unexpected {load_result.unexpected_keys[:3]}")


class CheckSchedule(TrainerCallback):
    """The schedule the evaluations and warm-up were set from must be the Trainer's own."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps != self.schedule.steps:
            raise RuntimeError(f"the Trainer runs {state.max_steps} steps, the schedule assumed {self.schedule}")


class Objective(nn.Module):
    """The module the Trainer trains, around a recommender or distiller whose forward returns
    {"loss": ...}. The Trainer writes HF-only attributes into `model.config`; this wrapper has none,
    so the recommender's frozen config stays untouched."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, histories: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.module(histories, targets)


def train_llm(module: nn.Module, scored: LLMRec, ds: SeqDataset, cfg: LLMTrainConfig, work_dir: Path,
              fingerprint: dict) -> dict:
    """Train `module` (its forward returns {"loss": ...}) and keep the weights of the best validation MRR.

    `work_dir` holds the Trainer's checkpoints; a run with the same fingerprint resumes from them."""
    stamp = work_dir / "fingerprint.json"
    state = process_state()  # under accelerate launch / torchrun only the main process touches files
    if state.is_main_process:
        if work_dir.exists() and (not stamp.exists() or read_json(stamp) != fingerprint):
            shutil.rmtree(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        write_json(stamp, fingerprint)
    state.wait_for_everyone()
    train = NextItems(ds, cfg)
    schedule = Schedule.of(len(train), cfg, state.num_processes)
    rng = np.random.default_rng(cfg.seed)
    valid = np.arange(ds.num_users) if cfg.valid_users is None else \
        np.sort(rng.choice(ds.num_users, min(cfg.valid_users, ds.num_users), replace=False))
    trainer = RecTrainer(model=Objective(module), args=training_args(cfg, schedule, work_dir), train_dataset=train,
                         eval_dataset=valid, ds=ds, scored=scored, rec_cfg=cfg, callbacks=[CheckSchedule(schedule)])
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=get_last_checkpoint(str(work_dir)))
    return {"train_seconds": round(time.perf_counter() - t0, 1), "best_valid_MRR": trainer.state.best_metric,
            "best_checkpoint": trainer.state.best_model_checkpoint, "steps": trainer.state.global_step,
            "processes": state.num_processes, "schedule": vars(schedule), "history": trainer.state.log_history}


def training_args(cfg: LLMTrainConfig, schedule: Schedule, work_dir: Path) -> TrainingArguments:
    """The Trainer's arguments: validation MRR picks the checkpoint kept, every `schedule.eval_every` steps."""
    every = schedule.eval_every
    return TrainingArguments(
        output_dir=str(work_dir), num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        lr_scheduler_type="cosine", warmup_steps=schedule.warmup_steps,
        eval_strategy="steps", eval_steps=every, save_strategy="steps", save_steps=every, save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="MRR", greater_is_better=True,
        logging_steps=max(1, every // 4), report_to="none", bf16=cfg.bf16, seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False,
        label_names=[], ddp_find_unused_parameters=False)


def _item_table(sasrec: Path, ds: SeqDataset) -> torch.Tensor:
    items = load_item_embeddings(sasrec)
    if items.shape[0] != ds.num_items + 1:
        raise InputError(f"{sasrec}: item embeddings have {items.shape[0] - 1} items, the data set has {ds.num_items}")
    return items


class LLMStage(Stage):
    """What the teacher and student stages share: resumable Trainer checkpoints beside the output
    folder, and the output itself (model(s), test metrics, training log)."""

    @property
    def work_dir(self) -> Path:
        """The Trainer's checkpoints: a rerun with the same inputs and config resumes from them."""
        return self.out.parent / f".{self.out.name}.work"

    def train(self, module: nn.Module, scored: LLMRec, ds: SeqDataset) -> dict:
        stamp = {"inputs": {k: fingerprint(p) for k, p in self.inputs().items()}, "config": config_dict(self.config)}
        return train_llm(module, scored, ds, self.config.train, self.work_dir, stamp)

    def write(self, out: Path, models: dict[str, LLMRec], ds: SeqDataset, log: dict) -> dict:
        """Save the model(s) (the main one at the top, others in sub-folders), test metrics and the log
        (every process takes part in the test ranking; rank 0 alone writes)."""
        main = models[""]
        t0 = time.perf_counter()
        metrics = test_metrics(CachedScorer(main), ds, self.config.train.max_len, self.config.train.eval_batch_size)
        users_per_s = round(ds.num_users / (time.perf_counter() - t0), 2)  # one encoding pass serves every protocol
        for m in metrics.values():
            m["users_per_s"] = users_per_s
        if is_main_process():
            for sub, model in models.items():
                model.save_pretrained(out / sub)
            write_json(out / METRICS_FILE, metrics)
            write_json(out / TRAIN_LOG, log)
        return {"parameters": sum(p.numel() for p in main.parameters()),
                "trainable_parameters": sum(p.numel() for p in main.parameters() if p.requires_grad),
                "layers": main.num_layers, "train_seconds": log["train_seconds"], "users_per_s": users_per_s}

    def finished(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)  # the finished stage needs no checkpoints


class TeacherStage(LLMStage):
    """Train the SLMRec teacher: an E4SRec-style LLM recommender (LoRA) over the ID backbone's item
    embeddings; writes RUN/slmrec-teacher."""

    name = "slmrec-teacher"
    config_class = SLMRecTeacherConfig

    def inputs(self) -> dict[str, Path]:
        return {"data": self.data_dir, "item_embeddings": self.run / BackboneStage.name}

    def build(self, out: Path) -> dict:
        cfg = self.config
        ds = load_dataset(self.data_dir)
        items = _item_table(self.run / BackboneStage.name, ds)
        torch.manual_seed(cfg.train.seed)
        model = LLMRec(cfg.model, items)
        return self.write(out, {"": model}, ds, self.train(model, model, ds))


def build_student(cfg: SLMRecStudentConfig, teacher: LLMRec | None, items: torch.Tensor) -> LLMRec:
    """The student: the teacher's base (unless given), its own depth, extra heads when lambda_ms > 0."""
    base = cfg.student.base or (teacher.config.base if teacher else None)
    student_cfg = replace(cfg.student, base=base, prompt_ids=None,
                          llama=cfg.student.llama or (teacher.config.llama if teacher else None),
                          aux_heads=student_aux_layers(cfg.student.layers or 0, cfg.distill.blocks)
                          if cfg.distill.lambda_ms > 0 else [])
    return LLMRec(student_cfg, items)


class StudentStage(LLMStage):
    """Distill the SLMRec student from the trained teacher (offline KD) or with a teacher trained
    alongside (online KD, `distill.mode = "online"`); writes RUN/slmrec-student."""

    name = "slmrec-student"
    config_class = SLMRecStudentConfig

    @property
    def online(self) -> bool:
        return self.config.distill.mode == "online"

    def inputs(self) -> dict[str, Path]:
        if self.online:  # a fresh teacher on the student's base, over the ID backbone's item table
            return {"data": self.data_dir, "item_embeddings": self.run / BackboneStage.name}
        return {"data": self.data_dir, "teacher": self.run / TeacherStage.name}

    def build(self, out: Path) -> dict:
        cfg = self.config
        ds = load_dataset(self.data_dir)
        teacher = None
        if self.online:
            items = _item_table(self.run / BackboneStage.name, ds)
        else:
            teacher_dir = self.run / TeacherStage.name
            teacher = LLMRec.from_pretrained(teacher_dir)
            if teacher.config.num_items != ds.num_items:
                raise InputError(f"{teacher_dir}: teacher scores {teacher.config.num_items} items, "
                                 f"the data set has {ds.num_items}")
            items = teacher.item_emb
        torch.manual_seed(cfg.train.seed)
        student = build_student(cfg, teacher, items)
        if self.online:
            teacher = LLMRec(replace(student.config, layers=cfg.online_teacher_layers, aux_heads=[], prompt_ids=None,
                                     seed=student.config.seed + 1), items)
        distiller = Distiller(student, teacher, cfg.distill)
        log = self.train(distiller, student, ds)
        log.update({"loss_terms": cfg.distill.weights, "block_pairs": distiller.pairs})
        return self.write(out, {"": student, **({"teacher": teacher} if self.online else {})}, ds, log)


# SLMRec Table 4: the student with no feature loss, then adding cos, norm and multi-supervision in turn.
ABLATION = {"ce": (False, False, False), "ce+cos": (True, False, False),
            "ce+cos+norm": (True, True, False), "ce+cos+norm+ms": (True, True, True)}


def distill_ablation(run: str | Path, cfg: SLMRecStudentConfig, force: bool = False) -> dict:
    """Train and test the four ablation variants (the configured lambdas are the 'on' weights) as
    RUN/ablation/<variant>, and write RUN/ablation/metrics.json + report.md with the table."""
    results: dict[str, dict[str, dict]] = defaultdict(dict)
    for name, (cos, norm, ms) in ABLATION.items():
        d = cfg.distill
        variant = replace(cfg, distill=replace(d, lambda_cos=d.lambda_cos * cos, lambda_norm=d.lambda_norm * norm,
                                               lambda_ms=d.lambda_ms * ms))
        stage = StudentStage(run, variant, folder=f"ablation/{name}")
        run_stage(stage, force)
        for protocol, m in read_json(stage.out / METRICS_FILE).items():
            results[protocol][name] = m
    if is_main_process():
        write_metrics_report(Path(run) / "ablation", dict(results), "SLMRec distillation ablation (Table 4)")
    return dict(results)
