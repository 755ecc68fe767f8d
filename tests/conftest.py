import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# marked slow: the whole pipeline, vLLM, LLM fine-tuning and served generation (whole modules), the
# browser, and the few other tests over ~15 s on 2 cores (trainings to convergence, CLI tables of many
# processes); `make test` runs everything, `pytest -m "not slow"` the rest in a few minutes
SLOW_MODULES = {"test_pipeline", "test_vllm", "test_slim_finetune", "test_batch_server"}
SLOW_TESTS = {"test_pretrain_learns_and_is_skipped_when_up_to_date", "test_cli_table_of_odd_paths_empty_files_and_odd_text",
              "test_teacher_then_student_end_to_end", "test_killed_run_resumes_with_one_record_per_user"}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS or "browser" in item.name:
            item.add_marker(pytest.mark.slow)


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
