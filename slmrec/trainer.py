"""The training loop for ID-based sequence models (SASRec, GRU4Rec, fused models).

Next-item loss on each user's training history, validation MRR (every `eval_every` epochs) for model
selection and early stopping, the best weights restored at the end. The LLM models use the HF
Trainer instead; these models are small enough that a plain loop is the clearest thing.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from rich.progress import Progress

from eval.config import setting
from eval.dataset import SeqDataset, pad_left
from eval.errors import InputError
from eval.evaluate import evaluate

from .seqrec import SequentialRecommender


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(200, "Most training epochs.")
    batch_size: int = setting(128, "Users per batch.")
    lr: float = setting(1e-3, "Learning rate (AdamW).")
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
    length_pools: int = setting(1, "Batches per shuffled pool sorted by history length before batching: above 1, "
                                   "batches hold similar lengths and each is cut to its longest history (less "
                                   "padding to compute: 8 cuts the positions of a SASRec ml-1m epoch at max_len "
                                   "200 by 40 %); 1: plain shuffle.")


def next_item_pairs(ds: SeqDataset, max_len: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(users, inputs, targets): the training history shifted by one, left-padded to max_len."""
    users, inputs, targets = [], [], []
    for u, s in enumerate(ds.train_sequences()):
        if len(s) < 2:
            continue
        users.append(u)
        inputs.append(s[:-1][-max_len:])
        targets.append(s[1:][-max_len:])
    return np.array(users), pad_left(inputs, max_len), pad_left(targets, max_len)


Examples = tuple[np.ndarray, torch.Tensor, torch.Tensor]


def batches(lengths: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches of example indices, in shuffled order; with `length_pools` > 1 each pool of
    that many batches is sorted by length first, so a batch's histories need about the same padding."""
    order = torch.randperm(len(lengths), generator=gen)
    if cfg.length_pools > 1:
        pools = order.split(cfg.batch_size * cfg.length_pools)
        order = torch.cat([p[lengths[p].argsort(stable=True)] for p in pools])
    out = list(order.split(cfg.batch_size))
    return [out[i] for i in torch.randperm(len(out), generator=gen)] if cfg.length_pools > 1 else out


def batch_loss(model: torch.nn.Module, cfg: TrainConfig) -> Callable[..., torch.Tensor]:
    """The model's training loss under the configured loss; only ID backbones have the sampled ones."""
    if cfg.loss == "ce":
        return model.training_loss
    if not isinstance(model, SequentialRecommender):
        raise InputError(f"train.loss: {cfg.loss!r} is for ID backbones; {type(model).__name__} trains with 'ce'")
    return partial(model.training_loss, loss=cfg.loss, negatives=cfg.negatives, gbce_t=cfg.gbce_t)


def fit(model: torch.nn.Module, ds: SeqDataset, cfg: TrainConfig, desc: str = "training",
        examples: Examples | None = None, valid_users: np.ndarray | None = None,
        monitor: Callable[[torch.nn.Module, dict], dict] | None = None) -> dict:
    """Train in place; return the log (per validated epoch: loss, validation MRR and NDCG@10, training
    seconds so far; best epoch, seconds).

    `examples` (users, inputs, targets) default to every next-item pair of the training histories;
    `valid_users` restricts model selection to a subset (e.g. one user group); `monitor(model, entry)`,
    if given, sees each validated epoch's entry and adds its figures to it, its time left out of the
    seconds (a time-to-quality curve, e.g. test metrics)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    users, inputs, targets = examples if examples is not None else next_item_pairs(ds, cfg.max_len)
    users_t, lengths = torch.as_tensor(users), (inputs > 0).sum(1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = batch_loss(model, cfg)
    t0, aside = time.perf_counter(), 0.0

    def validate(epoch: int, **entry: float) -> dict:
        nonlocal aside
        model.eval()
        m = evaluate(model, ds, "valid", cfg.select_protocol, max_len=cfg.max_len, users=valid_users)
        entry = {"epoch": epoch, **entry, "valid_MRR": m["MRR"], "valid_NDCG@10": m["NDCG@10"],
                 "seconds": round(time.perf_counter() - t0 - aside, 1)}
        t1 = time.perf_counter()
        entry.update(monitor(model, entry) if monitor else {})
        aside += time.perf_counter() - t1
        return entry

    # the starting point is a candidate too: a head fitted on top of a trained backbone must not
    # end up worse on validation than the backbone it started as
    log = [validate(0)]
    best, best_state, best_epoch = log[0]["valid_MRR"], copy.deepcopy(model.state_dict()), 0
    with Progress(transient=True) as bar:
        task = bar.add_task(desc, total=cfg.epochs)
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            total, n = 0.0, 0
            for idx in batches(lengths, cfg, gen):
                loss = step(users_t[idx], inputs[idx], targets[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + loss.item() * len(idx), n + len(idx)
            bar.update(task, advance=1)
            if epoch % cfg.eval_every and epoch < cfg.epochs:
                continue
            log.append(validate(epoch, loss=total / n))
            mrr = log[-1]["valid_MRR"]
            bar.update(task, description=f"{desc} loss {total / n:.3f} valid MRR {mrr:.4f}")
            if mrr > best:
                best, best_epoch = mrr, epoch
                best_state = copy.deepcopy(model.state_dict())
            if epoch - best_epoch >= cfg.patience or 0 < cfg.time_budget_s <= log[-1]["seconds"]:
                break
    model.load_state_dict(best_state)
    model.eval()
    return {"epochs": log, "best_epoch": best_epoch, "best_valid_MRR": best,
            "train_seconds": time.perf_counter() - t0 - aside}
