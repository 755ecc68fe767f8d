"""SASRec (Kang & McAuley, 2018) trained with cross-entropy over all items ("SASRec+").

Its item-embedding table is what SLMRec projects into the LLM. Histories are left-padded; positions
count back from the most recent item, so a user's encoding does not depend on how much padding the
batch needed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from eval.errors import InputError
from eval.scoring import dot_scores

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ITEM_EMBEDDINGS = "item_embeddings.safetensors"


@dataclass
class SASRecConfig:
    num_items: int
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.2


class Block(nn.Module):
    """Pre-norm self-attention + feed-forward block."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.ffn = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.hidden, cfg.hidden))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.drop.p if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(B, L, D)))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.config = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.hidden)
        nn.init.normal_(self.item_emb.weight, std=cfg.hidden ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        """Hidden state at every position [B, L, D] for left-padded histories [B, L]."""
        h = histories[:, -self.config.max_len:]
        B, L = h.shape
        real = h > 0
        x = self.item_emb(h) * self.config.hidden ** 0.5
        pos = torch.arange(L - 1, -1, -1, device=h.device)  # 0 = most recent position
        x = self.drop(x + self.pos_emb(pos)) * real[..., None]
        causal = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
        # attend to earlier real items; a padding row attends to itself only (never an empty row)
        mask = (causal & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=h.device)
        for block in self.blocks:
            x = block(x, mask[:, None]) * real[..., None]
        return self.ln(x)

    def user_vectors(self, users: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        return self.encode(histories)[:, -1]

    def item_vectors(self) -> torch.Tensor:
        return self.item_emb.weight

    def score(self, users: torch.Tensor, histories: torch.Tensor,
              candidates: torch.Tensor | None) -> torch.Tensor:
        return dot_scores(self.user_vectors(users, histories), self.item_vectors(), candidates)

    def training_loss(self, users: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over all items at every real position (targets 0 are ignored)."""
        h = self.encode(inputs)
        targets = targets[:, -h.shape[1]:]
        keep = targets > 0
        logits = h[keep] @ self.item_emb.weight.T
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, targets[keep])

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG).write_text(json.dumps({"model_type": "sasrec", **asdict(self.config)}, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / WEIGHTS)
        save_file({"item_embeddings": self.item_emb.weight.detach().contiguous()}, path / ITEM_EMBEDDINGS)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SASRec":
        path = Path(path)
        if not (path / CONFIG).exists():
            raise InputError(f"{path}: no {CONFIG}; not a SASRec checkpoint")
        raw = json.loads((path / CONFIG).read_text())
        if raw.pop("model_type", None) != "sasrec":
            raise InputError(f"{path / CONFIG}: model_type is not 'sasrec'")
        model = cls(SASRecConfig(**raw))
        model.load_state_dict(load_file(path / WEIGHTS))
        return model.eval()


def load_item_embeddings(path: str | Path) -> torch.Tensor:
    """The exported item table [num_items + 1, d] (row 0 = padding) from a SASRec folder or file."""
    path = Path(path)
    file = path / ITEM_EMBEDDINGS if path.is_dir() else path
    if not file.exists():
        raise InputError(f"{file}: item embeddings not found (run `slmrec pretrain` first)")
    return load_file(file)["item_embeddings"]
