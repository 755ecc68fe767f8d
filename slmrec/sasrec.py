"""SASRec (Kang & McAuley, 2018), trained with cross-entropy over all items ("SASRec+") by default
(`TrainConfig.loss` has the sampled alternatives).

Its item-embedding table is what SLMRec projects into the LLM. Histories are left-padded; positions
count back from the most recent item, or with `positions = "from-first"` forward from the window's first
item as SASRec+ (Klenitskiy & Vasilev, 2023) counts them: either way a user's encoding never depends on
how much padding the batch needed. `block = "sasrec"` is the original implementation's block (the
attention's residual is its normalised query; ReLU), which SASRec+ keeps, and `init_std = 0.02`
SASRec+'s initialisation. With `attn_out_dropout = False` and `qkv_init = "xavier"` the model is SASRec+'s
exactly: dropout on the attention weights only, and q/k/v keeping PyTorch's Xavier init (its
nn.MultiheadAttention's) whatever `init_std` draws for the other weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eval.errors import InputError
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
    block: str = "pre-ln"            # or "sasrec": the original implementation's residuals, ReLU
    positions: str = "from-latest"   # or "from-first"
    init_std: float = 0.0            # > 0: every weight N(0, init_std) (SASRec+'s 0.02); 0: scaled init
    qkv_init: str = "same"           # or "xavier": q/k/v Xavier-uniform as nn.MultiheadAttention's (SASRec+'s)
    attn_out_dropout: bool = True    # False: dropout on the attention weights only (the original's, SASRec+'s)

    def __post_init__(self):
        if self.init_std < 0:
            raise InputError(f"init_std: {self.init_std} (>= 0; 0 is the scaled init)")
        for name, known in (("block", ("pre-ln", "sasrec")), ("positions", ("from-latest", "from-first")),
                            ("qkv_init", ("same", "xavier"))):
            if getattr(self, name) not in known:
                raise InputError(f"{name}: unknown {getattr(self, name)!r} (known: {', '.join(known)})")


class Block(nn.Module):
    """Self-attention + feed-forward. "pre-ln": x + f(LN(x)) for both (GELU). "sasrec", the original
    implementation's: the attention's residual is its normalised query and keys and values are not
    normalised; the feed-forward (ReLU) adds to its normalised input."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.heads, self.original = cfg.heads, cfg.block == "sasrec"
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.ffn = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU() if self.original else nn.GELU(),
                                 nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.hidden))
        self.drop = nn.Dropout(cfg.dropout)
        self.out_drop = self.drop if cfg.attn_out_dropout else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        normed = self.ln1(x)
        if self.original:  # the query from the normalised input, keys and values from the raw one
            w, b = self.qkv.weight, self.qkv.bias
            qkv = torch.cat([F.linear(normed, w[:D], b[:D]), F.linear(x, w[D:], b[D:])], dim=-1)
        else:
            qkv = self.qkv(normed)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.drop.p if self.training else 0.0)
        x = (normed if self.original else x) + self.out_drop(self.proj(att.transpose(1, 2).reshape(B, L, D)))
        if self.original:
            x = self.ln2(x)
            return x + self.drop(self.ffn(x))
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
        if cfg.init_std > 0:
            self.apply(self._init_original)
        if cfg.qkv_init == "xavier":  # nn.MultiheadAttention's: one [3D, D] matrix, zero bias
            for block in self.blocks:
                nn.init.xavier_uniform_(block.qkv.weight)
                nn.init.zeros_(block.qkv.bias)

    def _init_original(self, module: nn.Module) -> None:
        """The original implementation's: every weight N(0, init_std), biases and padding row zero."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def position_ids(self, real: torch.Tensor) -> torch.Tensor:
        """Each column's row of `pos_emb` for left-padded histories (`real` marks items); padding's is
        never read."""
        if self.config.positions == "from-first":  # 0 = the window's first item
            return (real.cumsum(1) - 1).clamp(min=0)
        L = real.shape[1]
        return torch.arange(L - 1, -1, -1, device=real.device).expand_as(real)  # 0 = the most recent

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        """Hidden state at every position [B, L, D] for left-padded histories [B, L]."""
        h = histories[:, -self.config.max_len:]
        B, L = h.shape
        real = h > 0
        x = self.item_emb(h) * self.config.hidden ** 0.5
        x = self.drop(x + self.pos_emb(self.position_ids(real))) * real[..., None]
        causal = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
        # attend to earlier real items; a padding row attends to itself only (never an empty row)
        allowed = (causal & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=h.device)
        # as an additive mask: the same scores, and CPU attention (inference) about twice as fast as with a bool one
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=h.device).masked_fill(~allowed, float("-inf"))
        for block in self.blocks:
            x = block(x, mask[:, None]) * real[..., None]
        return self.ln(x)
