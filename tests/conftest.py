import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def write_atomic(folder, name, rows, item_rows=None):
    """A RecBole atomic data set: rows of (user, item, rating, timestamp)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in rows]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    if item_rows is not None:
        lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
        lines += [f"{i}\t{title}\t{year}\t{genre}" for i, title, year, genre in item_rows]
        (folder / f"{name}.item").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def synthetic(tmp_path):
    """40 users x 30 items with a learnable pattern: each user walks the item ring from a random start."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        start, step = rng.integers(0, 30), 1 + u % 2
        for t in range(12):
            rows.append((f"u{u}", f"i{(start + step * t) % 30}", 5, 1000 + t))
    items = [(f"i{i}", f"Movie {i}", 1990 + i, "Drama") for i in range(30)]
    return write_atomic(tmp_path / "syn", "syn", rows, items)
