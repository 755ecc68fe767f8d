"""GRU4Rec (Hidasi et al., 2016) as a second ID backbone, trained like SASRec (cross-entropy over all items).

Histories arrive left-padded; the GRU must never read the padding (a zero input still moves its
state), so each batch is right-aligned and packed, and the outputs are put back in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from eval.registry import register_model

from .seqrec import SequentialRecommender


@dataclass
class GRU4RecConfig:
    num_items: int
    hidden: int = 64         # item-embedding size (what SLMRec and fusion read)
    gru_hidden: int = 128
    layers: int = 1
    max_len: int = 50
    dropout: float = 0.3


def _shift(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Roll each row b of x [B, L, ...] left by offset[b] positions."""
    L = x.shape[1]
    idx = (torch.arange(L, device=x.device)[None] + offset[:, None]) % L
    return x.gather(1, idx.view(*idx.shape, *[1] * (x.dim() - 2)).expand_as(x))


@register_model
class GRU4Rec(SequentialRecommender):
    model_type = "gru4rec"
    config_class = GRU4RecConfig

    def __init__(self, cfg: GRU4RecConfig):
        super().__init__(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.hidden, cfg.gru_hidden, num_layers=cfg.layers, batch_first=True,
                          dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.out = nn.Linear(cfg.gru_hidden, cfg.hidden)
        self._init_item_table()

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        h = histories[:, -self.config.max_len:]
        L = h.shape[1]
        lengths = (h > 0).sum(1).clamp(min=1)  # an empty history reads one padding item
        pad = L - lengths
        x = self.drop(self.item_emb(_shift(h, pad)))  # real items first
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        y, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=L)
        return self.out(_shift(y, L - pad))  # back to left-padded positions
