"""What every ID-based sequential recommender shares: scoring, the loss, checkpoints.

A subclass sets `model_type` and `config_class`, implements `encode` (left-padded histories ->
one vector per position, in the item-embedding space) and joins the registry with
`@register_model`; everything else is here, so SASRec and GRU4Rec are trained, scored, saved and
exported the same way. Adding an ID backbone is one such module, imported in `slmrec/__init__.py`.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from eval.errors import InputError
from eval.io import CONFIG, WEIGHTS
from eval.registry import load_state, model_config, read_weights
from eval.scoring import DotScorer

from .fused_ce import linear_cross_entropy

ITEM_EMBEDDINGS = "item_embeddings.safetensors"


class SequentialRecommender(DotScorer, nn.Module):
    model_type: ClassVar[str]
    config_class: ClassVar[type]  # a dataclass with at least num_items and hidden (the item-embedding size)

    def __init__(self, cfg: Any):
        super().__init__()
        self.config = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.hidden, padding_idx=0)  # row 0 = padding

    def _init_item_table(self) -> None:
        """Scaled normal init, padding row zero; called last in a subclass's __init__ (seeded order)."""
        nn.init.normal_(self.item_emb.weight, std=self.config.hidden ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        """Hidden state at every position [B, L, D] for left-padded histories [B, L]."""
        raise NotImplementedError

    def user_vectors(self, users: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        return self.encode(trim_padding(histories)[0])[:, -1]

    def item_vectors(self) -> torch.Tensor:
        return self.item_emb.weight

    def training_loss(self, users: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                      loss: str = "ce", negatives: int = 256, gbce_t: float = 0.75) -> torch.Tensor:
        """Next-item loss at every real position (targets 0 are ignored); see `TrainConfig.loss`.

        "ce" scores every item (fused with the product, in chunks of positions); "sampled" and "gbce" score the target against `negatives` items drawn
        uniformly for each history (shared by its positions): one [B, L, N] product instead of [P, items]."""
        inputs, targets = trim_padding(inputs, targets)
        h = self.encode(inputs)
        targets = targets[:, -h.shape[1]:]
        keep = targets > 0
        table = self.item_emb.weight
        if loss == "ce":
            return linear_cross_entropy(h[keep], table, targets[keep], skip_first=True)
        drawn = torch.randint(1, len(table), (len(h), negatives), device=h.device)
        pos = (h * table[targets]).sum(-1)[keep]
        neg = torch.bmm(h, table[drawn].transpose(1, 2))
        hit = drawn[:, None, :] == targets[..., None]  # a drawn target is no negative
        neg = neg.masked_fill(hit, float("-inf"))[keep]
        if loss == "sampled":
            # uniform draws: the logQ correction is the same for every item and cancels in the softmax
            logits = torch.cat([pos[:, None], neg], dim=1)
            return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=h.device))
        if loss == "gbce":
            # gSASRec (Petrov & Macdonald, 2023): sigmoid(pos)^beta undoes the overconfidence that
            # sampling negatives at rate alpha teaches BCE; t = 0 is plain BCE, t = 1 full calibration
            alpha = negatives / (len(table) - 2)
            beta = alpha * (gbce_t * (1 - 1 / alpha) + 1 / alpha)
            return -(beta * F.logsigmoid(pos) + F.logsigmoid(-neg).sum(1)).mean()
        raise InputError(f"loss: unknown {loss!r} (known: ce, sampled, gbce)")

    def save_pretrained(self, path: str | Path) -> None:
        """config.json + weights, and the item table alone for SLMRec to project into its LLM."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG).write_text(json.dumps({"model_type": self.model_type, **asdict(self.config)}, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / WEIGHTS)
        save_file({"item_embeddings": self.item_emb.weight.detach().contiguous()}, path / ITEM_EMBEDDINGS)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SequentialRecommender":
        model = cls(model_config(path, cls.config_class, cls.model_type))
        load_state(model, read_weights(Path(path) / WEIGHTS), Path(path) / WEIGHTS)
        return model.eval()


def trim_padding(histories: torch.Tensor, *aligned: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the leading columns that are padding in every row (of `histories` and the tensors aligned
    with it). Positions never count the padding, so the model's output does not change; a
    batch of short histories then costs what its longest one needs, not max_len."""
    keep = max(1, int((histories > 0).sum(1).max()))  # left-padded: a row's items are its last columns
    return tuple(t[:, -keep:] for t in (histories, *aligned))


def load_item_embeddings(path: str | Path) -> torch.Tensor:
    """The exported item table [num_items + 1, d] (row 0 = padding) from a model folder or file."""
    path = Path(path)
    file = path / ITEM_EMBEDDINGS if path.is_dir() else path
    if not file.exists():
        raise InputError(f"{file}: item embeddings not found (run `slmrec pretrain` first)")
    table = read_weights(file)
    if "item_embeddings" not in table:
        raise InputError(f"{file}: no 'item_embeddings' tensor")
    return table["item_embeddings"]
