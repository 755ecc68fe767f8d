"""Text vectors for fusion: user rationale vectors and item-text vectors, by id."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slim.encode import ITEMS_TABLE, USERS_TABLE, read_cut_vectors, read_vectors


@dataclass(frozen=True)
class TextVectors:
    user_ids: np.ndarray        # user ids (0..U-1) that have a rationale vector (their end rationale)
    user_vectors: np.ndarray    # [len(user_ids), dim]
    item_ids: np.ndarray        # item ids (1..I) that have a text vector
    item_vectors: np.ndarray    # [len(item_ids), dim]
    # rationales at earlier cut points (none unless the rationale stage wrote several per user)
    cut_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))       # their users
    cut_prefixes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # history length each saw
    cut_vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1] if len(self.item_vectors) else self.user_vectors.shape[1])


def load_vectors(db_path: str | Path) -> TextVectors:
    """Rationale and item-text vectors from the LanceDB tables the vectors stage wrote (with the
    earlier cut points' rationales where it wrote them)."""
    user_ids, user_vectors = read_vectors(db_path, USERS_TABLE)
    item_ids, item_vectors = read_vectors(db_path, ITEMS_TABLE)
    return TextVectors(user_ids, user_vectors, item_ids, item_vectors,
                       *read_cut_vectors(db_path, user_vectors.shape[1]))
