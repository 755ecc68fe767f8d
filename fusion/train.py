"""`fusion train`: fit a fused model on top of a trained backbone and the text vectors of a run."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from eval.dataset import SeqDataset, load_dataset, pad_left
from eval.errors import InputError
from eval.io import atomic_dir, is_up_to_date, manifest, read_json, write_json
from slmrec.pretrain import test_metrics
from slmrec.trainer import TrainConfig, fit

from .groups import user_length_groups
from .model import FusedRecommender, FusionConfig, vectors_to_tensors
from .registry import load_model, max_len_of
from .vectors import TextVectors


@dataclass
class FuseConfig:
    mode: str = "hybrid"              # hybrid | text
    backbone: str = "sasrec"          # backbone folder inside the run (hybrid only)
    freeze_backbone: bool = True
    hidden: int = 64                  # text-only model size
    user_group: int | None = None     # train and select on one of 5 history-length groups only
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, patience=10, lr=1e-3,
                                                                   weight_decay=1e-4))

    def to_dict(self) -> dict:
        return asdict(self)


def fusion_examples(ds: SeqDataset, max_len: int, users: np.ndarray | None = None
                    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """One example per user: the history a rationale saw, and the item right after it.

    Rationales are written from `rationale_history` (the training history minus its last item), so
    the target is never inside the rationale the model is given."""
    users = np.arange(ds.num_users) if users is None else np.asarray(users)
    users = np.array([u for u in users if len(ds.rationale_history(int(u))) > 0])
    hist = [ds.rationale_history(int(u)) for u in users]
    targets = torch.zeros(len(users), max_len, dtype=torch.long)
    targets[:, -1] = torch.as_tensor([ds.sequences[int(u)][-3] for u in users])
    return users, pad_left(hist, max_len), targets


def build(ds: SeqDataset, cfg: FuseConfig, vectors: TextVectors, run: Path) -> FusedRecommender:
    users, has_u = vectors_to_tensors(vectors.user_ids, vectors.user_vectors, ds.num_users, vectors.dim)
    items, has_i = vectors_to_tensors(vectors.item_ids, vectors.item_vectors, ds.num_items + 1, vectors.dim)
    backbone, id_dim, max_len = None, 0, cfg.train.max_len
    if cfg.mode == "hybrid":
        backbone = load_model(run / cfg.backbone)
        id_dim, max_len = backbone.item_vectors().shape[1], max_len_of(run / cfg.backbone)
    fc = FusionConfig(mode=cfg.mode, num_users=ds.num_users, num_items=ds.num_items, text_dim=vectors.dim,
                      id_dim=id_dim, hidden=cfg.hidden, max_len=max_len, freeze_backbone=cfg.freeze_backbone)
    return FusedRecommender(fc, users, has_u, items, has_i, backbone)


def train_fused(run: str | Path, name: str, cfg: FuseConfig, vectors: TextVectors, force: bool = False) -> dict:
    """Train `RUN/fusion/NAME` unless it is up to date; return its test metrics."""
    run = Path(run)
    out = run / "fusion" / name
    ds = load_dataset(run / "data")
    inputs = {"data": ds.fingerprint, "vectors": vectors.fingerprint}
    if cfg.mode == "hybrid":
        if not (run / cfg.backbone / "manifest.json").exists():
            raise InputError(f"{run / cfg.backbone}: backbone not trained yet")
        inputs["backbone"] = read_json(run / cfg.backbone / "manifest.json")["created"]
    if not force and is_up_to_date(out, inputs, cfg.to_dict()):
        return read_json(out / "metrics.json")
    torch.manual_seed(cfg.train.seed)  # the new heads' initial weights are part of the seeded run
    model = build(ds, cfg, vectors, run)
    tc = TrainConfig(**{**cfg.train.to_dict(), "max_len": model.config.max_len})
    group = None if cfg.user_group is None else user_length_groups(ds)[cfg.user_group]
    log = fit(model, ds, tc, desc=f"fusion {name}", examples=fusion_examples(ds, tc.max_len, group),
              valid_users=group)
    metrics = test_metrics(model, ds, tc.max_len)
    with atomic_dir(out) as tmp:
        if model.backbone is not None and cfg.freeze_backbone:
            model.config.backbone_path = os.path.relpath(run / cfg.backbone, out)
        model.save_pretrained(tmp)
        write_json(tmp / "train_log.json", log)
        write_json(tmp / "metrics.json", metrics)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        write_json(tmp / "manifest.json", manifest(
            "fusion-train", inputs=inputs, config=cfg.to_dict(), seed=tc.seed,
            counts={"parameters": sum(p.numel() for p in model.parameters()), "trainable_parameters": trainable,
                    "users_with_rationale": int(model.user_has.sum()), "items_with_text": int(model.item_has.sum()),
                    "best_epoch": log["best_epoch"], "train_seconds": round(log["train_seconds"], 1)}))
    return metrics
