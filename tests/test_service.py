"""`fusion serve` over real HTTP on 127.0.0.1: every endpoint and bad request, the bearer token, a new
user's history end to end (the SLIM student's rationale from the fault-injecting OpenAI-compatible
server, and from a real tiny random LLaMA served by the transformers batching server), and the page rendered by a
real headless chromium."""
import contextlib
import json
import logging
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import uvicorn

from eval.dataset import pad_left
from eval.errors import InputError
from fusion.recommend import MAX_K, Recommender, new_user_vector
from fusion.service import MAX_HISTORY, REDACTED, StudentWriter, create_app, redact_query, student_settings
from slim.client import ChatClient
from slim.records import rationale_text
from slim.serve import Server
from slim.student import StudentRationalesConfig
from tests.slim_fake_openai import SERVED_MODEL, FakeOpenAI
from tests.test_pipeline import tiny_lm
from tests.test_recommend import build_run

TOKEN = "s3cret-token-for-tests"


@contextlib.contextmanager
def serving(app):
    """The app on a free port of 127.0.0.1, served by uvicorn in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """(base URL, recommender, student writer, fake student server) of a service with a token."""
    rec = Recommender(build_run(tmp_path_factory.mktemp("run")))
    with FakeOpenAI() as student:
        writer = StudentWriter(rec, student.base_url)
        with serving(create_app(rec, writer, TOKEN)) as url:
            yield url, rec, writer, student


def call(url: str, path: str, body: dict | None = None, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_ready_users_and_items(service):
    url, rec, _, _ = service
    assert call(url, "/health", token=None) == (200, {"status": "ok"})
    status, ready = call(url, "/ready", token=None)
    assert status == 200 and ready == {"ready": True, "model": "fusion/hybrid-sasrec", "users": 40, "items": 30,
                                       "index": "exact", "new_users": True}
    status, users = call(url, "/users?prefix=u1&limit=3")
    assert status == 200 and users["total"] == 11 and set(users["users"]) < {u for u in rec.users if u.startswith("u1")}
    status, item = call(url, "/items/i0")
    assert status == 200 and item["title"] == "Godfather, The" and item["year"] == "1972"
    assert item["categories"] == ["Drama", "Comedy"] and item["interactions"] == int(rec.ds.item_popularity[
        rec.items["i0"]])


def test_known_user_recommendations(service):
    url, rec, _, _ = service
    status, answer = call(url, "/users/u3/recommendations?k=4")
    assert status == 200 and answer == json.loads(json.dumps(rec.for_user("u3", 4)))
    assert len(answer["recommendations"]) == 4 and answer["rationale"]["step2"]
    status, default = call(url, "/users/u3/recommendations")
    assert status == 200 and len(default["recommendations"]) == 10


@pytest.mark.parametrize("method, path, body, status, message", [
    ("GET", "/users/nobody/recommendations", None, 404, "unknown user 'nobody'"),
    ("GET", "/users/u3/recommendations?k=0", None, 422, "k: Input should be greater than or equal to 1"),
    ("GET", f"/users/u3/recommendations?k={MAX_K + 1}", None, 422, f"k: Input should be less than or equal to {MAX_K}"),
    ("GET", "/users/u3/recommendations?k=ten", None, 422, "k: Input should be a valid integer"),
    ("GET", "/items/i999", None, 404, "unknown item id 'i999'"),
    ("POST", "/recommendations", {"history": []}, 422, "history: List should have at least 1 item"),
    ("POST", "/recommendations", {"history": ["i1"] * (MAX_HISTORY + 1)}, 422,
     f"history: List should have at most {MAX_HISTORY} items"),
    ("POST", "/recommendations", {"history": ["i1", "nope", "i2"]}, 404, "unknown item id 'nope'"),
    ("POST", "/recommendations", {"history": ["i1"], "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ("POST", "/recommendations", {"items": ["i1"]}, 422, "history: Field required"),
    ("GET", "/no/such/route", None, 404, "Not Found"),
])
def test_bad_requests_are_4xx_with_a_clear_json_message(service, method, path, body, status, message):
    url, _, _, student = service
    asked = len(student.requests)
    got, answer = call(url, path, body)
    assert got == status and message in answer["error"], answer
    assert len(student.requests) == asked   # nothing invalid reaches the student


def test_bearer_token_is_required_and_never_logged(service, caplog):
    url, _, _, _ = service
    caplog.set_level(logging.INFO)
    for path in ("/users/u3/recommendations", "/items/i1", "/users"):
        assert call(url, path, token=None) == (401, {"error": "missing or wrong bearer token"})
        assert call(url, path, token="wrong")[0] == 401
    assert call(url, "/recommendations", {"history": ["i1"]}, token=None)[0] == 401
    assert call(url, "/users/u3/recommendations")[0] == 200
    assert call(url, "/health", token=None)[0] == 200 and call(url, "/ready", token=None)[0] == 200
    assert "GET /users/u3/recommendations" in caplog.text   # the access log is on ...
    assert TOKEN not in caplog.text                         # ... and never shows the token


@pytest.mark.parametrize("query", [f"token={TOKEN}", f"k=3&api_key={TOKEN}", f"access_token={TOKEN}&k=3",
                                   f"Password={TOKEN}", f"my%5Fsecret={TOKEN}", f"key={TOKEN}&key={TOKEN}"])
def test_a_credential_in_the_address_is_refused_and_redacted_in_the_access_log(service, caplog, query):
    url, _, _, _ = service
    caplog.set_level(logging.INFO)
    status, answer = call(url, f"/users/u3/recommendations?{query}")  # refused even with the right header
    assert status == 401 and "in the address is not accepted" in answer["error"] and TOKEN not in answer["error"]
    assert call(url, f"/users/u3/recommendations?{query}", token=None)[0] == 401
    with urllib.request.urlopen(f"{url}/?user=u3&{query}") as page:  # the page itself is served, its address logged
        assert page.status == 200
    assert TOKEN not in caplog.text and REDACTED in caplog.text
    for target in (f"/users/u3/recommendations?{query}", f"/?user=u3&{query}"):
        assert f"GET {redact_query(target)} HTTP" in caplog.text


def test_redact_query_keeps_every_other_parameter():
    assert redact_query("/users?prefix=u1&limit=3") == "/users?prefix=u1&limit=3"
    assert redact_query("/x?k=3&token=abc&Api-Key=def&limit") == f"/x?k=3&token={REDACTED}&Api-Key={REDACTED}&limit"
    assert redact_query("/x?token") == f"/x?token={REDACTED}" and redact_query("/plain") == "/plain"


def test_new_user_history_end_to_end_with_the_students_rationale(service, monkeypatch):
    url, rec, writer, student = service
    monkeypatch.setattr("fusion.recommend.load_model", None)  # models load at start-up, never per request
    asked = len(student.requests)
    history = ["i4", "i8", "i0"]
    status, answer = call(url, "/recommendations", {"history": history, "k": 5})
    assert status == 200 and answer["user"] is None and answer["history_length"] == 3
    prompt = student.requests[asked]["body"]["messages"][-1]["content"]
    assert len(student.requests) == asked + 1 and "Movie 4" in prompt and "Godfather, The" in prompt
    r = answer["rationale"]
    assert r["model"] == SERVED_MODEL and r["error"] is None and r["step2"] == "Drama, Comedy."
    recs = answer["recommendations"]
    assert len(recs) == 5 and not {x["id"] for x in recs} & set(history)
    assert [h["id"] for h in answer["history"]] == history[::-1]
    for x in recs:
        assert x["evidence"]["categories"] == [c for c in x["categories"] if c in ("Drama", "Comedy")]
    # the rationale's vector is fused with the history exactly as the model fuses a known user's
    text = torch.from_numpy(writer.encoder.encode([rationale_text(r)], normalize_embeddings=True))[0]
    items = torch.tensor(rec.items_of([x["id"] for x in recs]))
    vec = new_user_vector(rec.model, pad_left([np.array(rec.items_of(history))], rec.max_len), text)[0]
    assert np.allclose([x["score"] for x in recs], (rec.item_vectors[items] @ vec).numpy(), atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(text[None], rec.item_text[0][items]).numpy()
    assert np.allclose([x["evidence"]["cosine"] for x in recs], cos, atol=1e-3)
    status, numeric = call(url, "/recommendations", {"history": [4], "k": 2})  # raw ids may come as numbers
    assert status == 404 and "unknown item id '4'" in numeric["error"]


@pytest.fixture(scope="module")
def tiny_student(service, tmp_path_factory):
    """(base URL, student client) of a service whose student is a random 2-layer LLaMA with the SmolLM2
    tokenizer and chat template, served over HTTP by the transformers batching server (`slim.serve.Server`; vLLM
    takes 30-60 s to start on CPU, its own tests cover it)."""
    _, rec, _, _ = service
    root = tmp_path_factory.mktemp("tiny-student")
    torch.manual_seed(0)
    model = tiny_lm(root / "model", initializer_range=0.2)  # at the default 0.02 it writes only newlines
    with Server(model, backend="transformers", startup_timeout_s=300, log_path=root / "server.log", quiet=True) as lm:
        writer = StudentWriter(rec, lm.base_url, lm.model_name)
        with serving(create_app(rec, writer)) as url:
            yield url, writer


def test_new_user_with_a_real_tiny_student_gets_its_off_format_rationale_and_k_items(service, tiny_student):
    """The whole new-user path with real generation: prompt -> served LLaMA -> parse -> encoder -> fusion
    -> retrieval. A random model writes no "Step N:" lines: the answer says so and still recommends."""
    _, rec, _, _ = service
    url, writer = tiny_student
    history = ["i4", "i8", "i0", "i13"]
    status, answer = call(url, "/recommendations", {"history": history, "k": 6}, token=None)
    assert status == 200, answer
    r = answer["rationale"]
    # greedy decoding: the student's answer to the same prompt is the rationale the service used
    again = writer.chat.complete(writer.prompt(rec.items_of(history))).text
    assert r["text"] == again and r["model"] == writer.chat.model_name
    assert r["error"] is not None and r["error"].startswith("missing step")  # its parse status: off-format
    recs = answer["recommendations"]
    assert answer["user"] is None and answer["history_length"] == 4
    assert [x["rank"] for x in recs] == [1, 2, 3, 4, 5, 6] and not {x["id"] for x in recs} & set(history)
    assert [x["score"] for x in recs] == sorted((x["score"] for x in recs), reverse=True)
    assert r["text"].strip() and r["step1"] == r["step2"] == r["step3"] == ""
    for x in recs:  # the raw answer is embedded, as the vectors stage embeds off-format records
        assert set(x["evidence"]) == {"categories", "title", "cosine"} and -1 <= x["evidence"]["cosine"] <= 1
    _, ready = call(url, "/ready", token=None)
    assert ready["ready"] is True and ready["new_users"] is True


def test_a_students_answer_with_a_lone_surrogate_is_answered_with_it_replaced(service, monkeypatch):
    """JSON lets an endpoint send "\\ud800", which no encoder writes: the answer must not fail on it."""
    url, _, writer, _ = service
    answer = SimpleNamespace(text="Step 1: Likes drama\ud800.\nStep 2: Drama, Comedy.\nStep 3: Movie 1; Movie 2.")
    monkeypatch.setattr(writer, "chat", SimpleNamespace(model_name="stub", complete=lambda prompt: answer))
    status, got = call(url, "/recommendations", {"history": ["i4", "i8"], "k": 3})
    assert status == 200 and got["rationale"]["step1"] == "Likes drama\ufffd." and len(got["recommendations"]) == 3


def test_student_failure_is_502_and_no_student_is_503(service, monkeypatch):
    url, rec, writer, _ = service
    with FakeOpenAI(faults=["500"]) as failing:
        monkeypatch.setattr(writer, "chat", ChatClient(replace(writer.cfg.client, base_url=failing.base_url,
                                                               model="m", max_retries=0)))
        status, answer = call(url, "/recommendations", {"history": ["i4"]})
    assert status == 502 and "no answer (InternalServerError)" in answer["error"]
    with serving(create_app(rec)) as plain:   # no student endpoint, no token
        status, answer = call(plain, "/recommendations", {"history": ["i4"]}, token=None)
        assert status == 503 and "--student-url" in answer["error"]
        assert call(plain, "/ready", token=None)[1]["new_users"] is False
        assert call(plain, "/users/u3/recommendations", token=None)[0] == 200


def test_new_users_prompt_is_the_runs_then_the_one_the_student_was_trained_on(tmp_path):
    assert student_settings(tmp_path) == StudentRationalesConfig()
    (tmp_path / "slim-student").mkdir()
    (tmp_path / "slim-student" / "manifest.json").write_text(json.dumps(
        {"config": {"template": "slim_student_v1", "history_tokens": 64, "lora_r": 16}}))
    trained = student_settings(tmp_path)
    assert (trained.template, trained.history_tokens, trained.client) == ("slim_student_v1", 64,
                                                                         StudentRationalesConfig().client)
    (tmp_path / "slim-student-rationales").mkdir()
    (tmp_path / "slim-student-rationales" / "manifest.json").write_text(json.dumps(
        {"config": {"template": "slim_student_v1", "history_tokens": 96, "client": {"max_tokens": 48}}}))
    written = student_settings(tmp_path)
    assert (written.history_tokens, written.client.max_tokens) == (96, 48)


def test_new_users_need_vectors_of_the_students_rationales(service, monkeypatch):
    url, rec, _, student = service
    monkeypatch.setattr(rec, "vectors_config", lambda: {"records": "profile-rationales"})
    with pytest.raises(InputError, match="vectors encode profile-rationales, not the SLIM student's"):
        StudentWriter(rec, student.base_url)


def test_serve_command_needs_the_token_variable_it_names_and_one_student(service, monkeypatch, capsys):
    from tests.test_recommend import cli

    url, rec, _, _ = service
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    code, out, err = cli(monkeypatch, capsys, "serve", "--run", str(rec.run), "--token-env", "NO_SUCH_TOKEN_VAR")
    assert code == 1 and "NO_SUCH_TOKEN_VAR is not set" in err and err.count("\n") == 1
    code, out, err = cli(monkeypatch, capsys, "serve", "--run", str(rec.run), "--serve-student", "--student-url", url)
    assert code == 1 and "--serve-student and --student-url: give one of them" in err and err.count("\n") == 1


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (CI installs it: apt-get install -y chromium)")
def test_page_in_a_headless_browser_shows_history_rationale_and_recommendations(service, tmp_path):
    url, rec, _, _ = service
    with urllib.request.urlopen(url + "/") as r:
        assert r.status == 200 and "<title>" in r.read().decode()
    page = f"{url}/?user=u3&k=5#token={TOKEN}"  # the token travels in the fragment: never sent, never logged
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--virtual-time-budget=15000", "--window-size=1200,1100"]
    dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    shot = tmp_path / "page.png"
    subprocess.run([*browser, f"--screenshot={shot}", page], capture_output=True, timeout=120)
    expected = rec.for_user("u3", 5)
    assert 'data-state="ready"' in dom, dom[-2000:]
    assert expected["rationale"]["step3"] in dom and expected["rationale"]["step1"] in dom
    assert expected["recommendations"][0]["title"] in dom and expected["history"][0]["title"] in dom
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
