"""The training loop for ID-based sequence models (SASRec, GRU4Rec, fused models).

Next-item cross-entropy on each user's training history, validation MRR after every epoch for model
selection and early stopping, the best weights restored at the end. The LLM models use the HF
Trainer instead; these models are small enough that a plain loop is the clearest thing.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress

from eval.config import setting
from eval.dataset import SeqDataset, pad_left
from eval.evaluate import evaluate


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(200, "Most training epochs.")
    batch_size: int = setting(128, "Users per batch.")
    lr: float = setting(1e-3, "Learning rate (AdamW).")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    patience: int = setting(10, "Epochs without a better validation MRR before stopping.")
    select_protocol: str = setting("full", "Candidate protocol of the validation MRR used for model selection.")
    max_len: int = setting(50, "Most recent items a history keeps.")
    seed: int = setting(42, "Random seed (data order and initial weights).")


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


def fit(model: torch.nn.Module, ds: SeqDataset, cfg: TrainConfig, desc: str = "training",
        examples: Examples | None = None, valid_users: np.ndarray | None = None) -> dict:
    """Train in place; return the log (per-epoch loss and validation MRR, best epoch, seconds).

    `examples` (users, inputs, targets) default to every next-item pair of the training histories;
    `valid_users` restricts model selection to a subset (e.g. one user group)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    users, inputs, targets = examples if examples is not None else next_item_pairs(ds, cfg.max_len)
    users_t = torch.as_tensor(users)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()

    def valid_mrr() -> float:
        model.eval()
        return evaluate(model, ds, "valid", cfg.select_protocol, max_len=cfg.max_len, users=valid_users)["MRR"]

    # the starting point is a candidate too: a head fitted on top of a trained backbone must not
    # end up worse on validation than the backbone it started as
    best = valid_mrr()
    best_state, best_epoch, log = copy.deepcopy(model.state_dict()), 0, [{"epoch": 0, "valid_MRR": best}]
    with Progress(transient=True) as bar:
        task = bar.add_task(desc, total=cfg.epochs)
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            total, n = 0.0, 0
            for idx in torch.randperm(len(users), generator=gen).split(cfg.batch_size):
                loss = model.training_loss(users_t[idx], inputs[idx], targets[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + loss.item() * len(idx), n + len(idx)
            mrr = valid_mrr()
            log.append({"epoch": epoch, "loss": total / n, "valid_MRR": mrr})
            bar.update(task, advance=1, description=f"{desc} loss {total / n:.3f} valid MRR {mrr:.4f}")
            if mrr > best:
                best, best_epoch = mrr, epoch
                best_state = copy.deepcopy(model.state_dict())
            elif epoch - best_epoch >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return {"epochs": log, "best_epoch": best_epoch, "best_valid_MRR": best,
            "train_seconds": time.perf_counter() - t0}
