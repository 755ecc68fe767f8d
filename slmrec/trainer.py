"""The training loop for ID-based sequence models (SASRec, GRU4Rec, fused models), on `accelerate`.

Next-item loss on each user's training history, validation MRR (every `eval_every` epochs) for model
selection and early stopping, the best weights restored at the end. The LLM models use the HF
Trainer instead.

The same loop runs in one process or in several (torchrun / accelerate launch: the model is wrapped in
DDP by `accelerate`). Every process draws the same seeded order of an epoch's global batches of
`batch_size` x processes examples and trains on its share of each; a process's loss is weighted by
its share of the global batch's loss terms, so the averaged gradient is that of the global batch's
mean loss, what one process with the global batch computes (up to float rounding). Dropout and
sampled negatives draw from seed + rank (rank 0: one process's draws). Validation ranks every
validation user (`eval.evaluate` shards them over the processes and gathers the ranks), so every
process selects the same epoch and stops at the same one; the log every process returns is rank 0's.
One process: the same draws, batches and losses as the hand loop this replaced.

Resumable: given a checkpoint folder, each validated epoch leaves its state there (the weights
training changed, the optimizer, every process's random states, the best weights so far, the log);
run again with it, training continues after that epoch and ends as the uninterrupted run would
(timings aside). Training stages keep it in RUN/.<folder>.work (`ResumableStage`).
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from eval.config import config_dict, setting
from eval.dataset import SeqDataset, pad_left
from eval.errors import InputError
from eval.evaluate import evaluate
from eval.io import atomic_file, read_json, write_json
from eval.scoring import DotScorer
from eval.stage import Stage, fingerprint, is_main_process, wait_for_everyone

from .seqrec import SequentialRecommender

CHECKPOINT = "checkpoint.pt"  # the last validated epoch's training state, in the checkpoint folder


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(200, "Most training epochs.")
    batch_size: int = setting(128, "Users per batch.")
    lr: float = setting(1e-3, "Learning rate (AdamW).")
    lr_schedule: str = setting("constant", "constant, or cosine: the learning rate falls from `lr` to 0 along a half "
                                           "cosine over `epochs` epochs of steps (a run that patience or the time "
                                           "budget stops sooner ends above 0). On ml-1m SASRec over 90 epochs it "
                                           "ended 0.0013 NDCG@10 below the constant rate: the lower rate cost more "
                                           "training than settling the weights gained.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    patience: int = setting(10, "Epochs without a better validation MRR before stopping.")
    eval_every: int = setting(1, "Epochs between validations (and the last epoch); only validated epochs can be "
                                 "selected. On ml-1m a full-ranking validation costs about half an epoch of "
                                 "SASRec with the sampled loss (max_len 200).")
    select_protocol: str = setting("full", "Candidate protocol of the validation MRR used for model selection.")
    max_len: int = setting(50, "Most recent items a history keeps.")
    seed: int = setting(42, "Random seed (data order, initial weights, sampled negatives).")
    time_budget_s: float = setting(0.0, "Stop at the first validation after this many seconds of training (0: no "
                                        "limit). Where it cuts a run, the result depends on the machine's speed "
                                        "as well as on the seed.")
    loss: str = setting("ce", "Next-item loss of an ID backbone: ce (cross-entropy over all items, SASRec+), "
                              "sampled (softmax over the target and `negatives` uniform draws per history), gbce "
                              "(gSASRec's calibrated BCE on the same draws). The sampled ones skip the [positions, "
                              "items] logits: cheaper steps, less signal per step. Fused models train with ce.")
    negatives: int = setting(256, "Negatives drawn uniformly per history for the sampled and gbce losses.")
    gbce_t: float = setting(0.75, "gBCE calibration t in [0, 1]: 0 is plain BCE, 1 fits the full softmax's "
                                  "probabilities; gSASRec used 0.75 with 256 negatives.")
    windows: str = setting("latest", "Training rows of a history: latest (its most recent max_len targets, as SASRec "
                                     "and SASRec+) or all (the whole history, cut into max_len windows from the "
                                     "latest back). On ml-1m at max_len 200 a third of the next-item pairs lie "
                                     "before the latest window; all trains them at 1.4x the rows an epoch.")
    length_pools: int = setting(1, "Batches per shuffled pool sorted by history length before batching: above 1, "
                                   "batches hold similar lengths and each is cut to its longest history (less "
                                   "padding to compute: 8 cuts the positions of a SASRec ml-1m epoch at max_len "
                                   "200 by 40 %); 1: plain shuffle.")


def next_item_pairs(ds: SeqDataset, max_len: int,
                    windows: str = "latest") -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(users, inputs, targets): the training history shifted by one, left-padded to max_len. With
    `windows="all"` a history longer than max_len gives one row per max_len targets, from the latest
    back (each row's first target keeps the item before it as input), so every next-item pair trains
    exactly once an epoch."""
    if windows not in ("latest", "all"):
        raise InputError(f"train.windows: unknown {windows!r} (latest or all)")
    users, inputs, targets = [], [], []
    for u, s in enumerate(ds.train_sequences()):
        if len(s) < 2:
            continue
        ends = range(len(s), 1, -max_len) if windows == "all" else [len(s)]
        for end in ends:  # a window's targets are s[end - max_len:end]
            w = s[max(0, end - max_len - 1):end]
            users.append(u)
            inputs.append(w[:-1])
            targets.append(w[1:])
    return np.array(users), pad_left(inputs, max_len), pad_left(targets, max_len)


Examples = tuple[np.ndarray, torch.Tensor, torch.Tensor]


def batches(lengths: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, processes: int = 1) -> list[torch.Tensor]:
    """One epoch's global batches of example indices (`batch_size` x `processes` each), in shuffled
    order; with `length_pools` > 1 each pool of that many batches is sorted by length first, so a
    batch's histories need about the same padding."""
    size = cfg.batch_size * processes
    order = torch.randperm(len(lengths), generator=gen)
    if cfg.length_pools > 1:
        pools = order.split(size * cfg.length_pools)
        order = torch.cat([p[lengths[p].argsort(stable=True)] for p in pools])
    out = list(order.split(size))
    return [out[i] for i in torch.randperm(len(out), generator=gen)] if cfg.length_pools > 1 else out


def batch_loss(model: torch.nn.Module, cfg: TrainConfig) -> Callable[..., torch.Tensor]:
    """The model's training loss under the configured loss; only ID backbones have the sampled ones."""
    if cfg.loss == "ce":
        return model.training_loss
    if not isinstance(model, SequentialRecommender):
        raise InputError(f"train.loss: {cfg.loss!r} is for ID backbones; {type(model).__name__} trains with 'ce'")
    return partial(model.training_loss, loss=cfg.loss, negatives=cfg.negatives, gbce_t=cfg.gbce_t)


def lr_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig,
                 steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step learning-rate schedule `cfg.lr_schedule` names (None: constant)."""
    if cfg.lr_schedule == "constant":
        return None
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    raise InputError(f"train.lr_schedule: unknown {cfg.lr_schedule!r} (constant or cosine)")


def loss_terms(model: torch.nn.Module, targets: torch.Tensor) -> int:
    """How many terms the model's training loss averages over for these rows: every real position for
    a model trained at every position (an ID backbone, a jointly trained fused model), else one per row."""
    if isinstance(model, SequentialRecommender) or getattr(model, "every_position", False):
        return int((targets > 0).sum())
    return len(targets)


class TrainingLoss(nn.Module):
    """What DDP wraps: its forward is the model's training loss (DDP averages the gradients of what
    its own forward computed)."""

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, users: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(users, inputs, targets)


class OnDevice(DotScorer):
    """A dot-product model on an accelerator, as `eval.evaluate` scores it: the users and histories it
    is handed (on the CPU) go to the model's device first."""

    def __init__(self, model: DotScorer, device: torch.device):
        self.model, self.device = model, device

    def user_vectors(self, users: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        return self.model.user_vectors(users.to(self.device), histories.to(self.device))

    def item_vectors(self) -> torch.Tensor:
        return self.model.item_vectors()


def on_device(model: Any) -> Any:
    """What to hand `eval.evaluate` for a model `fit` trained: the model itself on the CPU (or when it
    is not a dot-product module), else an `OnDevice` scorer of it."""
    device = next((p.device for p in model.parameters()), None) if isinstance(model, nn.Module) else None
    if device is None or device.type == "cpu" or not (isinstance(model, DotScorer)
                                                      and type(model).score is DotScorer.score):
        return model
    return OnDevice(model, device)


def _versions(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Each state tensor of the model with its in-place version counter."""
    return {k: (v, v._version) for k, v in model.state_dict(keep_vars=True).items()}


def _changed(model: nn.Module, start: dict[str, tuple[torch.Tensor, int]]) -> list[str]:
    """The state tensors training changed since `start` (modified in place or replaced): the trainable
    weights and any buffer training updates; never a frozen backbone or the data's text tables."""
    return [k for k, v in model.state_dict(keep_vars=True).items()
            if k not in start or start[k][0] is not v or start[k][1] != v._version]


class Processes:
    """This process's place among those training together (one: nothing is exchanged)."""

    def __init__(self, world: int, rank: int, device: torch.device):
        self.world, self.rank, self.device = world, rank, device  # NCCL reduces tensors on the GPU

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rank0(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, by rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def total(self, x: float) -> float:
        """The sum of `x` over the processes (the same float on every one)."""
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())


def _random_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "batches": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_random_state(state: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def fit(model: torch.nn.Module, ds: SeqDataset, cfg: TrainConfig, desc: str = "training",
        examples: Examples | None = None, valid_users: np.ndarray | None = None,
        monitor: Callable[[torch.nn.Module, dict], dict] | None = None, checkpoint: Path | None = None) -> dict:
    """Train in place (on the accelerator's device: the CPU unless there is a GPU); return the log (per
    validated epoch: loss, validation MRR and NDCG@10, training seconds so far; best epoch, seconds,
    processes and optimizer steps per epoch), the same on every process.

    `examples` (users, inputs, targets) default to every next-item pair of the training histories;
    `valid_users` restricts model selection to a subset (e.g. one user group); `monitor(model, entry)`,
    if given, sees each validated epoch's entry and adds its figures to it, its time left out of the
    seconds (a time-to-quality curve, e.g. test metrics). `checkpoint`: a folder where each validated
    epoch's training state is kept and from which a run of the same model and settings resumes (rank 0
    writes it; a checkpoint of another number of processes is not resumed)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # unused parameters are allowed (a kind of model need not use every one each step); the buffers are
    # the data's tables, the same on every process: not broadcast each step
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)])
    procs = Processes(accelerator.num_processes, accelerator.process_index, accelerator.device)
    world, rank, device = procs.world, procs.rank, procs.device
    torch.manual_seed(cfg.seed + rank)  # dropout and sampled negatives: a stream per process
    gen = torch.Generator().manual_seed(cfg.seed)  # the batches: the same on every process
    if cfg.windows != "latest" and not isinstance(model, SequentialRecommender):  # rationales fit the latest only
        raise InputError(f"train.windows: {cfg.windows!r} is for ID backbones; {type(model).__name__} trains on "
                         "each history's latest window")
    users, inputs, targets = examples if examples is not None else next_item_pairs(ds, cfg.max_len, cfg.windows)
    users_t, lengths = torch.as_tensor(users), (inputs > 0).sum(1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # every process steps once per global batch, so the schedule counts global batches
    schedule = lr_scheduler(opt, cfg, math.ceil(len(lengths) / (cfg.batch_size * world)))
    with warnings.catch_warnings():  # torch's deprecation of the name accelerate passes broadcast_buffers by
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        objective, opt = accelerator.prepare(TrainingLoss(model, batch_loss(model, cfg)), opt)
    start = _versions(model)  # after DDP's first broadcast of the weights
    scored = on_device(model)
    t0, aside = time.perf_counter(), 0.0

    def validate(epoch: int, **entry: float) -> dict:
        nonlocal aside
        model.eval()
        m = evaluate(scored, ds, "valid", cfg.select_protocol, max_len=cfg.max_len, users=valid_users)
        entry = {"epoch": epoch, **entry, "valid_MRR": m["MRR"], "valid_NDCG@10": m["NDCG@10"],
                 "seconds": round(time.perf_counter() - t0 - aside, 1)}
        t1 = time.perf_counter()
        entry.update(monitor(model, entry) if monitor else {})
        aside += time.perf_counter() - t1
        return procs.rank0(entry)  # every process: rank 0's timings, so the same decisions

    def save(epoch: int, stopped: bool) -> None:
        nonlocal aside
        t1 = time.perf_counter()
        randoms = procs.gather(_random_state(gen))
        if procs.main:
            keys, now = _changed(model, start), model.state_dict()
            with atomic_file(checkpoint / CHECKPOINT, "wb") as f:
                torch.save({"epoch": epoch, "stopped": stopped, "processes": world, "steps_per_epoch": steps,
                            "seconds": time.perf_counter() - t0 - aside, "log": log, "best": best,
                            "best_epoch": best_epoch, "model": {k: now[k] for k in keys},
                            "best_model": {k: best_state[k] for k in keys}, "optimizer": opt.state_dict(),
                            "schedule": schedule.state_dict() if schedule else None,
                            "random": randoms}, f)
        aside += time.perf_counter() - t1

    saved = resume(checkpoint, model, opt, schedule, gen, procs)
    if saved is None:
        # the starting point is a candidate too: a head fitted on top of a trained backbone must not
        # end up worse on validation than the backbone it started as
        log = [validate(0)]
        best, best_state, best_epoch = log[0]["valid_MRR"], copy.deepcopy(model.state_dict()), 0
        first, stopped, steps = 1, False, None
    else:
        log, best, best_state, best_epoch = saved["log"], saved["best"], saved["best_state"], saved["best_epoch"]
        first, stopped, steps = saved["epoch"] + 1, saved["stopped"], saved["steps_per_epoch"]
        t0 = time.perf_counter() - saved["seconds"]
    with Progress(transient=True, disable=not procs.main) as bar:
        task = bar.add_task(desc, total=cfg.epochs, completed=first - 1)
        for epoch in range(first, first if stopped else cfg.epochs + 1):
            objective.train()
            total, n = 0.0, 0
            epoch_batches = batches(lengths, cfg, gen, world)
            steps = len(epoch_batches)
            for idx in epoch_batches:
                mine = idx if world == 1 else idx.tensor_split(world)[rank]
                # a process left without rows of a small last batch takes a row with weight 0: DDP needs
                # every process's gradients
                rows = mine if len(mine) else idx[:1]
                loss = objective(users_t[rows].to(device), inputs[rows].to(device), targets[rows].to(device))
                if world > 1:  # this process's share of the global batch's mean loss, times the processes
                    loss = loss * (world * loss_terms(model, targets[mine]) / loss_terms(model, targets[idx]))
                opt.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                opt.step()
                if schedule is not None:
                    schedule.step()
                total, n = total + (loss.item() if world == 1 else loss.item() / world) * len(idx), n + len(idx)
            total = procs.total(total)
            bar.update(task, advance=1)
            if epoch % cfg.eval_every and epoch < cfg.epochs:
                continue
            log.append(validate(epoch, loss=total / n))
            mrr = log[-1]["valid_MRR"]
            bar.update(task, description=f"{desc} loss {total / n:.3f} valid MRR {mrr:.4f}")
            if mrr > best:
                best, best_epoch = mrr, epoch
                best_state = copy.deepcopy(model.state_dict())
            stopped = epoch - best_epoch >= cfg.patience or 0 < cfg.time_budget_s <= log[-1]["seconds"]
            if checkpoint is not None:
                save(epoch, stopped)
            if stopped:
                break
    model.load_state_dict(best_state)
    model.eval()
    return {"epochs": log, "best_epoch": best_epoch, "best_valid_MRR": best,
            "train_seconds": procs.rank0(time.perf_counter() - t0 - aside), "processes": world,
            "steps_per_epoch": steps}


def resume(checkpoint: Path | None, model: nn.Module, opt: Any,
           schedule: torch.optim.lr_scheduler.LRScheduler | None, gen: torch.Generator,
           procs: Processes) -> dict | None:
    """The training state of the checkpoint in `checkpoint`, loaded into the model, the optimizer, the
    learning-rate schedule and the random generators (with `best_state`, the best weights so far);
    None when there is none, or it was written by another number of processes (its shares and random
    streams do not carry over)."""
    file = None if checkpoint is None else checkpoint / CHECKPOINT
    if file is None or not file.exists():
        return None
    saved = torch.load(file, map_location="cpu", weights_only=True)
    if saved["processes"] != procs.world:
        if procs.main:
            warnings.warn(f"{file}: a checkpoint of {saved['processes']} processes is not resumed on {procs.world}; "
                          "training starts afresh")
        return None
    best_state = copy.deepcopy(model.state_dict())  # what training did not change is as it started
    best_state.update({k: v.to(best_state[k].device) for k, v in saved["best_model"].items()})
    unexpected = model.load_state_dict(saved["model"], strict=False).unexpected_keys
    if unexpected:
        raise InputError(f"{file}: checkpoint does not match the model (unexpected {unexpected[:3]})")
    opt.load_state_dict(saved["optimizer"])
    if schedule is not None:
        schedule.load_state_dict(saved["schedule"])
    _set_random_state(saved["random"][procs.rank], gen)
    return {**saved, "best_state": best_state}


class ResumableStage(Stage):
    """A stage that trains with `fit`: its checkpoints live in RUN/.<folder>.work, stamped with the
    stage's inputs and config; a rerun with the same resumes from them, another starts afresh, and the
    finished stage drops them. Rank 0 alone writes there."""

    @property
    def work_dir(self) -> Path:
        return self.out.parent / f".{self.out.name}.work"

    def checkpoints(self) -> Path:
        """The work folder, emptied first if it holds another build's checkpoints."""
        stamp = json.loads(json.dumps({"inputs": {k: fingerprint(p) for k, p in self.inputs().items()},
                                       "config": config_dict(self.config)}, default=str))
        file = self.work_dir / "fingerprint.json"
        if is_main_process():
            if self.work_dir.exists() and (not file.exists() or read_json(file) != stamp):
                shutil.rmtree(self.work_dir)
            self.work_dir.mkdir(parents=True, exist_ok=True)
            write_json(file, stamp)
        wait_for_everyone()
        return self.work_dir

    def finished(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)  # the finished stage needs no checkpoints
