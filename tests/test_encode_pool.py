"""Encoding in sentence-transformers' multi-process pool (`processes`): 2 CPU processes with the embedded
all-MiniLM-L6-v2 give the one-process vectors to float32 rounding (max |difference| < 1e-6 on unit
vectors, cosine > 1 - 1e-6; measured 1.9e-7 on 800 texts, no row bit-identical), directly and through
the vectors stage."""
import os

import numpy as np
import pytest

from eval.assets import minilm_path
from eval.errors import InputError
from eval.stage import run_stage
from slim.encode import (ITEMS_TABLE, USERS_TABLE, EncodeConfig, PooledEncoder, VectorsStage, load_encoder,
                         pool_devices, read_vectors)
from tests.slim_fake_openai import make_dataset, run_with_data
from tests.test_slim_encode import write_records

TOL = 1e-6
TEXTS = [f"User {i} likes {'slow ' * (i % 7)}drama and {'old ' * (i % 3)}comedies from the {1950 + i}s."
         for i in range(37)] + ["", "A", "Le cinéma français, naïve café — 東京物語 (1953)."]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    assert np.abs(a - b).max() < TOL
    assert (np.sum(a * b, axis=1) > 1 - TOL).all()


@pytest.mark.slow  # two spawned processes importing torch: 30-50 s on 2 shared cores
def test_two_cpu_processes_give_the_one_process_vectors():
    kw = dict(batch_size=8, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    one = load_encoder(str(minilm_path()), "cpu").encode(TEXTS, **kw)
    with load_encoder(str(minilm_path()), "cpu", processes=2) as pooled:
        assert isinstance(pooled, PooledEncoder) and pooled.pool is None  # started by the first encode only
        two = pooled.encode(TEXTS, **kw)
        assert len(pooled.pool["processes"]) == 2 and all(p.is_alive() for p in pooled.pool["processes"])
        again = pooled.encode(TEXTS[:5], **kw)  # the pool serves every call until closed
        pids = [p.pid for p in pooled.pool["processes"]]
    assert pooled.pool is None and not any(alive(pid) for pid in pids)  # closed: its processes are gone
    close(one, two)
    close(one[:5], again)


def test_pool_devices_and_bad_settings():
    assert pool_devices(None, 1) is None and pool_devices("cpu", 3) == ["cpu"] * 3
    with pytest.raises(InputError, match="processes = 2: device cuda:1 names one device"):
        pool_devices("cuda:1", 2)
    import torch

    if torch.cuda.device_count() < 8:
        with pytest.raises(InputError, match=r"processes = 8: only \d+ cuda devices here"):
            pool_devices("cuda", 8)
    with pytest.raises(InputError, match="processes: expected at least 1, got 0"):
        EncodeConfig(processes=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("enc-pool"))


@pytest.mark.slow
def test_vectors_stage_with_two_processes_matches_one(data, tmp_path):
    texts = {u: f"User {u} likes {'quiet ' * (u % 5)}drama movies." for u in range(40)}
    tables = {}
    for processes in (1, 2):
        run = run_with_data(data, tmp_path / f"run{processes}")
        write_records(run, texts)
        counts = run_stage(VectorsStage(run, EncodeConfig(processes=processes, device="cpu"))).counts
        assert counts[USERS_TABLE]["encoded"] == 40 and counts[ITEMS_TABLE]["encoded"] == 30
        tables[processes] = (counts, [read_vectors(run / "vectors", t) for t in (USERS_TABLE, ITEMS_TABLE)])
    (c1, t1), (c2, t2) = tables[1], tables[2]
    assert c1 == c2  # the same rows and content digests: the vectors stage's output is the same
    for (ids1, v1), (ids2, v2) in zip(t1, t2):
        assert ids1.tolist() == ids2.tolist()
        close(v1, v2)
