"""SLIM's fusion of rationale and item-text vectors with an ID-based recommender, and its
ID-agnostic text-matching variant.

hybrid: user = g_f([g_l(rationale_u); backbone_user(history)]), item = g_f([g_l(text_i); id_i])
text:   user = g_u(rationale_u), item = g_i(text_i)
A user without a rationale, or an item without text, gets a learned "missing" vector instead.
g_f starts as the identity on the ID half (frozen training begins from the backbone's own ranking);
jointly trained, it starts as the sum of both halves, so the text path is not stuck near zero.

Joint training (`joint`) learns the fused item side with the backbone's own objective, cross-entropy
over all items at every position of every training history. A rationale written from a prefix of the
history informs only the positions whose prefix contains all of it (`text_positions`: the last k
positions of a training row); with rationales at several cut points, each position reads the latest
one whose prefix it holds (`set_cuts`), and scoring reads the end one. Every earlier position gets the
"missing" vector, so no rationale ever sees the target of a position it informs. Item cold start
(`pop_gate`): an item's ID half mixes its own ID vector with those of the seen items its text is
closest to, by a learned gate on log(1 + training count), so an item seen rarely is placed by its
text. In training (`id_dropout`, DropoutNet), a random share of items, drawn afresh each step, is
scored without its own ID vector (zero), as the items seen at most RARE times then always are, so
that the text path (and the borrowed ID vectors) learn to rank items without it. At scoring
(`cold_ridge`), an item seen at most RARE times gets the item vector a ridge map from item text
predicts, fitted on the trained vectors of the items seen more than 2 * RARE times (a linear
attribute-to-feature map, Gantner et al., ICDM 2010): its own vector, trained almost only as a
negative, ranks it below hundreds of items whatever its text.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from eval.errors import InputError
from eval.io import CONFIG, WEIGHTS
from eval.registry import load_model, load_state, model_config, read_weights, register_model
from eval.scoring import CachedScorer, DotScorer

from .groups import RARE  # the cold-start gate is 0.5 at RARE training interactions

BACKBONE = "backbone"
TEXT_SIDES = ("both", "items", "users", "none")


@dataclass(frozen=True)
class FusionConfig:
    mode: str                    # "hybrid" | "text"
    num_users: int
    num_items: int
    text_dim: int
    id_dim: int = 0              # backbone vector size (hybrid only)
    hidden: int = 64             # output size of the text-only maps
    max_len: int = 50
    freeze_backbone: bool = True
    backbone_path: str = ""      # frozen backbone checkpoint, relative to this model's folder
    joint: bool = False          # trained over every position (else one example per user)
    text: str = "both"           # which text the hybrid reads: both, items, users, none
    pop_gate: bool = False       # item ID half scaled by a learned gate on log(1 + training count)
    cold_ridge: float = 0.0      # ridge penalty of the text -> item-vector map for rare items at scoring (0: off)
    id_dropout: float = 0.0      # training: share of items scored without their own ID vector (rare ones always)

    def __post_init__(self) -> None:
        if self.mode not in ("hybrid", "text"):
            raise InputError(f"fusion mode must be 'hybrid' or 'text', not {self.mode!r}")
        if self.text not in TEXT_SIDES:
            raise InputError(f"fusion text must be one of {', '.join(TEXT_SIDES)}, not {self.text!r}")


def text_neighbours(text: torch.Tensor, candidates: torch.Tensor, k: int = 10, temperature: float = 0.1,
                    chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's k nearest `candidates` by text cosine (never itself) and softmax(cos / t) weights."""
    unit = F.normalize(text, dim=-1)
    k = max(1, min(k, int(candidates.sum())))
    idx, weights = [], []
    for start in range(0, len(unit), chunk):
        sim = unit[start:start + chunk] @ unit.T
        sim[:, ~candidates] = float("-inf")
        rows = torch.arange(len(sim))
        sim[rows, rows + start] = float("-inf")
        top, i = sim.topk(k, dim=1)
        idx.append(i)
        weights.append(torch.softmax(top / temperature, dim=1).nan_to_num(0.0))
    return torch.cat(idx), torch.cat(weights)


@register_model
class FusedRecommender(DotScorer, nn.Module):
    model_type = "fusion"

    def __init__(self, cfg: FusionConfig, user_text: torch.Tensor, user_has: torch.Tensor,
                 item_text: torch.Tensor, item_has: torch.Tensor, backbone: nn.Module | None = None,
                 item_pop: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.register_buffer("user_text", user_text.float())
        self.register_buffer("user_has", user_has.bool())
        self.register_buffer("item_text", item_text.float())
        self.register_buffer("item_has", item_has.bool())
        # how many trailing positions of a user's training row the rationale may inform: set by the
        # training stage from the prefix each rationale saw; 0 (never) unless told
        self.register_buffer("text_positions", torch.zeros(cfg.num_users, dtype=torch.long), persistent=False)
        # the rationales at earlier cut points, read in training only (so never saved): see `set_cuts`
        self.register_buffer("cut_text", torch.zeros(0, cfg.text_dim), persistent=False)
        self.register_buffer("cut_index", torch.zeros(cfg.num_users, 0, dtype=torch.long), persistent=False)
        self.register_buffer("cut_positions", torch.zeros(cfg.num_users, 0, dtype=torch.long), persistent=False)
        self.missing_user = nn.Parameter(torch.zeros(cfg.text_dim))
        self.missing_item = nn.Parameter(torch.zeros(cfg.text_dim))
        self.backbone = backbone
        if cfg.mode == "hybrid":
            if backbone is None:
                raise InputError("hybrid fusion needs a backbone recommender")
            self.g_l = nn.Linear(cfg.text_dim, cfg.id_dim)
            self.g_f = nn.Linear(2 * cfg.id_dim, cfg.id_dim)
            with torch.no_grad():  # g_f starts as the sum of the ID half and, jointly trained, g_l's text half
                nn.init.normal_(self.g_f.weight, std=1e-3)
                self.g_f.weight[:, cfg.id_dim:] += torch.eye(cfg.id_dim)
                if cfg.joint:  # a 1e-3 text half stays near zero in the few epochs joint training takes
                    self.g_f.weight[:, :cfg.id_dim] += torch.eye(cfg.id_dim)
                self.g_f.bias.zero_()
            if cfg.pop_gate or cfg.cold_ridge or cfg.id_dropout:
                if item_pop is None:
                    raise InputError("pop_gate, cold_ridge and id_dropout need the items' training counts")
                self.register_buffer("item_pop", item_pop.float())
            if cfg.pop_gate:
                # gate = sigmoid(a * log(1 + count) + b): 0.5 at RARE training interactions, near 1 far above
                self.gate = nn.Parameter(torch.tensor([2.0, -2.0 * math.log1p(RARE)]))
                nbr, weight = text_neighbours(self.item_text, self.item_has & (self.item_pop > 0))
                self.register_buffer("neighbours", nbr, persistent=False)
                self.register_buffer("neighbour_weights", weight, persistent=False)
            if cfg.freeze_backbone:
                backbone.requires_grad_(False)
        else:
            self.g_user = nn.Linear(cfg.text_dim, cfg.hidden)
            self.g_item = nn.Linear(cfg.text_dim, cfg.hidden)
        # a frozen backbone's vectors never change: compute each user's once
        self.frozen = CachedScorer(backbone) if backbone is not None and cfg.freeze_backbone else None
        self._positions_cache: dict[tuple[int, bytes], torch.Tensor] = {}

    # --- text sides ---
    @property
    def reads_user_text(self) -> bool:
        return self.config.mode == "text" or self.config.text in ("both", "users")

    @property
    def reads_item_text(self) -> bool:
        return self.config.mode == "text" or self.config.text in ("both", "items")

    def _user_text(self, users: torch.Tensor) -> torch.Tensor:
        has = self.user_has[users, None] & self.reads_user_text
        return torch.where(has, self.user_text[users], self.missing_user)

    def _item_text(self) -> torch.Tensor:
        has = self.item_has[:, None] & self.reads_item_text
        return torch.where(has, self.item_text, self.missing_item)

    def user_vectors(self, users: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        text = self._user_text(users)
        if self.config.mode == "text":
            return self.g_user(text)
        return self.fuse(text, (self.frozen or self.backbone).user_vectors(users, histories))

    def fuse(self, text: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """g_f([g_l(text); ids]): also for users the model was not trained with (a new history).
        A model trained without user text reads its "missing" vector whatever text it is given."""
        if not self.reads_user_text:
            text = self.missing_user.expand(*ids.shape[:-1], -1)
        return self.g_f(torch.cat([self.g_l(text), ids], dim=-1))

    def id_gate(self, pop: torch.Tensor) -> torch.Tensor:
        """[num_items + 1] weight of each item's own ID vector given its training count `pop`: near 0 for
        items the backbone barely saw."""
        return torch.sigmoid(self.gate[0] * torch.log1p(pop) + self.gate[1])

    def item_vectors(self) -> torch.Tensor:
        if self.config.mode == "text":
            return self.g_item(self._item_text())
        ids = half = (self.frozen or self.backbone).item_vectors()
        pop = self.item_pop if self.config.pop_gate or self.config.id_dropout else None
        if self.config.id_dropout:  # scored without its own ID vector, gated as if seen at most RARE times
            only = self.text_only()
            half, pop = ids.masked_fill(only[:, None], 0.0), torch.where(only, pop.clamp(max=RARE), pop)
        if self.config.pop_gate:  # a rare item borrows the ID vectors of the seen items its text is closest to
            borrowed = (self.neighbour_weights[..., None] * ids[self.neighbours]).sum(1)
            gate = self.id_gate(pop)[:, None]
            half = gate * half + (1 - gate) * borrowed
        fused = self.g_f(torch.cat([self.g_l(self._item_text()), half], dim=-1))
        if self.training or not (self.config.cold_ridge and self.reads_item_text):
            return fused
        return self.text_mapped(fused)

    def text_only(self) -> torch.Tensor:
        """[num_items + 1] items scored without their own ID vector: those seen at most RARE times, and
        in training a fresh random `id_dropout` share of the others (DropoutNet, Volkovs et al.,
        NeurIPS 2017), so that the text path learns to rank items without the ID vectors it lacks for
        rare ones (with `pop_gate`, a dropped item is gated as a rare one: the ID vectors it borrows
        from its text neighbours carry it, and that path learns too)."""
        only = self.item_has & (self.item_pop <= RARE)
        if self.training:
            only |= self.item_has & (torch.rand(only.shape, device=only.device) < self.config.id_dropout)
        return only

    def text_mapped(self, items: torch.Tensor) -> torch.Tensor:
        """`items` with each item seen at most RARE times replaced by the vector a ridge map from its
        text predicts, fitted on the items seen more than 2 * RARE times (whose vectors are reliable)."""
        fit = self.item_has & (self.item_pop > 2 * RARE)
        cold = self.item_has & (self.item_pop <= RARE)
        if not fit.any() or not cold.any():
            return items
        return torch.where(cold[:, None], self._text_map(fit) @ items[fit].detach(), items)

    def _text_map(self, fit: torch.Tensor) -> torch.Tensor:
        """[num_items + 1, n_fit]: the ridge predictions are this @ the fitted items' vectors. It depends
        on the item texts and the ridge only, so it is solved once, not for every scored batch."""
        key = (self.config.cold_ridge, self.item_text._version, self.item_text.data_ptr())
        if getattr(self, "_map_key", None) != key:
            x = F.pad(self.item_text, (0, 1), value=1.0)  # text vector and an intercept
            gram = x[fit].T @ x[fit] + self.config.cold_ridge * torch.eye(x.shape[1], device=x.device)
            self._map, self._map_key = x @ torch.linalg.solve(gram, x[fit].T), key
        return self._map

    def _positions(self, users: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        """Backbone vectors at every position (any sequential model's `encode`); a frozen backbone's are
        computed once per (user, history)."""
        if not self.config.freeze_backbone:
            return self.backbone.encode(histories)
        keys = [(int(u), h.cpu().numpy().tobytes()) for u, h in zip(users, histories)]
        todo = [i for i, k in enumerate(keys) if k not in self._positions_cache]
        if todo:
            was = self.backbone.training
            self.backbone.eval()
            with torch.no_grad():
                vecs = self.backbone.encode(histories[todo]).float()
            self.backbone.train(was)
            self._positions_cache.update({keys[i]: v for i, v in zip(todo, vecs)})
        return torch.stack([self._positions_cache[k] for k in keys])

    def set_cuts(self, text: torch.Tensor, index: torch.Tensor, positions: torch.Tensor) -> None:
        """The rationales at earlier cut points for joint training: their vectors [N, text_dim], and per
        user the row of each of its cuts, earliest first [U, K], with how many trailing positions of
        its training row that cut may inform [U, K] (0 for an unused slot)."""
        self.cut_text, self.cut_index, self.cut_positions = text.float(), index.long(), positions.long()

    def position_user_vectors(self, users: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Fused user vectors after every position of training rows [B, L, D]: each position reads the
        latest rationale whose prefix it holds (the end one in the last `text_positions[u]` positions,
        earlier cuts before that), every earlier one the "missing" vector."""
        h = self._positions(users, inputs)
        back = torch.arange(h.shape[1] - 1, -1, -1, device=h.device)[None]  # positions before the row's end
        text = self.missing_user
        for k in range(self.cut_positions.shape[1]):  # earliest cut first: a later one overwrites it
            informed = back < self.cut_positions[users, k][:, None]
            text = torch.where(informed[..., None], self.cut_text[self.cut_index[users, k]][:, None], text)
        # the end prefix on: the end rationale, or "missing" without one, as scoring reads it
        informed = back < self.text_positions[users][:, None]
        return self.fuse(torch.where(informed[..., None], self._user_text(users)[:, None], text), h)

    def training_loss(self, users: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over all items: at every real position (joint), or for the last target of each
        row (one example per user). Joint: each of the user's rationales only at the
        positions of the row whose prefixes hold everything it saw (`position_user_vectors`)."""
        if self.config.mode == "hybrid" and self.config.joint:
            user = self.position_user_vectors(users, inputs)
            targets = targets[:, -user.shape[1]:]
            user, targets = user[targets > 0], targets[targets > 0]
        else:
            user, targets = self.user_vectors(users, inputs), targets[:, -1]
        logits = user @ self.item_vectors().T
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, targets)

    # --- checkpoints ---
    def save_pretrained(self, path: str | Path) -> None:
        """Config + fusion weights; a fine-tuned backbone is saved beside them, a frozen one referenced."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG).write_text(json.dumps({"model_type": self.model_type, **asdict(self.config)}, indent=2))
        own = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        save_file(own, path / WEIGHTS)
        if self.backbone is not None and not self.config.freeze_backbone:
            self.backbone.save_pretrained(path / BACKBONE)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "FusedRecommender":
        path = Path(path)
        cfg = model_config(path, FusionConfig, cls.model_type)
        state = read_weights(path / WEIGHTS)
        buffers = ("user_text", "user_has", "item_text", "item_has")
        if any(b not in state for b in buffers):
            raise InputError(f"{path / WEIGHTS}: missing the text tables ({', '.join(buffers)})")
        backbone = None
        if cfg.mode == "hybrid":
            src = path / BACKBONE if (path / BACKBONE).exists() else path / cfg.backbone_path
            if not (src / CONFIG).exists():
                raise InputError(f"{path / CONFIG}: backbone checkpoint {src} not found")
            backbone = load_model(src)
        model = cls(cfg, *(state[b] for b in buffers), backbone, item_pop=state.get("item_pop"))
        own = {k for k in model.state_dict() if not k.startswith("backbone.")}
        load_state(model, state, path / WEIGHTS, required=own)
        return model.eval()


def vectors_to_tensors(ids: np.ndarray, vectors: np.ndarray, size: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter (id, vector) rows into a dense [size, dim] table with a has-vector mask."""
    table = torch.zeros(size, dim)
    has = torch.zeros(size, dtype=torch.bool)
    if len(ids):
        idx = torch.from_numpy(np.array(ids, dtype=np.int64))  # a copy: LanceDB gives read-only arrays
        table[idx] = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        has[idx] = True
    return table, has
