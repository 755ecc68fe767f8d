"""Dot-product scoring shared by every model, and a cache of user vectors for frozen models."""
from __future__ import annotations

from typing import Callable

import torch


def dot_scores(users: torch.Tensor, items: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
    """[B, C] scores of candidate items, or [B, num_items + 1] for all items when candidates is None."""
    items = items.to(users.device)
    if candidates is None:
        return users @ items.T
    return torch.einsum("bd,bcd->bc", users, items[candidates.to(users.device)])


class DotScorer:
    """The Scorer interface of `eval.evaluate` for any model that has user and item vectors:
    a score is the dot product of the two (SASRec, GRU4Rec, the LLM recommenders, fused models)."""

    def user_vectors(self, users: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def item_vectors(self) -> torch.Tensor:
        raise NotImplementedError

    def score(self, users: torch.Tensor, histories: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        return dot_scores(self.user_vectors(users, histories), self.item_vectors(), candidates)

    def item_scores(self, users: torch.Tensor, histories: torch.Tensor) -> ItemScores:
        """`score(users, histories, None)` a block of items at a time: the user vectors are computed once,
        and the returned function gives the [B, C] scores of item ids `ids` (a slice or [C] tensor)."""
        u, items = self.user_vectors(users, histories), self.item_vectors()
        return lambda ids: dot_scores(u, items[ids], None)


ItemScores = Callable[[slice | torch.Tensor], torch.Tensor]


def item_scorer(model, users: torch.Tensor, histories: torch.Tensor) -> ItemScores:
    """A model's full-ranking scores a block of item ids at a time: from its user and item vectors for a
    `DotScorer` that keeps the dot-product `score`, else sliced from `score(users, histories, None)`
    (any other model: its [B, num_items + 1] scores are then held at once)."""
    if isinstance(model, DotScorer) and type(model).score is DotScorer.score:
        return model.item_scores(users, histories)
    full = model.score(users, histories, None)
    return lambda ids: full[:, ids]


class CachedScorer(DotScorer):
    """A frozen dot-product model whose user vectors are computed once per (user, history).

    Evaluating one model under several protocols, or training a fusion head on a frozen backbone,
    asks for the same users again and again; an LLM backbone is far too slow to recompute them."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._users: dict[tuple[int, bytes], torch.Tensor] = {}
        self._items: torch.Tensor | None = None

    @torch.no_grad()
    def user_vectors(self, users: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        keys = [(int(u), h[h > 0].cpu().numpy().tobytes()) for u, h in zip(users, histories)]
        todo = [i for i, k in enumerate(keys) if k not in self._users]
        if todo:
            was = self.model.training
            self.model.eval()
            vecs = self.model.user_vectors(users[todo], histories[todo]).float()
            self.model.train(was)
            self._users.update({keys[i]: v for i, v in zip(todo, vecs)})
        return torch.stack([self._users[k] for k in keys])

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        if self._items is None:
            self._items = self.model.item_vectors().detach().float()
        return self._items
