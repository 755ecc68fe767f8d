"""The transformers batching server over real HTTP on 127.0.0.1, and SIGTERM to a stage that serves a model.

A random 2-layer LLaMA with the SmolLM2 tokenizer: concurrent requests are decoded together and answer
the same text as one at a time (greedy, and sampled with a seed); bad requests get a 4xx; a teacher
stage stopped with SIGTERM mid-stage leaves no server behind, a whole records file, and resumes.
"""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

from slim.client import ChatClient, ClientConfig, Completion
from slim.rationales import TeacherRationalesStage
from slim.records import RECORDS, read_records
from slim.serve import Server
from tests.slim_fake_openai import make_dataset
from tests.test_pipeline import tiny_lm

PROMPTS = [f"User history: Movie {i} (199{i}); Drama" + ", Comedy" * i for i in range(6)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return tiny_lm(tmp_path_factory.mktemp("batch-server") / "model", initializer_range=0.2)


@pytest.fixture(scope="module")
def server(model):
    with Server(model, backend="transformers", startup_timeout_s=300, log_path=model.parent / "server.log",
                quiet=True, max_batch=8) as s:
        yield s


def client(server, **kw) -> ChatClient:
    cfg = ClientConfig(base_url=server.base_url, model=server.model_name, max_tokens=12, temperature=0.0,
                       max_retries=0, timeout_s=120)
    return ChatClient(replace(cfg, **kw))


def batches(server) -> int:
    return httpx.get(server.base_url.removesuffix("/v1") + "/health").json()["batches"]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_concurrent_requests_answer_as_one_at_a_time(server, temperature):
    """Greedy, and sampled with a seed (each row draws from its own seeded generator): the answers do not
    depend on which requests share a batch; the concurrent ones were decoded in fewer batches."""
    alone = client(server, concurrency=1, temperature=temperature, seed=3)
    before = batches(server)
    one_at_a_time = {i: alone.complete(p) for i, p in enumerate(PROMPTS)}
    assert batches(server) - before == len(PROMPTS)
    before = batches(server)
    together = dict(client(server, concurrency=len(PROMPTS), temperature=temperature, seed=3)
                    .stream(enumerate(PROMPTS)))
    assert batches(server) - before < len(PROMPTS)  # decoded together
    assert {i: c.text for i, c in together.items()} == {i: c.text for i, c in one_at_a_time.items()}
    for i, c in together.items():
        assert isinstance(c, Completion) and 0 < c.completion_tokens <= 12
        assert c.prompt_tokens == one_at_a_time[i].prompt_tokens
        assert c.finish_reason in ("stop", "length")
    if temperature > 0:  # another seed draws other answers
        other = dict(client(server, concurrency=len(PROMPTS), temperature=temperature, seed=4)
                     .stream(enumerate(PROMPTS)))
        assert {i: c.text for i, c in other.items()} != {i: c.text for i, c in together.items()}


def test_the_server_lists_its_model_and_refuses_bad_requests(server):
    assert client(server).models() == [server.model_name]
    url = server.base_url + "/chat/completions"
    good = {"model": server.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url, json=good, timeout=60).status_code == 200
    cases = {
        "not json": (b"{", 400, "not valid JSON"),
        "no messages": ({**good, "messages": []}, 400, "messages"),
        "content not text": ({**good, "messages": [{"role": "user", "content": 3}]}, 400, "messages"),
        "stream": ({**good, "stream": True}, 400, "stream"),
        "n": ({**good, "n": 2}, 400, "n:"),
        "max_tokens": ({**good, "max_tokens": 0}, 400, "max_tokens"),
        "temperature": ({**good, "temperature": -1}, 400, "temperature"),
        "seed": ({**good, "seed": "x"}, 400, "seed"),
        "another model": ({**good, "model": "gpt-4"}, 404, "not served"),
    }
    for name, (body, status, words) in cases.items():
        r = httpx.post(url, content=body, timeout=60) if isinstance(body, bytes) else \
            httpx.post(url, json=body, timeout=60)
        assert r.status_code == status and words in r.json()["error"]["message"], name


def children_of(pid: int) -> list[int]:
    """Every process descended from `pid` (Linux /proc), or in the process group it started."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stopped_stage_leaves_no_server_and_resumes(model, tmp_path, sig):
    """`slim generate-rationales` serving a model for the run, stopped with SIGTERM (a scheduler,
    `timeout`) or SIGHUP (a closed terminal) mid-stage: no child process is left, the records written
    are whole, and a rerun asks only for the users without one."""
    run = make_dataset(tmp_path / "run")
    out = run / TeacherRationalesStage.name
    records = out / RECORDS
    cmd = [sys.executable, "-m", "slim.cli", "generate-rationales", "--run", str(run), "--serve", str(model),
           "--engine", "transformers", "--client.concurrency", "1", "--client.max-tokens", "24",
           "--format-retries", "0", "--client.temperature", "0", "--users", "20"]  # a seeded sample of the 40
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (records.exists() and records.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no record within 240 s"
        time.sleep(0.2)
    kids = children_of(proc.pid)
    assert kids  # the server it started
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-2000:]
    time.sleep(0.5)
    alive = [k for k in kids if Path(f"/proc/{k}").exists()
             and "zombie" not in Path(f"/proc/{k}/status").read_text().lower()]
    assert alive == []
    lines = records.read_text().splitlines()
    written = [json.loads(line) for line in lines]  # every line whole
    assert 2 <= len(written) < 20
    if sig == signal.SIGHUP:
        return  # the stop is what differs by signal; resuming is the SIGTERM case's (the rerun is most of the time)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    users = [json.loads(line)["user"] for line in records.read_text().splitlines()]
    assert len(set(users)) == len(users) == 20 and users[:len(written)] == [r["user"] for r in written]
    assert len(read_records(records)) == 20


def test_prefix_reuse_answers_as_without_it(model):
    """The shared head of a batch's prompts (system prompt, template) run once and its KV cache copied
    to every row: the same greedy and seeded sampled answers and token counts as without it."""
    from slim.local import LocalGenerator, shared_prefix

    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2], [1, 2]]) == 1  # each row keeps a token of its own
    assert shared_prefix([[7], [1, 2]]) == 0
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    for temperature in (0.0, 0.9):
        runs = [LocalGenerator(model, batch_size=8, prefix_reuse=reuse)
                .generate_chats(chats, 12, [temperature] * len(chats), [5] * len(chats)) for reuse in (True, False)]
        assert [(c.text, c.prompt_tokens, c.completion_tokens) for c in runs[0]] == \
            [(c.text, c.prompt_tokens, c.completion_tokens) for c in runs[1]]
