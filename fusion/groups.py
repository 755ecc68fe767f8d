"""User and item groups for the cold-start, sparsity and popularity analyses."""
from __future__ import annotations

import numpy as np

from eval.dataset import SeqDataset

RARE = 5  # "rare items": seen at most RARE times in training (a report group; fusion's cold start)


def user_length_groups(ds: SeqDataset, n_groups: int = 5, users: np.ndarray | None = None) -> list[np.ndarray]:
    """`users` (default: all) in `n_groups` equal-size groups by training-history length, shortest first
    (SLIM, Fig. 5). Sorted by (length, user id), then cut into contiguous chunks: every user lands in
    exactly one group."""
    users = np.arange(ds.num_users) if users is None else np.asarray(users)
    lengths = np.array([len(s) for s in ds.train_sequences()])[users]
    order = users[np.lexsort((users, lengths))]
    return [np.sort(g) for g in np.array_split(order, n_groups)]


def item_popularity_groups(ds: SeqDataset, head: float = 0.2, tail: float = 0.5) -> dict[str, np.ndarray]:
    """Items by training popularity: the `head` most popular share, the `tail` least popular share,
    and the rest (mid). Ties are broken by item id so the split is deterministic."""
    pop = ds.item_popularity[1:]
    order = np.lexsort((np.arange(1, ds.num_items + 1), -pop)) + 1  # most popular first
    n_head, n_tail = int(round(head * ds.num_items)), int(round(tail * ds.num_items))
    return {"head": np.sort(order[:n_head]), "mid": np.sort(order[n_head:ds.num_items - n_tail]),
            "tail": np.sort(order[ds.num_items - n_tail:])}


def users_by_test_item(ds: SeqDataset, items: np.ndarray, split: str = "test") -> np.ndarray:
    """Users whose target item for `split` is one of `items`."""
    return np.flatnonzero(np.isin(ds.target(split), items))


def user_groups(ds: SeqDataset, split: str = "test") -> dict[str, np.ndarray]:
    """The 5 history-length groups of the users evaluated on `split`, named by their length range."""
    lengths = np.array([len(s) for s in ds.train_sequences()])
    groups = user_length_groups(ds, users=ds.eval_users(split))
    return {f"G{i + 1} ({lengths[g].min()}-{lengths[g].max()})" if len(g) else f"G{i + 1} (none)": g
            for i, g in enumerate(groups)}


def item_groups(ds: SeqDataset, split: str = "test") -> dict[str, np.ndarray]:
    """Users by the training popularity of their `split` item: head / mid / tail and rare items."""
    groups = {**item_popularity_groups(ds), f"seen <= {RARE}": np.flatnonzero(ds.item_popularity[1:] <= RARE) + 1}
    return {name: users_by_test_item(ds, items, split) for name, items in groups.items()}
