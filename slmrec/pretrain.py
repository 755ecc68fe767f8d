"""The `slmrec pretrain` stage: train an ID backbone (SASRec, GRU4Rec) and export its item embeddings."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from eval.dataset import load_dataset
from eval.errors import InputError
from eval.evaluate import evaluate, protocol_label, protocols_of
from eval.io import atomic_dir, is_up_to_date, manifest, read_json, write_json

from .gru4rec import GRU4Rec
from .sasrec import SASRec
from .seqrec import SequentialRecommender
from .trainer import TrainConfig, fit


BACKBONES: dict[str, type[SequentialRecommender]] = {"sasrec": SASRec, "gru4rec": GRU4Rec}


@dataclass
class PretrainConfig:
    model: str = "sasrec"         # sasrec | gru4rec
    hidden: int = 64              # item-embedding size
    layers: int = 2
    heads: int = 2                # SASRec only
    gru_hidden: int = 128         # GRU4Rec only
    dropout: float = 0.2
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def build_backbone(cfg: PretrainConfig, num_items: int) -> SequentialRecommender:
    """A freshly initialised backbone; each takes the settings its config has and ignores the rest."""
    if cfg.model not in BACKBONES:
        raise InputError(f"model: unknown backbone {cfg.model!r} (known: {', '.join(sorted(BACKBONES))})")
    cls = BACKBONES[cfg.model]
    names = {f.name for f in fields(cls.config_class)}
    settings = {k: v for k, v in asdict(cfg).items() if k in names}
    return cls(cls.config_class(num_items=num_items, max_len=cfg.train.max_len, **settings))


def test_metrics(model, ds, max_len: int) -> dict[str, dict]:
    """Test metrics under every candidate protocol the data set has."""
    return {protocol_label(p): evaluate(model, ds, "test", p, max_len=max_len) for p in protocols_of(ds)}


def pretrain(data_dir: str | Path, out_dir: str | Path, cfg: PretrainConfig, force: bool = False) -> dict:
    """Train the backbone unless `out_dir` is already up to date; return its test metrics."""
    out_dir = Path(out_dir)
    ds = load_dataset(data_dir)
    inputs = {"data": ds.fingerprint}
    if not force and is_up_to_date(out_dir, inputs, cfg.to_dict()):
        return read_json(out_dir / "metrics.json")
    torch.manual_seed(cfg.train.seed)  # the initial weights too: same data and seed, same model
    model = build_backbone(cfg, ds.num_items)
    log = fit(model, ds, cfg.train, desc=type(model).__name__)
    metrics = test_metrics(model, ds, cfg.train.max_len)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        write_json(tmp / "train_log.json", log)
        write_json(tmp / "metrics.json", metrics)
        params = sum(p.numel() for p in model.parameters())
        write_json(tmp / "manifest.json", manifest(
            "pretrain", inputs=inputs, config=cfg.to_dict(), seed=cfg.train.seed,
            counts={"parameters": params, "best_epoch": log["best_epoch"],
                    "train_seconds": round(log["train_seconds"], 1)}))
    return metrics
