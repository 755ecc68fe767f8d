"""SLIM encode: real MiniLM vectors in a real on-disk LanceDB, re-encoding only what changed."""
import numpy as np
import pytest

from slim.encode import ITEMS_TABLE, USERS_TABLE, EncodeConfig, encode, read_vectors
from slim.records import RecordLog
from tests.slim_fake_openai import make_dataset


def write_records(path, texts: dict[int, str]) -> None:
    with RecordLog(path) as log:
        for u, t in texts.items():
            log.append({"user": u, "prompt_version": "slim_student_v1", "model": f"m-{t}", "error": None,
                        "step1": t, "step2": "Drama.", "step3": "Movie 1."})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("enc"))


def test_encode_reencodes_only_changed_rows(data, tmp_path):
    records, db = tmp_path / "records.jsonl", tmp_path / "vectors"
    write_records(records, {u: f"User {u} likes drama movies." for u in range(40)})
    first = encode(data, records, db, EncodeConfig())
    assert first[USERS_TABLE].items() >= {"rows": 40, "encoded": 40, "deleted": 0}.items()
    assert first[ITEMS_TABLE].items() >= {"rows": 30, "encoded": 30, "deleted": 0}.items()
    uids, U = read_vectors(db, USERS_TABLE)
    iids, V = read_vectors(db, ITEMS_TABLE)
    assert uids.tolist() == list(range(40)) and U.shape == (40, 384) and U.dtype == np.float32
    assert iids.tolist() == list(range(1, 31)) and V.shape == (30, 384)
    assert np.allclose(np.linalg.norm(U, axis=1), 1, atol=1e-4)

    write_records(records, {7: "User 7 only watches horror films now."})  # a newer record for user 7 wins
    second = encode(data, records, db, EncodeConfig())
    assert second[USERS_TABLE]["encoded"] == 1 and second[ITEMS_TABLE]["encoded"] == 0
    assert second[USERS_TABLE]["content_sha256"] != first[USERS_TABLE]["content_sha256"]
    assert second[ITEMS_TABLE]["content_sha256"] == first[ITEMS_TABLE]["content_sha256"]
    uids2, U2 = read_vectors(db, USERS_TABLE)
    assert uids2.tolist() == uids.tolist()
    changed = ~np.isclose(U2, U).all(axis=1)
    assert changed.tolist() == [u == 7 for u in range(40)]
    assert np.allclose(V, read_vectors(db, ITEMS_TABLE)[1])


def test_encode_skips_when_records_and_data_are_unchanged(data, tmp_path):
    records, db = tmp_path / "records.jsonl", tmp_path / "vectors"
    write_records(records, {u: f"User {u} likes comedies." for u in range(40)})
    first = encode(data, records, db, EncodeConfig())
    stamp = (db / "manifest.json").read_text()
    assert encode(data, records, db, EncodeConfig()) == first
    assert (db / "manifest.json").read_text() == stamp  # nothing rewritten
