"""SASRec (Kang & McAuley, 2018), trained with cross-entropy over all items ("SASRec+") by default
(`TrainConfig.loss` has the sampled alternatives).

Its item-embedding table is what SLMRec projects into the LLM. Histories are left-padded; positions
count back from the most recent item, so a user's encoding does not depend on how much padding the
batch needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eval.registry import register_model

from .seqrec import SequentialRecommender


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


@register_model
class SASRec(SequentialRecommender):
    model_type = "sasrec"
    config_class = SASRecConfig

    def __init__(self, cfg: SASRecConfig):
        super().__init__(cfg)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.hidden)
        self._init_item_table()

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
        allowed = (causal & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=h.device)
        # as an additive mask: the same scores, and CPU attention (inference) about twice as fast as with a bool one
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=h.device).masked_fill(~allowed, float("-inf"))
        for block in self.blocks:
            x = block(x, mask[:, None]) * real[..., None]
        return self.ln(x)
