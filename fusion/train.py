"""The fused-model stage (`fusion train`): a fused model on a trained backbone and the run's text vectors."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.config import check
from eval.dataset import SeqDataset, load_dataset, pad_left
from eval.evaluate import metrics_of, protocol_label, protocols_of, rank_users
from eval.io import METRICS_FILE, TRAIN_LOG, write_json
from eval.registry import load_model, max_len_of
from slmrec.trainer import ResumableStage, TrainConfig, fit, on_device

from .groups import RARE, item_groups, user_groups, user_length_groups
from .model import (DEFAULT_KIND, FusedConfig, FusedRecommender, HybridConfig, Shape, fused_kinds, fused_model,
                    vectors_to_tensors)
from .vectors import TextVectors, load_vectors


def fusion_examples(ds: SeqDataset, max_len: int, users: np.ndarray | None = None
                    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """One example per user: the history a rationale saw, and the item right after it.

    Rationales are written from `rationale_history` (the training history minus its last item), so
    the target is never inside the rationale the model is given."""
    users = np.arange(ds.num_users) if users is None else np.asarray(users)
    users = np.array([u for u in users if len(ds.rationale_history(int(u))) > 0])
    hist = [ds.rationale_history(int(u)) for u in users]
    targets = torch.zeros(len(users), max_len, dtype=torch.long)
    targets[:, -1] = torch.as_tensor([ds.history(int(u), "valid")[-1] for u in users])
    return users, pad_left(hist, max_len), targets


def trailing_positions(ds: SeqDataset, user: int, prefix: int) -> int:
    """How many trailing positions of a user's training row (the training history shifted by one) a
    rationale written from the first `prefix` items may inform: those whose prefix holds all of it, so
    it never saw the target it helps predict."""
    row = max(len(ds.history(user, "valid")) - 1, 0)
    return min(row, max(row - prefix + 1, 0))


def text_positions(ds: SeqDataset) -> torch.Tensor:
    """`trailing_positions` of each user's end rationale (written from `SeqDataset.rationale_history`)."""
    return torch.tensor([trailing_positions(ds, u, len(ds.rationale_history(u))) for u in range(ds.num_users)],
                        dtype=torch.long)


def cut_tables(ds: SeqDataset, vectors: TextVectors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rationales at earlier cut points as `FusedRecommender.set_cuts` takes them: their vectors,
    and per user the row of each cut (ascending prefix) and the trailing positions it may inform."""
    rows: dict[int, list[int]] = {}
    for r in np.lexsort((vectors.cut_prefixes, vectors.cut_ids)):
        rows.setdefault(int(vectors.cut_ids[r]), []).append(int(r))
    slots = max(map(len, rows.values()), default=0)
    index = torch.zeros(ds.num_users, slots, dtype=torch.long)
    positions = torch.zeros(ds.num_users, slots, dtype=torch.long)
    for u, rs in rows.items():
        index[u, :len(rs)] = torch.tensor(rs)
        positions[u, :len(rs)] = torch.tensor([trailing_positions(ds, u, int(vectors.cut_prefixes[r])) for r in rs])
    return torch.as_tensor(vectors.cut_vectors).reshape(-1, vectors.dim), index, positions


def build(ds: SeqDataset, cfg: FusedConfig, vectors: TextVectors, backbone_dir: Path | None,
          out: Path) -> FusedRecommender:
    """A fresh fused model of the kind `cfg.mode` names; a backbone is referenced from `out` by relative
    path (a trained one is saved inside the model too)."""
    users, has_u = vectors_to_tensors(vectors.user_ids, vectors.user_vectors, ds.num_users, vectors.dim)
    items, has_i = vectors_to_tensors(vectors.item_ids, vectors.item_vectors, ds.num_items + 1, vectors.dim)
    shape, backbone = Shape(ds.num_users, ds.num_items, vectors.dim, max_len=cfg.train.max_len), None
    if backbone_dir is not None:
        backbone = load_model(backbone_dir)
        shape = replace(shape, id_dim=backbone.item_vectors().shape[1], max_len=max_len_of(backbone_dir),
                        backbone_path=os.path.relpath(backbone_dir, out))
    model = fused_model(cfg.mode)(cfg, shape, users, has_u, items, has_i, backbone,
                                  item_pop=torch.as_tensor(ds.item_popularity, dtype=torch.float32))
    model.text_positions.copy_(text_positions(ds))
    model.set_cuts(*cut_tables(ds, vectors))
    return model


def train_seed(ds: SeqDataset, cfg: FusedConfig, run: Path, out: Path, seed: int, desc: str = "fusion",
               checkpoints: Path | None = None) -> tuple[FusedRecommender, dict, TrainConfig]:
    """A fused model on `run`'s backbone and vectors, trained with `seed` (its new heads' initial weights
    and the data order); `out` is where it will live (a frozen backbone is referenced from there);
    `checkpoints`: a folder for the seed's resumable checkpoint (`slmrec.trainer.fit`)."""
    torch.manual_seed(seed)  # the new heads' initial weights are part of the seeded run
    model = build(ds, cfg, load_vectors(run / cfg.vectors), cfg.backbone_dir(run), out)
    tc = replace(cfg.train, max_len=model.shape.max_len, seed=seed)
    group = None if cfg.user_group is None else user_length_groups(ds)[cfg.user_group]
    examples = None if model.every_position else fusion_examples(ds, tc.max_len, group)
    log = fit(model, ds, tc, desc=f"{desc} seed {seed}", examples=examples, valid_users=group,
              checkpoint=None if checkpoints is None else checkpoints / f"seed-{seed}")
    return model, log, tc


GROUP_KEY = f"{protocol_label('full')}, "  # seeds.json: "<protocol>, <group>" entries beside the protocols


SEEDS = "seeds.json"  # every seed's test metrics with their mean and std
SEED_RANKS = "seed_ranks.npz"  # per protocol, every seed's per-user test ranks [seeds, users]


def seed_metrics(model: FusedRecommender, ds: SeqDataset, max_len: int) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Test metrics under every protocol, and under full ranking those of the sparsest user group, tail
    items and rare items (the groups the fused models' claims are about, so their spread over seeds is
    known too), keyed GROUP_KEY + group; and the per-user ranks by protocol (the report's seed-aware
    tests read them). One ranking per protocol."""
    sparsest, users = next(iter(user_groups(ds).items()))
    items = item_groups(ds)
    groups = {sparsest: users, "tail": items["tail"], f"seen <= {RARE}": items[f"seen <= {RARE}"]}
    metrics, ranks = {}, {}
    for protocol in protocols_of(ds):
        ranking = rank_users(on_device(model), ds, "test", protocol, max_len=max_len)
        ranks[protocol] = ranking.ranks
        metrics[protocol_label(protocol)] = metrics_of(ranking)
        if protocol == "full":
            metrics.update({GROUP_KEY + name: metrics_of(ranking, ranking.rows(g)) for name, g in groups.items()})
    return metrics, ranks


def seed_summary(runs: list[dict[str, dict]]) -> dict:
    """Every seed's test metrics with their mean and (sample) std, per protocol and metric."""
    summary: dict = {"seeds": len(runs), "runs": runs, "mean": {}, "std": {}}
    for protocol in runs[0]:
        for metric in runs[0][protocol]:
            vals = np.array([r[protocol][metric] for r in runs], dtype=float)
            summary["mean"].setdefault(protocol, {})[metric] = float(vals.mean())
            summary["std"].setdefault(protocol, {})[metric] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    return summary


class FusionStage(ResumableStage):
    """A fused model of any registered kind (SLIM's hybrid of rationale and item-text vectors with an ID
    backbone, text matching alone, ...); writes RUN/fusion/<name> (one stage per fusion.<name> table of
    the preset, whose `mode` names the kind). Each seed's training is resumable and data parallel under
    torchrun (`slmrec.trainer`)."""

    name = "fusion"
    config_class = HybridConfig  # the default kind's; `config_class_of` gives each table's

    @classmethod
    def config_classes(cls) -> list[type]:
        return [kind.config_class for kind in fused_kinds().values()]

    @classmethod
    def config_class_of(cls, settings: Any, where: str) -> type:
        mode = settings.get("mode", DEFAULT_KIND) if isinstance(settings, dict) else DEFAULT_KIND
        return fused_model(check(mode, str, f"{where}.mode"), f"{where}.mode").config_class

    @property
    def backbone_dir(self) -> Path | None:
        return self.config.backbone_dir(self.run)

    def inputs(self) -> dict[str, Path]:
        files = {"data": self.data_dir, "vectors": self.run / self.config.vectors}
        if self.backbone_dir is not None:
            files["backbone"] = self.backbone_dir
        return files

    def build(self, out: Path) -> dict:
        cfg = self.config
        ds = load_dataset(self.data_dir)
        work = self.checkpoints()
        model, log, tc = train_seed(ds, cfg, self.run, self.out, cfg.train.seed, f"fusion {self.folder}", work)
        model.save_pretrained(out)
        write_json(out / TRAIN_LOG, log)
        results = [seed_metrics(model, ds, tc.max_len)]
        write_json(out / METRICS_FILE, {k: v for k, v in results[0][0].items() if not k.startswith(GROUP_KEY)})
        results += [seed_metrics(train_seed(ds, cfg, self.run, self.out, cfg.train.seed + k, f"fusion {self.folder}",
                                            work)[0], ds, tc.max_len) for k in range(1, cfg.seeds)]
        write_json(out / SEEDS, seed_summary([m for m, _ in results]))
        np.savez_compressed(out / SEED_RANKS, **{p: np.stack([r[p] for _, r in results]).astype(np.int32)
                                                 for p in results[0][1]})
        return {"parameters": sum(p.numel() for p in model.parameters()),
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "users_with_rationale": int(model.user_has.sum()), "items_with_text": int(model.item_has.sum()),
                "cut_rationales": len(model.cut_text),
                "best_epoch": log["best_epoch"], "train_seconds": round(log["train_seconds"], 1)}
