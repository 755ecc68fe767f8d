"""SLIM encode: real MiniLM vectors in a real on-disk LanceDB, re-encoding only what changed."""
import numpy as np
import pytest

from eval.stage import run_stage
from slim.encode import ITEMS_TABLE, USERS_TABLE, EncodeConfig, VectorsStage, read_vectors
from slim.records import RecordLog
from slim.student import StudentRationalesStage
from tests.slim_fake_openai import make_dataset, run_with_data


def write_records(run, texts: dict[int, str]) -> None:
    """Student records where the vectors stage reads them: RUN/slim-student-rationales/records.jsonl."""
    with RecordLog(run / StudentRationalesStage.name / "records.jsonl") as log:
        for u, t in texts.items():
            log.append({"user": u, "prompt_version": "slim_student_v1", "model": f"m-{t}", "error": None,
                        "step1": t, "step2": "Drama.", "step3": "Movie 1."})


def encode(run) -> dict:
    """Run the vectors stage (RUN/vectors); its counts."""
    return run_stage(VectorsStage(run, EncodeConfig())).counts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("enc"))


@pytest.fixture
def run(data, tmp_path):
    return run_with_data(data, tmp_path / "run")


def test_encode_reencodes_only_changed_rows(run):
    db = run / "vectors"
    write_records(run, {u: f"User {u} likes drama movies." for u in range(40)})
    first = encode(run)
    assert first[USERS_TABLE].items() >= {"rows": 40, "encoded": 40, "deleted": 0}.items()
    assert first[ITEMS_TABLE].items() >= {"rows": 30, "encoded": 30, "deleted": 0}.items()
    uids, U = read_vectors(db, USERS_TABLE)
    iids, V = read_vectors(db, ITEMS_TABLE)
    assert uids.tolist() == list(range(40)) and U.shape == (40, 384) and U.dtype == np.float32
    assert iids.tolist() == list(range(1, 31)) and V.shape == (30, 384)
    assert np.allclose(np.linalg.norm(U, axis=1), 1, atol=1e-4)

    write_records(run, {7: "User 7 only watches horror films now."})  # a newer record for user 7 wins
    second = encode(run)
    assert second[USERS_TABLE]["encoded"] == 1 and second[ITEMS_TABLE]["encoded"] == 0
    assert second[USERS_TABLE]["content_sha256"] != first[USERS_TABLE]["content_sha256"]
    assert second[ITEMS_TABLE]["content_sha256"] == first[ITEMS_TABLE]["content_sha256"]
    uids2, U2 = read_vectors(db, USERS_TABLE)
    assert uids2.tolist() == uids.tolist()
    changed = ~np.isclose(U2, U).all(axis=1)
    assert changed.tolist() == [u == 7 for u in range(40)]
    assert np.allclose(V, read_vectors(db, ITEMS_TABLE)[1])


def test_encode_skips_when_records_and_data_are_unchanged(run):
    db = run / "vectors"
    write_records(run, {u: f"User {u} likes comedies." for u in range(40)})
    first = encode(run)
    stamp = (db / "manifest.json").read_text()
    result = run_stage(VectorsStage(run, EncodeConfig()))
    assert result.status == "up to date" and result.counts == first
    assert (db / "manifest.json").read_text() == stamp  # nothing rewritten
