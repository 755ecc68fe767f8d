"""The E4SRec-style LLM recommender that SLMRec distills (teacher and student are both this model).

    frozen item embeddings -> in_proj -> [prompt tokens | items] -> LLaMA decoder (LoRA)
    -> hidden state at each item position -> out_proj -> dot product with every item embedding

Layout of one sequence: the instruction prompt (identical for every user) comes first, then the
left-padded history. Padding therefore sits *between* prompt and items; it is masked out and the
position ids skip it, so a user's encoding is the same with any amount of padding, and the prompt
always occupies positions 0..P-1. That makes the prompt's keys/values the same for every user: they
are computed once per batch (batch size 1) and shared, in training (gradients flow through the
shared prefix) as in inference.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from eval.config import setting
from eval.errors import InputError
from eval.io import CONFIG, WEIGHTS
from eval.registry import load_state, model_config, read_weights, register_model
from eval.scoring import DotScorer
from prompts import template_path

from .fused_ce import linear_cross_entropy

if TYPE_CHECKING:
    from transformers import LlamaModel

DEFAULT_PROMPT = "slmrec_v1"
RANDOM_BASE_SEED = 0


@dataclass(frozen=True)
class LLMRecConfig:
    base: str | None = setting(None, "Base LLaMA-family model: HF folder or .gguf file (none: the embedded "
                                     "SmolLM2-135M).")
    llama: dict | None = setting(None, "LlamaConfig fields of a randomly initialised base (tests, benchmarks).",
                                 cli=False)
    layers: int | None = setting(None, "Decoder layers kept (none: all).")
    layer_stride: int = setting(1, "Keep base layers 0, s, 2s, ... instead of the first ones.")
    lora_r: int = setting(16, "LoRA rank.")
    lora_alpha: int = setting(32, "LoRA alpha.")
    lora_dropout: float = setting(0.05, "LoRA dropout.")
    lora_targets: list[str] = setting(help="Modules that get LoRA adapters.",
                                      factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    prompt: str = setting(DEFAULT_PROMPT, "Prompt template name in prompts/ or a file.")
    dtype: str = setting("float32", "dtype of the frozen base (bfloat16 on GPU); adapters and heads stay float32.")
    # the adapters' and projections' initial weights: drawn from torch's generator when the model is built
    # (seeded by the trainer's train.seed), kept so a checkpoint reloads bit-identically
    seed: int | None = setting(None, cli=False)
    # derived when the model is built (kept so a checkpoint reloads without a tokenizer or the data)
    prompt_ids: list[int] | None = setting(None, cli=False)
    aux_heads: list[int] = setting(factory=list, cli=False)  # layers with an extra supervision head
    num_items: int = setting(0, cli=False)
    item_dim: int = setting(0, cli=False)


def layer_ids(total: int, keep: int | None, stride: int) -> list[int]:
    """Which base layers a model keeps: the first `keep`, or every `stride`-th."""
    keep = keep or total // stride
    ids = list(range(0, keep * stride, stride))
    if stride < 1 or keep < 1 or ids[-1] >= total:
        raise InputError(f"cannot keep {keep} layers with stride {stride} from a {total}-layer base model")
    return ids


def _base_location(cfg: LLMRecConfig) -> tuple[Path, dict]:
    from eval.assets import smollm2_path

    path = Path(cfg.base) if cfg.base else smollm2_path()
    if not path.exists():
        raise InputError(f"{path}: base model not found")
    if path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}
    return path, {}


def load_decoder(cfg: LLMRecConfig) -> LlamaModel:
    """The base decoder with only the kept layers (renumbered so the KV cache indexes them)."""
    from transformers import LlamaConfig, LlamaModel
    from transformers.utils import logging as hf_logging

    if cfg.llama is not None:
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_BASE_SEED)  # a random base is a fixed function of its config, as a
            model = LlamaModel(LlamaConfig(**cfg.llama))  # pre-trained one is: the same for teacher and student
    else:
        folder, kw = _base_location(cfg)
        total = LlamaConfig.from_pretrained(folder, **kw).num_hidden_layers
        ids = layer_ids(total, cfg.layers, cfg.layer_stride)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the unused deeper layers are expected, not worth a warning
        try:
            model = LlamaModel.from_pretrained(folder, num_hidden_layers=ids[-1] + 1,
                                               dtype=getattr(torch, cfg.dtype), **kw)
        finally:
            hf_logging.set_verbosity(verbosity)
    ids = layer_ids(model.config.num_hidden_layers, cfg.layers, cfg.layer_stride)
    model.layers = nn.ModuleList(model.layers[i] for i in ids)
    for new, layer in enumerate(model.layers):
        layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(ids)
    return model.to(getattr(torch, cfg.dtype))


def prompt_ids(cfg: LLMRecConfig, vocab_size: int) -> list[int]:
    """Token ids of the instruction prompt (bytes modulo the vocabulary for a tokenizer-less random base)."""
    text = template_path(cfg.prompt).read_text()
    if cfg.llama is not None:
        return [b % vocab_size for b in text.encode()]
    from transformers import AutoTokenizer

    folder, kw = _base_location(cfg)
    return AutoTokenizer.from_pretrained(folder, **kw)(text).input_ids


@register_model
class LLMRec(DotScorer, nn.Module):
    """Teacher or student: user vectors from an LLM over projected item embeddings."""

    model_type = "slmrec-llm"

    def __init__(self, cfg: LLMRecConfig, item_embeddings: torch.Tensor):
        from peft import LoraConfig, get_peft_model

        super().__init__()
        if cfg.seed is None:  # from the caller's seeded generator: train.seed reaches the initial weights
            cfg = replace(cfg, seed=int(torch.randint(0, 2**31 - 1, ()).item()))
        if not cfg.num_items and not cfg.item_dim:
            cfg = replace(cfg, num_items=item_embeddings.shape[0] - 1, item_dim=item_embeddings.shape[1])
        if item_embeddings.shape != (cfg.num_items + 1, cfg.item_dim):
            raise InputError(f"item embeddings have shape {list(item_embeddings.shape)}, "
                             f"expected [{cfg.num_items + 1}, {cfg.item_dim}]")
        decoder = load_decoder(cfg)
        if cfg.prompt_ids is None:
            cfg = replace(cfg, prompt_ids=prompt_ids(cfg, decoder.config.vocab_size))
        self.config = cfg
        hidden = decoder.config.hidden_size
        bad = [k for k in cfg.aux_heads if not 1 <= k < decoder.config.num_hidden_layers]
        if bad:
            raise InputError(f"aux heads {bad} are not intermediate layers of a "
                             f"{decoder.config.num_hidden_layers}-layer model")
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=list(cfg.lora_targets))
            self.decoder = get_peft_model(decoder, lora)
            self.in_proj = nn.Linear(cfg.item_dim, hidden)
            self.out_proj = nn.Linear(hidden, cfg.item_dim)
            self.aux = nn.ModuleDict({str(k): nn.Linear(hidden, cfg.item_dim) for k in cfg.aux_heads})
        self.register_buffer("item_emb", item_embeddings.detach().float().clone())
        self.register_buffer("prompt", torch.tensor(cfg.prompt_ids, dtype=torch.long), persistent=False)

    @property
    def num_layers(self) -> int:
        return self.decoder.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.decoder.config.hidden_size

    def hidden_states(self, histories: torch.Tensor, prefix_cache: bool = True) -> tuple[torch.Tensor, ...]:
        """Hidden states at the item positions [B, L, H]: index 0 = input, k = after layer k (last normed).

        An empty history keeps its last (padding) slot, so every user has a last real position."""
        B = histories.shape[0]
        P = len(self.prompt)
        real = histories > 0
        real[:, -1] = True
        dtype = self.decoder.dtype
        x = self.in_proj(self.item_emb[histories]).to(dtype)
        prompt = self.decoder.get_input_embeddings()(self.prompt)[None]
        positions = P - 1 + real.long().cumsum(1)   # items continue right after the prompt, padding skipped
        mask = torch.cat([real.new_ones(B, P), real], dim=1).long()
        if prefix_cache:
            cache = self.decoder(inputs_embeds=prompt, use_cache=True).past_key_values
            cache.batch_repeat_interleave(B)
            out = self.decoder(inputs_embeds=x, attention_mask=mask, position_ids=positions,
                               past_key_values=cache, use_cache=True, output_hidden_states=True)
            return tuple(h.float() for h in out.hidden_states)
        full_pos = torch.cat([torch.arange(P, device=x.device).expand(B, P), positions], dim=1)
        out = self.decoder(inputs_embeds=torch.cat([prompt.expand(B, -1, -1), x], dim=1), attention_mask=mask,
                           position_ids=full_pos, use_cache=False, output_hidden_states=True)
        return tuple(h[:, P:].float() for h in out.hidden_states)

    def logits(self, hidden: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """Scores over all items (padding column at -inf) from hidden states [..., H]."""
        scores = (head or self.out_proj)(hidden) @ self.item_emb.T
        return scores.index_fill(-1, torch.tensor([0], device=scores.device), float("-inf"))

    def item_loss(self, hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """Cross-entropy over all items at every position with a target (targets 0 are ignored).

        targets [B, L] trains every prefix (SASRec-style); targets [B] trains the last position only
        (E4SRec's original objective)."""
        if targets.dim() == 1:
            hidden = hidden[:, -1]
        else:
            keep = targets > 0
            hidden, targets = hidden[keep], targets[keep]
        return linear_cross_entropy((head or self.out_proj)(hidden), self.item_emb, targets, skip_first=True)

    def forward(self, histories: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.item_loss(self.hidden_states(histories)[-1], targets)}

    # --- the Scorer interface of eval.evaluate, and what fusion needs ---

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        """User vectors after every position [B, L, item_dim], as every sequential model gives them
        (`SequentialRecommender.encode`): what joint fusion trains on."""
        return self.out_proj(self.hidden_states(histories)[-1])

    def user_vectors(self, users: torch.Tensor, histories: torch.Tensor, prefix_cache: bool = True) -> torch.Tensor:
        """[B, item_dim]: the projected last hidden state; score = user_vector . item_vector."""
        return self.out_proj(self.hidden_states(histories, prefix_cache)[-1][:, -1])

    def item_vectors(self) -> torch.Tensor:
        """The frozen item table [num_items + 1, item_dim] scores are computed against (row 0 = padding)."""
        return self.item_emb

    # --- checkpoints ---

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: trainable tensors and the item table (the base is referenced by path)."""
        return checkpoint_state(self)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG).write_text(json.dumps({"model_type": self.model_type, **asdict(self.config)}, indent=2))
        save_file(self.checkpoint_state(), path / WEIGHTS)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LLMRec":
        cfg = model_config(path, LLMRecConfig, cls.model_type)
        state = read_weights(Path(path) / WEIGHTS)
        if "item_emb" not in state:
            raise InputError(f"{Path(path) / WEIGHTS}: no item_emb tensor")
        model = cls(cfg, state["item_emb"])
        load_state(model, state, Path(path) / WEIGHTS, required=set(checkpoint_state(model)))
        return model.eval()


def checkpoint_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and persistent buffers of any module built from LLMRecs (teacher, student, both)."""
    keep = {n for n, p in module.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in module.named_buffers()}
    return {k: v.detach().contiguous() for k, v in module.state_dict().items() if k in keep}
