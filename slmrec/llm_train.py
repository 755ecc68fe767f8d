"""The `train-teacher` and `distill` stages: HF Trainer loops with validation-MRR model selection.

The Trainer gives resumable checkpoints and multi-GPU training unchanged under `accelerate launch`
or `torchrun`. Its checkpoints hold only the trainable tensors (adapters, projections, heads) and the
item table, never the frozen base. Model selection and test metrics go through the shared protocol
(`eval.evaluate`) on the data set's fixed candidates.

Several GPUs (data parallel; only the main process writes files; --batch-size is per device):
  accelerate launch --num_processes 4 $(which slmrec) train-teacher --run RUN --base /models/llama-2-7b --bf16
  torchrun --nproc_per_node 4 $(which slmrec) distill --run RUN --layers 4 --bf16

Output folder of a stage (`<run>/teacher`, `<run>/student`, `<run>/ablation/<variant>`):
  config.json, model.safetensors   the model (LLMRec.from_pretrained)
  teacher/                         online KD only: the teacher trained alongside
  metrics.json                     test metrics by protocol (same layout as SASRec's)
  train_log.json, manifest.json
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from accelerate import PartialState
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from eval.dataset import SeqDataset, load_dataset
from eval.errors import InputError
from eval.evaluate import evaluate
from eval.io import WEIGHTS, atomic_dir, file_hash, is_up_to_date, manifest, read_json, write_json
from eval.report import write_metrics_report

from .distill import DistillConfig, Distiller, student_aux_layers
from .llm import LLMRec, LLMRecConfig, checkpoint_state
from .pretrain import test_metrics
from .seqrec import ITEM_EMBEDDINGS, load_item_embeddings
from .trainer import next_item_pairs

POSITIONS = ("all", "last")


@dataclass
class LLMTrainConfig:
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_len: int = 20              # most recent items of a history (prompt + 20 items keeps CPU runs short)
    positions: str = "all"         # train every prefix ("all") or only the last item (E4SRec: "last")
    evals_per_epoch: int = 2       # validation MRR checks (and checkpoints) per epoch
    valid_users: int | None = None # validate on this many users (None = all) to save time
    select_protocol: str = "full"
    eval_batch_size: int = 64
    bf16: bool = False             # mixed precision on GPU
    seed: int = 42

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise InputError(f"positions '{self.positions}' is not one of {', '.join(POSITIONS)}")


@dataclass
class TeacherConfig:
    model: LLMRecConfig = field(default_factory=lambda: LLMRecConfig(layers=8))
    train: LLMTrainConfig = field(default_factory=LLMTrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DistillRunConfig:
    student: LLMRecConfig = field(default_factory=lambda: LLMRecConfig(layers=4))  # base None = the teacher's
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: LLMTrainConfig = field(default_factory=LLMTrainConfig)
    online_teacher_layers: int = 8  # online KD: depth of the teacher trained from scratch alongside

    def to_dict(self) -> dict:
        return asdict(self)


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


def fit(module: nn.Module, scored: LLMRec, ds: SeqDataset, cfg: LLMTrainConfig, work_dir: Path,
        fingerprint: dict) -> dict:
    """Train `module` (its forward returns {"loss": ...}) and keep the weights of the best validation MRR.

    `work_dir` holds the Trainer's checkpoints; a run with the same fingerprint resumes from them."""
    stamp = work_dir / "fingerprint.json"
    state = PartialState()  # under accelerate launch / torchrun only the main process touches files
    if state.is_main_process:
        if work_dir.exists() and (not stamp.exists() or read_json(stamp) != _jsonable(fingerprint)):
            shutil.rmtree(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        write_json(stamp, fingerprint)
    state.wait_for_everyone()
    train = NextItems(ds, cfg)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    rng = np.random.default_rng(cfg.seed)
    valid = np.arange(ds.num_users) if cfg.valid_users is None else \
        np.sort(rng.choice(ds.num_users, min(cfg.valid_users, ds.num_users), replace=False))
    args = TrainingArguments(
        output_dir=str(work_dir), num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, lr_scheduler_type="cosine",
        warmup_steps=int(cfg.warmup_ratio * steps_per_epoch * cfg.epochs),
        eval_strategy="steps", eval_steps=every, save_strategy="steps", save_steps=every, save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="MRR", greater_is_better=True,
        logging_steps=max(1, every // 4), report_to="none", bf16=cfg.bf16, seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False,
        label_names=[], ddp_find_unused_parameters=False)
    trainer = RecTrainer(model=module, args=args, train_dataset=train, eval_dataset=valid,
                         ds=ds, scored=scored, rec_cfg=cfg)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=get_last_checkpoint(str(work_dir)))
    return {"main_process": state.is_main_process,
            "train_seconds": round(time.perf_counter() - t0, 1), "best_valid_MRR": trainer.state.best_metric,
            "best_checkpoint": trainer.state.best_model_checkpoint, "steps": trainer.state.global_step,
            "history": trainer.state.log_history}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def test_report(model: LLMRec, ds: SeqDataset, cfg: LLMTrainConfig) -> tuple[dict, dict]:
    """Test metrics under every protocol from one encoding pass, and the encoding speed."""
    t0 = time.perf_counter()
    vectors = model.all_user_vectors(ds, "test", cfg.max_len, cfg.eval_batch_size)
    seconds = time.perf_counter() - t0
    speed = {"encode_seconds": round(seconds, 1), "users_per_s": round(ds.num_users / seconds, 2)}
    metrics = test_metrics(vectors, ds, cfg.max_len)
    for m in metrics.values():
        m["users_per_s"] = speed["users_per_s"]  # of the model, not of the cached vectors
    return metrics, speed


def _item_table(sasrec: Path, ds: SeqDataset) -> torch.Tensor:
    items = load_item_embeddings(sasrec)
    if items.shape[0] != ds.num_items + 1:
        raise InputError(f"{sasrec}: item embeddings have {items.shape[0] - 1} items, the data set has {ds.num_items}")
    return items


def _write(out_dir: Path, stage: str, models: dict[str, LLMRec], metrics: dict, log: dict, inputs: dict,
           config: dict, seed: int) -> None:
    """The stage's folder, atomically: model(s), metrics.json, train_log.json, manifest.json."""
    main = models[""]
    if not log.pop("main_process"):
        return
    with atomic_dir(out_dir) as tmp:
        for sub, model in models.items():
            model.save_pretrained(tmp / sub)
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "train_log.json", log)
        counts = {"parameters": sum(p.numel() for p in main.parameters()),
                  "trainable_parameters": sum(p.numel() for p in main.parameters() if p.requires_grad),
                  "layers": main.num_layers, "train_seconds": log["train_seconds"]}
        write_json(tmp / "manifest.json", manifest(stage, inputs=inputs, config=config, seed=seed, counts=counts))
    shutil.rmtree(work_dir_of(out_dir), ignore_errors=True)  # the finished stage needs no checkpoints


def work_dir_of(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.work"


def train_teacher(data_dir: str | Path, sasrec: str | Path, out_dir: str | Path, cfg: TeacherConfig,
                  force: bool = False) -> dict:
    """Train the teacher (LLMRec with `cfg.model.layers` layers) unless up to date; return test metrics."""
    out_dir, sasrec = Path(out_dir), Path(sasrec)
    ds = load_dataset(data_dir)
    items = _item_table(sasrec, ds)
    inputs = {"data": ds.fingerprint, "item_embeddings": file_hash(sasrec / ITEM_EMBEDDINGS if sasrec.is_dir() else sasrec)}
    if not force and is_up_to_date(out_dir, inputs, cfg.to_dict()):
        return read_json(out_dir / "metrics.json")
    torch.manual_seed(cfg.train.seed)
    model = LLMRec(replace(cfg.model), items)
    log = fit(model, model, ds, cfg.train, work_dir_of(out_dir), {"inputs": inputs, "config": cfg.to_dict()})
    metrics, speed = test_report(model, ds, cfg.train)
    _write(out_dir, "train-teacher", {"": model}, metrics, {**log, **speed}, inputs, cfg.to_dict(), cfg.train.seed)
    return metrics


def build_student(cfg: DistillRunConfig, teacher: LLMRec | None, items: torch.Tensor) -> LLMRec:
    """The student: the teacher's base (unless given), its own depth, extra heads when lambda_ms > 0."""
    base = cfg.student.base or (teacher.config.base if teacher else None)
    student_cfg = replace(cfg.student, base=base, prompt_ids=None,
                          llama=cfg.student.llama or (teacher.config.llama if teacher else None),
                          aux_heads=student_aux_layers(cfg.student.layers or 0, cfg.distill.blocks)
                          if cfg.distill.lambda_ms > 0 else [])
    return LLMRec(student_cfg, items)


def distill(data_dir: str | Path, teacher_dir: str | Path | None, out_dir: str | Path, cfg: DistillRunConfig,
            sasrec: str | Path | None = None, force: bool = False) -> dict:
    """Distill a student from a trained teacher (offline) or with a teacher trained alongside (online).

    Offline KD reads the teacher and its item table from `teacher_dir`; online KD builds a fresh
    `online_teacher_layers`-layer teacher on the student's base and the item table from `sasrec`."""
    out_dir = Path(out_dir)
    ds = load_dataset(data_dir)
    teacher, inputs = None, {"data": ds.fingerprint}
    if cfg.distill.mode == "offline" and teacher_dir is not None:
        teacher = LLMRec.from_pretrained(teacher_dir)
        if teacher.config.num_items != ds.num_items:
            raise InputError(f"{teacher_dir}: teacher scores {teacher.config.num_items} items, "
                             f"the data set has {ds.num_items}")
        items = teacher.item_emb
        inputs["teacher"] = file_hash(Path(teacher_dir) / WEIGHTS)
    elif cfg.distill.needs_teacher and cfg.distill.mode == "offline":
        raise InputError("offline distillation needs --teacher (a trained teacher folder)")
    else:
        if sasrec is None:
            raise InputError("distillation without a teacher folder needs the SASRec item embeddings (--sasrec)")
        items = _item_table(Path(sasrec), ds)
        inputs["item_embeddings"] = file_hash(Path(sasrec) / ITEM_EMBEDDINGS if Path(sasrec).is_dir() else sasrec)
    if not force and is_up_to_date(out_dir, inputs, cfg.to_dict()):
        return read_json(out_dir / "metrics.json")
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg, teacher, items)
    if cfg.distill.mode == "online":
        teacher = LLMRec(replace(student.config, layers=cfg.online_teacher_layers, aux_heads=[], prompt_ids=None,
                                 seed=student.config.seed + 1), items)
    distiller = Distiller(student, teacher, cfg.distill)
    log = fit(distiller, student, ds, cfg.train, work_dir_of(out_dir), {"inputs": inputs, "config": cfg.to_dict()})
    log.update({"loss_terms": cfg.distill.weights, "block_pairs": distiller.pairs})
    metrics, speed = test_report(student, ds, cfg.train)
    models = {"": student, **({"teacher": teacher} if cfg.distill.mode == "online" else {})}
    _write(out_dir, "distill", models, metrics, {**log, **speed}, inputs, cfg.to_dict(), cfg.train.seed)
    return metrics


# SLMRec Table 4: the student with no feature loss, then adding cos, norm and multi-supervision in turn.
ABLATION = {"ce": (False, False, False), "ce+cos": (True, False, False),
            "ce+cos+norm": (True, True, False), "ce+cos+norm+ms": (True, True, True)}


def distill_ablation(data_dir: str | Path, teacher_dir: str | Path | None, out_dir: str | Path,
                     cfg: DistillRunConfig, sasrec: str | Path | None = None, force: bool = False) -> dict:
    """Train and test the four ablation variants (the configured lambdas are the 'on' weights);
    write `<out>/<variant>/` for each and `<out>/metrics.json` + `report.md` with the table."""
    out_dir = Path(out_dir)
    results: dict[str, dict[str, dict]] = defaultdict(dict)
    for name, (cos, norm, ms) in ABLATION.items():
        d = cfg.distill
        variant = replace(cfg, distill=replace(d, lambda_cos=d.lambda_cos * cos, lambda_norm=d.lambda_norm * norm,
                                               lambda_ms=d.lambda_ms * ms))
        for protocol, m in distill(data_dir, teacher_dir, out_dir / name, variant, sasrec, force).items():
            results[protocol][name] = m
    write_metrics_report(out_dir, dict(results), "SLMRec distillation ablation (Table 4)")
    return dict(results)

