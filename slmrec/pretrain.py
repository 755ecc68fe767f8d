"""The ID-backbone stage (`slmrec pretrain`): train SASRec or GRU4Rec and export its item embeddings."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from eval.config import setting
from eval.dataset import SeqDataset, load_dataset
from eval.errors import InputError
from eval.evaluate import evaluate, protocol_label, protocols_of
from eval.io import METRICS_FILE, TRAIN_LOG, write_json
from eval.registry import MODELS

from .seqrec import SequentialRecommender
from .trainer import ResumableStage, TrainConfig, fit, on_device


@dataclass(frozen=True)
class PretrainConfig:
    model: str = setting("sasrec", "ID backbone: a registered sequential model (sasrec, gru4rec).")
    hidden: int = setting(64, "Item-embedding size (what SLMRec and fusion read).")
    layers: int | None = setting(None, "Layers (none: the backbone's own default).")
    heads: int | None = setting(None, "Attention heads (SASRec; none: its default).")
    gru_hidden: int | None = setting(None, "GRU state size (GRU4Rec; none: its default).")
    dropout: float | None = setting(None, "Dropout (none: the backbone's own default).")
    block: str | None = setting(None, "SASRec block: pre-ln (the default) or sasrec (the original "
                                      "implementation's residuals and ReLU).")
    positions: str | None = setting(None, "SASRec positions: from-latest (the default) or from-first (SASRec+'s, "
                                          "counted from the window's first item).")
    init_std: float | None = setting(None, "SASRec initialisation: > 0 draws every weight from N(0, init_std) "
                                           "(SASRec+'s 0.02); none or 0: scaled init.")
    qkv_init: str | None = setting(None, "SASRec q/k/v initialisation: same (as the other weights; the default) or "
                                         "xavier (SASRec+'s, nn.MultiheadAttention's).")
    attn_out_dropout: bool | None = setting(None, "SASRec dropout on the attention's output as well as its weights "
                                                  "(the default); false: on its weights only, as SASRec+.")
    train: TrainConfig = setting(factory=TrainConfig)


def backbone_names() -> list[str]:
    """Every registered ID backbone: a `SequentialRecommender` subclass decorated with `@register_model`."""
    return sorted(k for k, c in MODELS.items() if issubclass(c, SequentialRecommender))


def build_backbone(cfg: PretrainConfig, num_items: int) -> SequentialRecommender:
    """A freshly initialised backbone from the settings its config has; unset ones keep its defaults."""
    if cfg.model not in backbone_names():
        raise InputError(f"model: unknown backbone {cfg.model!r} (known: {', '.join(backbone_names())})")
    cls = MODELS[cfg.model]
    names = {f.name for f in fields(cls.config_class)}
    settings = {k: v for k, v in asdict(cfg).items() if k in names and v is not None}
    return cls(cls.config_class(num_items=num_items, max_len=cfg.train.max_len, **settings))


def test_metrics(model, ds: SeqDataset, max_len: int, batch_size: int = 256) -> dict[str, dict]:
    """Test metrics under every candidate protocol the data set has."""
    return {protocol_label(p): evaluate(on_device(model), ds, "test", p, max_len=max_len, batch_size=batch_size)
            for p in protocols_of(ds)}


class BackboneStage(ResumableStage):
    """Train an ID backbone (cross-entropy over all items) and export its item embeddings for SLMRec;
    writes RUN/<model> (RUN/sasrec by default). The pipeline trains SASRec, whose item table SLMRec
    reads, and every other registered backbone a preset names by a table of its own ([gru4rec], ...).
    Resumable (a checkpoint per validated epoch) and data parallel under torchrun (`slmrec.trainer`)."""

    name = "sasrec"
    config_class = PretrainConfig

    def default_folder(self) -> str:
        return self.config.model

    def inputs(self) -> dict[str, Path]:
        return {"data": self.data_dir}

    def build(self, out: Path) -> dict:
        cfg = self.config
        ds = load_dataset(self.data_dir)
        torch.manual_seed(cfg.train.seed)  # the initial weights too: same data and seed, same model
        model = build_backbone(cfg, ds.num_items)
        log = fit(model, ds, cfg.train, desc=type(model).__name__, checkpoint=self.checkpoints())
        model.save_pretrained(out)
        write_json(out / TRAIN_LOG, log)
        write_json(out / METRICS_FILE, test_metrics(model, ds, cfg.train.max_len))
        return {"parameters": sum(p.numel() for p in model.parameters()), "best_epoch": log["best_epoch"],
                "train_seconds": round(log["train_seconds"], 1)}
