"""Fused models: rationale and item-text vectors with or without an ID recommender. Each kind is a
registered subclass of `FusedRecommender` with one config (its model and training settings); the
`mode` of a preset's `[fusion.NAME]` table names the kind. The project's two kinds are SLIM's:

hybrid (`HybridFusion`): user = g_f([g_l(rationale_u); backbone_user(history)]), item = g_f([g_l(text_i); id_i])
text (`TextMatching`):   user = g_u(rationale_u), item = g_i(text_i)
A user without a rationale, or an item without text, gets a learned "missing" vector instead.
g_f starts as the identity on the ID half (frozen training begins from the backbone's own ranking);
jointly trained, it starts as the sum of both halves, so the text path is not stuck near zero.

Joint training (`training = "joint"`) learns the fused item side with the backbone's own objective,
cross-entropy over all items at every position of every training history. A rationale written from a
prefix of the history informs only the positions whose prefix contains all of it (`text_positions`:
the last k positions of a training row); with rationales at several cut points, each position reads
the latest one whose prefix it holds (`set_cuts`), and scoring reads the end one. Every earlier
position gets the "missing" vector, so no rationale ever sees the target of a position it informs.
Item cold start (`pop_gate`): an item's ID half mixes its own ID vector with those of the seen items
its text is closest to, by a learned gate on log(1 + training count), so an item seen rarely is placed
by its text. In training (`id_dropout`, DropoutNet), a random share of items, drawn afresh each step,
is scored without its own ID vector (zero), as the items seen at most RARE times then always are, so
that the text path (and the borrowed ID vectors) learn to rank items without it. At scoring
(`cold_ridge`), an item seen at most RARE times gets the item vector a ridge map from item text
predicts, fitted on the trained vectors of the items seen more than 2 * RARE times (a linear
attribute-to-feature map, Gantner et al., ICDM 2010): its own vector, trained almost only as a
negative, ranks it below hundreds of items whatever its text. The three need item text: set on a
hybrid that reads none, each is an error.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from eval.config import config_dict, setting
from eval.errors import InputError
from eval.io import CONFIG, WEIGHTS
from eval.registry import MODELS, load_model, load_state, model_config, model_configs, read_weights, register_model
from eval.scoring import CachedScorer, DotScorer
from slmrec.fused_ce import linear_cross_entropy
from slmrec.trainer import TrainConfig

from .groups import RARE  # the cold-start gate is 0.5 at RARE training interactions

BACKBONE = "backbone"
TEXT_SIDES = ("both", "items", "users", "none")
COLD_RIDGE = 0.1  # cold_ridge where it applies and is not set
DEFAULT_KIND = "hybrid"  # the kind of a [fusion.NAME] table without a mode
MODE_HELP = ("The fused model kind: hybrid (text + an ID backbone), text (ID-agnostic text matching), or another "
             "registered FusedRecommender's kind.")


@dataclass(frozen=True)
class FusedConfig:
    """The settings every fused model kind has; a kind's config adds its own (model and training)."""
    mode: str = setting(DEFAULT_KIND, MODE_HELP)
    vectors: str = setting("vectors", "The run's vectors folder to read (vectors, or another vectors stage, e.g. "
                                      "vectors-profile over the profile control).")
    seeds: int = setting(1, "Train with this many seeds (train.seed, +1, ...); the first seed's model is kept and "
                            "seeds.json holds every seed's test metrics with their mean and std.")
    user_group: int | None = setting(None, "Train and select on one of the 5 history-length groups "
                                           "(0 = shortest; none: all users).")
    train: TrainConfig = setting(factory=lambda: TrainConfig(epochs=50, patience=5, lr=1e-3, weight_decay=1e-4))

    # whether the model reads the rationale and the item-text vectors (a kind's config may say by its settings)
    reads_user_text = reads_item_text = True

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise InputError(f"fusion seeds must be at least 1, not {self.seeds}")

    def backbone_dir(self, run: Path) -> Path | None:
        """The run's folder of the backbone this model fuses with (none: it reads no backbone)."""
        return None

    def resolved(self) -> "FusedConfig":
        """These settings with every "where it applies" default made what it is for this model (what a
        saved model records)."""
        return self


@dataclass(frozen=True)
class HybridConfig(FusedConfig):
    backbone: str = setting("sasrec", "Backbone model folder of the run: sasrec, gru4rec, slmrec-student or "
                                      "another registered backbone's.")
    training: str = setting("joint", "joint: the backbone's own objective (cross-entropy over all items) at every "
                                     "position of every training history, each rationale only after the prefix it "
                                     "saw (the latest one there, with cuts); frozen: SLIM's head, one example per "
                                     "user (the history a rationale saw and the item after it).")
    freeze_backbone: bool = setting(False, "Keep the backbone frozen (else it is fine-tuned from its checkpoint "
                                           "and saved with the model).")
    text: str = setting("both", "Text the hybrid reads: both, items (item text only), users (rationales only), "
                                "none (the same training without text: what the text adds).")
    pop_gate: bool | None = setting(None, "Item cold start: mix each item's ID vector with those of its text "
                                          "neighbours by a learned gate on log(1 + training count), so rarely seen "
                                          "items are placed by their text (none: on where the model reads item "
                                          "text; true without item text is an error).")
    cold_ridge: float | None = setting(None, f"Item cold start at scoring: an item seen at most {RARE} times in "
                                             "training gets the vector a ridge map from item text predicts, fitted "
                                             f"on the trained vectors of items seen more than {2 * RARE} times; this "
                                             "is the ridge penalty (smaller: rare items ranked higher, at some cost "
                                             f"overall; 0: off; none: {COLD_RIDGE} where the model reads item text, "
                                             "else off).")
    id_dropout: float = setting(0.0, "Item cold start in training (DropoutNet): each step this share of items, drawn "
                                     f"afresh, is scored without its own ID vector, as items seen at most {RARE} times "
                                     "then always are; with pop_gate a dropped item is gated as a rare one, so the "
                                     "text path and the borrowed ID vectors learn to carry such items (0: off; "
                                     "needs item text).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.training not in ("joint", "frozen"):
            raise InputError(f"fusion training must be 'joint' or 'frozen', not {self.training!r}")
        if self.text not in TEXT_SIDES:
            raise InputError(f"fusion text must be one of {', '.join(TEXT_SIDES)}, not {self.text!r}")
        if self.cold_ridge is not None and self.cold_ridge < 0:
            raise InputError(f"fusion cold_ridge must be 0 (off) or positive, not {self.cold_ridge}")
        if not 0 <= self.id_dropout < 1:
            raise InputError(f"fusion id_dropout must be in [0, 1), not {self.id_dropout}")
        on = [k for k in ("pop_gate", "cold_ridge", "id_dropout") if getattr(self, k)]
        if on and not self.reads_item_text:
            value = json.dumps(getattr(self, on[0]))
            raise InputError(f"fusion {on[0]} = {value} cannot apply: text = {self.text!r} reads no item text "
                             "(leave it unset)")

    @property
    def reads_user_text(self) -> bool:
        return self.text in ("both", "users")

    @property
    def reads_item_text(self) -> bool:
        return self.text in ("both", "items")

    def backbone_dir(self, run: Path) -> Path | None:
        return run / self.backbone

    def resolved(self) -> "HybridConfig":
        items = self.reads_item_text
        return replace(self, pop_gate=items if self.pop_gate is None else self.pop_gate,
                       cold_ridge=(COLD_RIDGE if items else 0.0) if self.cold_ridge is None else self.cold_ridge)


@dataclass(frozen=True)
class TextMatchingConfig(FusedConfig):
    mode: str = setting("text", MODE_HELP)
    hidden: int = setting(64, "Size of the text-only model's vectors.")


@dataclass(frozen=True)
class Shape:
    """What the data, the text vectors and the backbone fix when a fused model is built (not settings)."""
    num_users: int
    num_items: int
    text_dim: int
    id_dim: int = 0              # the backbone's vector size (0: the model reads no backbone)
    max_len: int = 50            # the history length it is trained and scored with
    backbone_path: str = ""      # the backbone's folder relative to the model's: read unless it has backbone/


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


class FusedRecommender(DotScorer, nn.Module):
    """What every fused model kind shares: the run's text tables (rationale and item-text vectors, with a
    learned "missing" vector for those without), which rationale each training position may read,
    the training loss, saving and loading. A kind is a subclass with a `kind` (its preset tables'
    `mode`; its model_type is fusion-KIND), a `config_class` (a FusedConfig) and its heads
    (`add_heads`, `user_vectors`, `item_vectors`), decorated with `@register_model`: `fusion run` then
    trains it from a `[fusion.NAME]` table with `mode = "KIND"`."""

    kind: ClassVar[str]
    config_class: ClassVar[type[FusedConfig]]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in vars(cls):
            cls.model_type = f"fusion-{cls.kind}"

    def __init__(self, config: FusedConfig, shape: Shape, user_text: torch.Tensor, user_has: torch.Tensor,
                 item_text: torch.Tensor, item_has: torch.Tensor, backbone: nn.Module | None = None,
                 item_pop: torch.Tensor | None = None):
        super().__init__()
        if config.mode != self.kind:
            raise InputError(f"fusion mode {config.mode!r}: a {type(self).__name__} is {self.kind!r}")
        self.config, self.shape = config.resolved(), shape
        self.register_buffer("user_text", user_text.float())
        self.register_buffer("user_has", user_has.bool())
        self.register_buffer("item_text", item_text.float())
        self.register_buffer("item_has", item_has.bool())
        # how many trailing positions of a user's training row the rationale may inform: set by the
        # training stage from the prefix each rationale saw; 0 (never) unless told
        self.register_buffer("text_positions", torch.zeros(shape.num_users, dtype=torch.long), persistent=False)
        # the rationales at earlier cut points, read in training only (so never saved): see `set_cuts`
        self.register_buffer("cut_text", torch.zeros(0, shape.text_dim), persistent=False)
        self.register_buffer("cut_index", torch.zeros(shape.num_users, 0, dtype=torch.long), persistent=False)
        self.register_buffer("cut_positions", torch.zeros(shape.num_users, 0, dtype=torch.long), persistent=False)
        self.missing_user = nn.Parameter(torch.zeros(shape.text_dim))
        self.missing_item = nn.Parameter(torch.zeros(shape.text_dim))
        self.backbone = backbone
        # a kind trained at every position of every training history (else one example per user), or one
        # that trains its backbone (so saves it with the model, else references it), sets these
        self.every_position = self.saves_backbone = False
        self.add_heads(item_pop)

    # --- what a kind implements (and `user_vectors`, `item_vectors`) or may override ---
    def add_heads(self, item_pop: torch.Tensor | None) -> None:
        """The kind's own layers, made when the model is built (`item_pop`: each item's training count)."""
        raise NotImplementedError

    def new_user_vectors(self, histories: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        """User vectors of people the model was not trained with, from their histories and a rationale
        vector (None: the learned "missing" vector)."""
        raise NotImplementedError(f"{type(self).__name__} scores no new users")

    def training_pairs(self, users: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The user vectors a training batch scores and the items they should rank first: by default
        one per row, its last target."""
        return self.user_vectors(users, inputs), targets[:, -1]

    # --- text sides ---
    def _user_text(self, users: torch.Tensor) -> torch.Tensor:
        has = self.user_has[users, None] & self.config.reads_user_text
        return torch.where(has, self.user_text[users], self.missing_user)

    def _item_text(self) -> torch.Tensor:
        has = self.item_has[:, None] & self.config.reads_item_text
        return torch.where(has, self.item_text, self.missing_item)

    def given_text(self, text: torch.Tensor | None, n: int) -> torch.Tensor:
        """`n` users' rationale vectors: `text`, or the learned "missing" vector."""
        return (self.missing_user if text is None else text.float()).expand(n, -1)

    def set_cuts(self, text: torch.Tensor, index: torch.Tensor, positions: torch.Tensor) -> None:
        """The rationales at earlier cut points for joint training: their vectors [N, text_dim], and per
        user the row of each of its cuts, earliest first [U, K], with how many trailing positions of
        its training row that cut may inform [U, K] (0 for an unused slot)."""
        self.cut_text, self.cut_index, self.cut_positions = text.float(), index.long(), positions.long()

    def position_text(self, users: torch.Tensor, length: int) -> torch.Tensor:
        """The rationale vector each of the last `length` positions of the users' training rows may read
        [B, length, text_dim]: the latest one whose prefix it holds (the end one in the last
        `text_positions[u]` positions, earlier cuts before that), every earlier one the "missing" vector."""
        back = torch.arange(length - 1, -1, -1, device=self.user_text.device)[None]  # positions before the row's end
        text = self.missing_user
        for k in range(self.cut_positions.shape[1]):  # earliest cut first: a later one overwrites it
            informed = back < self.cut_positions[users, k][:, None]
            text = torch.where(informed[..., None], self.cut_text[self.cut_index[users, k]][:, None], text)
        # the end prefix on: the end rationale, or "missing" without one, as scoring reads it
        informed = back < self.text_positions[users][:, None]
        return torch.where(informed[..., None], self._user_text(users)[:, None], text)

    def training_loss(self, users: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over all items of the pairs `training_pairs` gives."""
        user, targets = self.training_pairs(users, inputs, targets)
        return linear_cross_entropy(user, self.item_vectors(), targets, skip_first=True)

    # --- checkpoints ---
    def save_pretrained(self, path: str | Path) -> None:
        """Config (shape and settings) + own weights; a trained backbone is saved beside them, a frozen
        one referenced."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"model_type": self.model_type, **asdict(self.shape), **config_dict(self.config)}
        (path / CONFIG).write_text(json.dumps(config, indent=2))
        own = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        save_file(own, path / WEIGHTS)
        if self.backbone is not None and self.saves_backbone:
            self.backbone.save_pretrained(path / BACKBONE)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "FusedRecommender":
        path = Path(path)
        config, shape = model_configs(path, (cls.config_class, Shape), cls.model_type)
        return cls.load(path, config, shape)

    @classmethod
    def load(cls, path: Path, config: FusedConfig, shape: Shape) -> "FusedRecommender":
        """The model in `path` from its settings and shape, with its weights and backbone."""
        state = read_weights(path / WEIGHTS)
        buffers = ("user_text", "user_has", "item_text", "item_has")
        if any(b not in state for b in buffers):
            raise InputError(f"{path / WEIGHTS}: missing the text tables ({', '.join(buffers)})")
        backbone = None
        if shape.id_dim:
            src = path / BACKBONE if (path / BACKBONE).exists() else path / shape.backbone_path
            if not (src / CONFIG).exists():
                raise InputError(f"{path / CONFIG}: backbone checkpoint {src} not found")
            backbone = load_model(src)
        model = cls(config, shape, *(state[b] for b in buffers), backbone, item_pop=state.get("item_pop"))
        own = {k for k in model.state_dict() if not k.startswith("backbone.")}
        load_state(model, state, path / WEIGHTS, required=own)
        return model.eval()


def fused_kinds() -> dict[str, type[FusedRecommender]]:
    """Every registered fused model kind by name (a preset table's `mode`)."""
    return {c.kind: c for c in MODELS.values() if isinstance(c, type) and issubclass(c, FusedRecommender)}


def fused_model(kind: str, where: str = "fusion mode") -> type[FusedRecommender]:
    """The registered fused model class of a kind, or one line naming `where` and the known kinds."""
    kinds = fused_kinds()
    if kind not in kinds:
        raise InputError(f"{where}: unknown fused model kind {kind!r} (known: {', '.join(kinds)})")
    return kinds[kind]


@register_model
class HybridFusion(FusedRecommender):
    """SLIM's hybrid: the rationale and item-text vectors fused with an ID backbone's (g_l, g_f), with
    joint training and the item cold-start paths (pop_gate, id_dropout, cold_ridge)."""

    kind = "hybrid"
    config_class = HybridConfig

    def add_heads(self, item_pop: torch.Tensor | None) -> None:
        cfg, dim, backbone = self.config, self.shape.id_dim, self.backbone
        if backbone is None:
            raise InputError("hybrid fusion needs a backbone recommender")
        self.every_position, self.saves_backbone = cfg.training == "joint", not cfg.freeze_backbone
        self.g_l = nn.Linear(self.shape.text_dim, dim)
        self.g_f = nn.Linear(2 * dim, dim)
        with torch.no_grad():  # g_f starts as the sum of the ID half and, jointly trained, g_l's text half
            nn.init.normal_(self.g_f.weight, std=1e-3)
            self.g_f.weight[:, dim:] += torch.eye(dim)
            if self.every_position:  # a 1e-3 text half stays near zero in the few epochs joint training takes
                self.g_f.weight[:, :dim] += torch.eye(dim)
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
        # a frozen backbone's vectors never change: compute each user's once
        self.frozen = CachedScorer(backbone) if cfg.freeze_backbone else None
        self._positions_cache: dict[tuple[int, bytes], torch.Tensor] = {}
        self._map_key: tuple | None = None  # what the cached ridge map (`_text_map`) was solved for
        self._map: torch.Tensor | None = None

    def user_vectors(self, users: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        return self.fuse(self._user_text(users), (self.frozen or self.backbone).user_vectors(users, histories))

    def new_user_vectors(self, histories: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        nobody = torch.zeros(len(histories), dtype=torch.long)  # ID and LLM backbones ignore the user id
        # the backbone itself, not the frozen cache: new histories
        return self.fuse(self.given_text(text, len(histories)), self.backbone.user_vectors(nobody, histories))

    def fuse(self, text: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """g_f([g_l(text); ids]): also for users the model was not trained with (a new history).
        A model trained without user text reads its "missing" vector whatever text it is given."""
        if not self.config.reads_user_text:
            text = self.missing_user.expand(*ids.shape[:-1], -1)
        return self.g_f(torch.cat([self.g_l(text), ids], dim=-1))

    def id_gate(self, pop: torch.Tensor) -> torch.Tensor:
        """[num_items + 1] weight of each item's own ID vector given its training count `pop`: near 0 for
        items the backbone barely saw."""
        return torch.sigmoid(self.gate[0] * torch.log1p(pop) + self.gate[1])

    def item_vectors(self) -> torch.Tensor:
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
        if self.training or not self.config.cold_ridge:
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
        if self._map_key != key:
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

    def position_user_vectors(self, users: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Fused user vectors after every position of training rows [B, L, D], each position with the
        rationale it may read (`position_text`)."""
        h = self._positions(users, inputs)
        return self.fuse(self.position_text(users, h.shape[1]), h)

    def training_pairs(self, users: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint: every real position, each with the rationale it may read (`position_user_vectors`)."""
        if not self.every_position:
            return super().training_pairs(users, inputs, targets)
        user = self.position_user_vectors(users, inputs)
        targets = targets[:, -user.shape[1]:]
        return user[targets > 0], targets[targets > 0]


@register_model
class TextMatching(FusedRecommender):
    """SLIM's ID-agnostic text matching: the rationale and item-text vectors, each mapped by a layer."""

    kind = "text"
    config_class = TextMatchingConfig

    def add_heads(self, item_pop: torch.Tensor | None) -> None:
        self.g_user = nn.Linear(self.shape.text_dim, self.config.hidden)
        self.g_item = nn.Linear(self.shape.text_dim, self.config.hidden)

    def user_vectors(self, users: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        return self.g_user(self._user_text(users))

    def new_user_vectors(self, histories: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        return self.g_user(self.given_text(text, len(histories)))

    def item_vectors(self) -> torch.Tensor:
        return self.g_item(self._item_text())


@dataclass(frozen=True)
class SavedFusionConfig:
    """config.json of a fused model saved before hybrid and text matching were two classes (model_type
    "fusion", up to and including commit 1a10810's format), with that format's defaults."""
    mode: str
    num_users: int
    num_items: int
    text_dim: int
    id_dim: int = 0
    hidden: int = 64
    max_len: int = 50
    freeze_backbone: bool = True
    backbone_path: str = ""
    joint: bool = False
    text: str = "both"
    pop_gate: bool = False
    cold_ridge: float = 0.0
    id_dropout: float = 0.0

    def upgraded(self) -> tuple[type[FusedRecommender], FusedConfig, Shape]:
        """The class, settings and shape it loads as (training-only settings it never held read as defaults)."""
        shape = Shape(self.num_users, self.num_items, self.text_dim, self.id_dim, self.max_len, self.backbone_path)
        if self.mode == "hybrid":
            return HybridFusion, HybridConfig(training="joint" if self.joint else "frozen", text=self.text,
                                              freeze_backbone=self.freeze_backbone, pop_gate=self.pop_gate,
                                              cold_ridge=self.cold_ridge, id_dropout=self.id_dropout), shape
        if self.mode == "text":
            return TextMatching, TextMatchingConfig(hidden=self.hidden), replace(shape, id_dim=0, backbone_path="")
        raise InputError(f"fusion mode must be 'hybrid' or 'text', not {self.mode!r}")


@register_model
class SavedFusion:
    """Loads a folder of model_type "fusion" (the fused models' format before the two classes) as the
    HybridFusion or TextMatching it is; saved again, it is written in their format."""

    model_type = "fusion"

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FusedRecommender:
        path = Path(path)
        kind, config, shape = model_config(path, SavedFusionConfig, cls.model_type).upgraded()
        return kind.load(path, config, shape)


def vectors_to_tensors(ids: np.ndarray, vectors: np.ndarray, size: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter (id, vector) rows into a dense [size, dim] table with a has-vector mask."""
    table = torch.zeros(size, dim)
    has = torch.zeros(size, dtype=torch.bool)
    if len(ids):
        idx = torch.from_numpy(np.array(ids, dtype=np.int64))  # a copy: LanceDB gives read-only arrays
        table[idx] = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        has[idx] = True
    return table, has
