"""`fusion run` end to end on tiny models: killed mid-stage, rerun, nothing finished is redone."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from eval.assets import smollm2_path
from fusion.pipeline import build_stages, run_pipeline
from slim.records import read_records
from tests.slim_fake_openai import FakeOpenAI

USERS = 12  # teacher rationales: slow enough (fake server delay) to be killed in the middle
FINISHED = ("data", "sasrec", "slmrec-teacher", "slmrec-student")  # the stages before them

PRESET = """
[data]
source = "{source}"
rating_gt = 0.0
user_core = 1
item_core = 1
negatives = [10]

[sasrec]
hidden = 16
layers = 1
[sasrec.train]
epochs = 2
max_len = 10

[slmrec-teacher.model]
llama = {{ vocab_size = 300, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 4, num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 128 }}
layers = 4
lora_r = 4
[slmrec-teacher.train]
epochs = 1.0
batch_size = 16
max_len = 8
evals_per_epoch = 1

[slmrec-student.student]
layers = 2
lora_r = 4
[slmrec-student.distill]
blocks = 2
[slmrec-student.train]
epochs = 1.0
batch_size = 16
max_len = 8
evals_per_epoch = 1

[slim-teacher-rationales]
users = {users}
[slim-teacher-rationales.client]
base_url = "{url}"
model = "fake-teacher"
concurrency = 1
max_tokens = 32

[slim-student]
base_model = "{lm}"
epochs = 1.0
batch_size = 4
max_length = 256

[slim-student-rationales]      # the fine-tuned tiny student writes noise: read its answers from the fake endpoint
backend = "endpoint"
[slim-student-rationales.client]
base_url = "{url}"
model = "fake-student"
max_tokens = 32

[fusion.hybrid-slmrec-student]
mode = "hybrid"
backbone = "slmrec-student"
[fusion.hybrid-slmrec-student.train]
epochs = 2
[fusion.text]
mode = "text"
hidden = 8
[fusion.text.train]
epochs = 2
"""


def tiny_lm(folder: Path, **config: float) -> Path:
    """A random 2-layer LLaMA with the SmolLM2 tokenizer and chat template; `config` overrides LlamaConfig."""
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      **config)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def stages(run: Path) -> list[dict]:
    path = run / "pipeline.json"
    return json.loads(path.read_text())["stages"] if path.exists() else []


def test_killed_run_resumes_without_redoing_finished_stages(synthetic, tmp_path):
    run = tmp_path / "run"
    with FakeOpenAI(delay_s=0.4) as server:
        preset = tmp_path / "tiny.toml"
        preset.write_text(PRESET.format(source=synthetic, url=server.base_url, users=USERS,
                                        lm=tiny_lm(tmp_path / "lm")))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
        proc = subprocess.Popen([sys.executable, "-m", "fusion.cli", "run", "--run", str(run), "--preset", str(preset)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 600
        while len(stages(run)) < 4 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert [s["stage"] for s in stages(run)][-1] == "slmrec-student", proc.stderr.read().decode()[-2000:]
        while len(server.requests) < 3 and time.time() < deadline:  # in the middle of the teacher rationales
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = stages(run)
        assert len(first) == 4
        created = {d: json.loads((run / d / "manifest.json").read_text())["created"]
                   for d in FINISHED}
        partial = len(read_records(run / "slim-teacher-rationales" / "records.jsonl"))
        assert 0 < partial < USERS

        run_pipeline(run, build_stages(run, str(preset)))
        asked = sum(r["body"]["model"] == "fake-teacher" for r in server.requests)

    second = stages(run)[4:]
    status = {s["stage"]: s["status"] for s in second}
    assert all(status[s] == "up to date" for s in FINISHED)
    assert status["slim-teacher-rationales"] == "ran" and status["report"] == "ran"
    for d, stamp in created.items():
        assert json.loads((run / d / "manifest.json").read_text())["created"] == stamp
    lines = (run / "slim-teacher-rationales" / "records.jsonl").read_text().splitlines()
    users = [json.loads(line)["user"] for line in lines]
    assert sorted(users) == sorted(set(users)) and len(users) == USERS
    assert asked <= USERS + 1   # only the request in flight at the kill can be asked twice
    report = json.loads((run / "report" / "metrics.json").read_text())
    assert set(report["efficiency"]) == {"sasrec", "slmrec-teacher", "slmrec-student", "fusion/hybrid-slmrec-student",
                                         "fusion/text"}
    assert "## Rationale quality" in (run / "report" / "report.md").read_text()  # the quality stage's section

    run_pipeline(run, build_stages(run, str(preset)))   # a third run has nothing left to do
    assert {s["status"] for s in stages(run)[4 + len(second):]} == {"up to date"}


def test_sigterm_to_the_pipeline_stops_the_server_it_started_and_resumes(synthetic, tmp_path):
    """`fusion run` stopped with SIGTERM while its teacher stage serves a model (the transformers
    batching server): exit 143, no child process left, the records written are whole, and a rerun
    finishes the stage with one record per user."""
    from tests.test_batch_server import children_of

    run, users = tmp_path / "run", 20  # a seeded sample of the 40 (fewer to generate on the rerun)
    lm = tiny_lm(tmp_path / "lm", initializer_range=0.2)
    text = PRESET.format(source=synthetic, url="http://127.0.0.1:9/v1", users=users, lm=lm)
    served = text.replace('[slim-teacher-rationales.client]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "fake-teacher"',
                          f'serve = "{lm}"\nengine = "transformers"\nformat_retries = 0\n'
                          f'[slim-teacher-rationales.client]\nmodel = ""\ntemperature = 0.0')
    assert served != text
    preset = tmp_path / "served.toml"
    preset.write_text(served)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "fusion.cli", "run", "--run", str(run), "--preset", str(preset),
           "--until", "slim-teacher-rationales"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    records = run / "slim-teacher-rationales" / "records.jsonl"
    deadline = time.time() + 600
    while not (records.exists() and records.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    kids = children_of(proc.pid)
    assert kids  # the teacher's server
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    time.sleep(0.5)
    assert [k for k in kids if Path(f"/proc/{k}").exists()
            and "zombie" not in Path(f"/proc/{k}/status").read_text().lower()] == []
    written = [json.loads(line) for line in records.read_text().splitlines()]  # every line whole
    assert 2 <= len(written) < users
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    done = [json.loads(line)["user"] for line in records.read_text().splitlines()]
    assert len(done) == len(set(done)) == users and {r["user"] for r in written} <= set(done)
