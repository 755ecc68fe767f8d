"""The endpoint client over several base URLs (vLLM's external data parallelism: one server per GPU or
node): two real HTTP servers on 127.0.0.1 (tests/slim_fake_openai.py), requests spread over them,
a failing or dead one's retries answered by the other, and every user with exactly one record, also
after a run killed mid-way and resumed."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from eval.errors import InputError
from eval.io import read_json
from eval.stage import run_stage
from slim.client import ChatClient, ClientConfig
from slim.rationales import RationaleConfig, TeacherRationalesStage, sample_users
from tests.slim_fake_openai import SERVED_MODEL, FakeOpenAI, make_dataset, run_with_data

ROOT = Path(__file__).resolve().parents[1]
OUT = TeacherRationalesStage.name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("multi-url"))


@pytest.fixture
def run(data, tmp_path):
    return run_with_data(data, tmp_path / "run")


def config(urls, **kw) -> RationaleConfig:
    client = ClientConfig(base_url=urls, model="fake-teacher", timeout_s=0.5, max_retries=4, concurrency=4)
    return RationaleConfig(client=client, **kw)


def records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / OUT / "records.jsonl").read_text().splitlines()]


def one_per_user(run: Path, n: int | None = None) -> None:
    """Exactly one record for each user of the run's sample (all 40, or a seeded `n`)."""
    users = [r["user"] for r in records(run)]
    assert sorted(users) == sample_users(40, n, 42), Counter(users).most_common(3)


def dead_url() -> str:
    """A base URL where nothing listens (connections refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_urls_are_a_list_or_comma_separated_each_once():
    assert ClientConfig(base_url="http://a/v1").urls == ["http://a/v1"]
    assert ClientConfig(base_url="http://a/v1, http://b/v1,").urls == ["http://a/v1", "http://b/v1"]
    assert ClientConfig(base_url=["http://a/v1", "http://b/v1", "http://a/v1"]).urls == ["http://a/v1", "http://b/v1"]
    with pytest.raises(InputError, match="client.base_url: no endpoint given"):
        ChatClient(ClientConfig(base_url=[], model="m"))
    from eval.config import from_dict   # a preset's list and a command line's text both pass the type check

    assert from_dict(ClientConfig, {"base_url": ["http://a/v1", "http://b/v1"]}).urls == ["http://a/v1", "http://b/v1"]
    assert from_dict(ClientConfig, {"base_url": "http://a/v1,http://b/v1"}).urls == ["http://a/v1", "http://b/v1"]


def test_requests_are_spread_over_two_servers_one_record_per_user(run):
    with FakeOpenAI(delay_s=0.05) as a, FakeOpenAI(delay_s=0.05) as b:
        summary = run_stage(TeacherRationalesStage(run, config([a.base_url, b.base_url]))).counts
    one_per_user(run)
    assert summary["complete"] == 40 and summary["failed"] == 0 and summary["written"] == 40
    assert len(a.requests) + len(b.requests) == 40 and len(a.requests) >= 10 and len(b.requests) >= 10
    assert summary["endpoints"] == {a.base_url: {"answered": len(a.requests), "failed": 0},
                                    b.base_url: {"answered": len(b.requests), "failed": 0}}


def test_the_less_busy_server_gets_more_requests(run):
    """Least in flight, not strict turns: a server 10x slower than the other answers fewer requests."""
    with FakeOpenAI(delay_s=0.3) as slow, FakeOpenAI(delay_s=0.03) as fast:
        cfg = config([slow.base_url, fast.base_url], users=24)
        run_stage(TeacherRationalesStage(run, replace(cfg, client=replace(cfg.client, timeout_s=5.0))))
    one_per_user(run, 24)
    assert len(fast.requests) > 2 * len(slow.requests) and len(slow.requests) >= 1


def test_a_failing_servers_retries_go_to_the_other(run):
    """Server A answers every request with a 500, a 429 or a timeout; B answers: every user gets one
    record, all of them B's, and A, resting after each failure, is tried far less than B."""
    faults = ["500", "429", "timeout"] * 100
    with FakeOpenAI(faults=faults, sleep_s=1.0) as a, FakeOpenAI(delay_s=0.02) as b:
        summary = run_stage(TeacherRationalesStage(run, config([a.base_url, b.base_url]))).counts
    one_per_user(run)
    assert summary["complete"] == 40 and summary["failed"] == 0
    assert len(b.requests) == 40 and all(r["fault"] is not None for r in a.requests)
    assert 1 <= len(a.requests) < 40 and summary["endpoints"][a.base_url] == {"answered": 0, "failed": len(a.requests)}


def test_a_dead_servers_retries_go_to_the_other(run):
    down = dead_url()
    with FakeOpenAI() as b:
        summary = run_stage(TeacherRationalesStage(run, config([down, b.base_url]))).counts
    one_per_user(run)
    assert summary["complete"] == 40 and len(b.requests) == 40
    assert 1 <= summary["endpoints"][down]["failed"] < 40 and summary["endpoints"][down]["answered"] == 0


def test_both_failing_gives_up_then_the_next_run_fills_in(run):
    """Both servers fail a user's every try: that user gets no record (exit 1), the rerun asks only for it."""
    with FakeOpenAI(faults=["500"] * 2) as a, FakeOpenAI(faults=["500"] * 2) as b:
        cfg = config([a.base_url, b.base_url], users=3)
        cfg = replace(cfg, client=replace(cfg.client, concurrency=1, max_retries=1))
        with pytest.raises(InputError, match=f"{OUT}: 2 users have no record"):
            run_stage(TeacherRationalesStage(run, cfg))
        first = read_json(run / OUT / "manifest.json")["counts"]
        second = run_stage(TeacherRationalesStage(run, cfg)).counts
    assert first["failed"] == 2 and first["complete"] == 1
    assert second["written"] == 2 and second["done_before"] == 1 and second["complete"] == 3
    one_per_user(run, 3)


def test_the_served_model_is_asked_of_every_url(run):
    with FakeOpenAI() as a, FakeOpenAI() as b:
        chat = ChatClient(ClientConfig(base_url=[dead_url(), a.base_url, b.base_url], model=""))
        assert chat.model_name == SERVED_MODEL and a.model_lists == 1 and b.model_lists == 1
    with FakeOpenAI() as a, FakeOpenAI(model="another-model") as b:
        with pytest.raises(InputError, match=f"{a.base_url} serves {SERVED_MODEL} but {b.base_url} serves "
                                             "another-model"):
            ChatClient(ClientConfig(base_url=[a.base_url, b.base_url], model=""))
    with pytest.raises(InputError, match="cannot list the served models"):
        ChatClient(ClientConfig(base_url=[dead_url(), dead_url()], model="", max_retries=0))


@pytest.mark.slow  # a CLI process: ~30 s on 2 cores
def test_killed_run_over_two_urls_resumes_with_one_record_per_user(run):
    """`--client.base-url A,B` on the command line; the run killed mid-way (and a torn last line) resumes
    over the same two servers without losing or repeating a user."""
    out = run / OUT / "records.jsonl"
    with FakeOpenAI(delay_s=0.15) as a, FakeOpenAI(delay_s=0.15) as b:
        cmd = [sys.executable, "-m", "slim.cli", "generate-rationales", "--run", str(run),
               "--client.base-url", f"{a.base_url},{b.base_url}", "--client.model", "fake-teacher",
               "--client.concurrency", "2"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 120
        while not (out.exists() and len(out.read_bytes().splitlines()) >= 8):
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = out.read_text().splitlines()
        with open(out, "a") as f:
            f.write('{"user": 39, "prompt_version": "slim_tea')
        asked_before = len(a.requests) + len(b.requests)
        summary = run_stage(TeacherRationalesStage(run, config([a.base_url, b.base_url]))).counts
    assert 8 <= len(before) < 40 and out.read_text().splitlines()[:len(before)] == before
    one_per_user(run)
    assert summary["done_before"] == len(before) and summary["written"] == 40 - len(before)
    assert asked_before >= 8 and min(len(a.requests), len(b.requests)) >= 4   # both servers took part
