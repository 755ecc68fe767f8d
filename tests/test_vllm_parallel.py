"""vLLM's own data and tensor parallelism (`data_parallel_size`, `tensor_parallel_size`) for the student's
rationales (offline) and a served model (teacher, student endpoint, `slim serve`).

Everywhere: the server's argv and the CPU core groups, the settings' plumbing into the stages, and the
one-line refusals naming the setting. Where vLLM runs on at least 2 cores (slow: one engine start
each, 1-2 min on 2 shared cores): 2 data-parallel engines offline (vLLM's AsyncLLM) and served
(`--data-parallel-size 2`, both engines answering), and 2 tensor-parallel ranks, each giving the
greedy float32 answers of one engine on a tiny random LLaMA.
"""
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from eval.errors import InputError
from eval.stage import run_stage
from slim.client import ChatClient, ClientConfig, Completion
from slim.engine import VllmStatus, vllm_status
from slim.rationales import RationaleConfig
from slim.student import StudentRationalesConfig, StudentRationalesStage
from slim.vllm_setup import BIND, allowed_cpus, apply_cpu_env, check_parallel, cpu_env, cpu_groups, serve_command

ROOT = Path(__file__).resolve().parents[1]
CPU = VllmStatus(True, "test", "cpu")
CORES = len(allowed_cpus())
PROMPTS = ["User history: Fargo (1996); Crime", "User history: Toy Story (1995); Animation", "Hello", "Step 1?",
           "Recommend a film", "Step 2: Drama, Comedy."]


def model_folder(root: Path, heads: int = 2, kv_heads: int = 1) -> Path:
    """A model folder's config.json alone (the argv and the checks read nothing else)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": heads,
                                                  "num_key_value_heads": kv_heads, "max_position_embeddings": 512}))
    return root


def test_core_groups_one_per_rank():
    assert cpu_groups([0, 1], 1) == "0-1" and cpu_groups([0, 1], 2) == "0|1"
    assert cpu_groups([0, 1, 2, 3], 2) == "0-1|2-3" and cpu_groups([4, 5, 6], 2) == "4|5-6"
    assert cpu_groups(range(8), 4) == "0-1|2-3|4-5|6-7"


def test_server_argv_and_cpu_env_carry_the_sizes(tmp_path, monkeypatch):
    monkeypatch.delenv(BIND, raising=False)
    model = model_folder(tmp_path / "m")
    cmd, env = serve_command(CPU, model, None, "127.0.0.1", 8000, "m")
    assert "--data-parallel-size" not in cmd and "--tensor-parallel-size" not in cmd
    assert env[BIND] == cpu_groups(allowed_cpus(), 1)  # one rank: every core, as before
    if CORES < 2:
        pytest.skip("one core: no two ranks")
    cmd, env = serve_command(CPU, model, None, "127.0.0.1", 8000, "m", data_parallel_size=2)
    assert cmd[cmd.index("--data-parallel-size") + 1] == "2" and "--tensor-parallel-size" not in cmd
    assert env[BIND] == cpu_groups(allowed_cpus(), 2) and len(env[BIND].split("|")) == 2
    cmd, env = serve_command(CPU, model, None, "127.0.0.1", 8000, "m", tensor_parallel_size=2)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and "--data-parallel-size" not in cmd
    assert len(env[BIND].split("|")) == 2
    gpu = VllmStatus(True, "test", "cuda")
    gpu_cmd, gpu_env = serve_command(gpu, model, None, "h", 1, "m", dtype="bfloat16")
    assert BIND not in gpu_env and "--data-parallel-size" not in gpu_cmd  # no CPU binding on a GPU
    import torch

    gpus = torch.cuda.device_count()
    more = max(gpus + 1, 2)
    with pytest.raises(InputError, match=rf"^data_parallel_size = {more}: {more} vLLM ranks need a GPU each; "
                                         rf"{gpus} visible here$"):
        serve_command(gpu, model, None, "h", 1, "m", data_parallel_size=more)


def test_an_engine_in_this_process_gets_the_core_groups_of_its_sizes(monkeypatch):
    """apply_cpu_env replaces the groups it set for an earlier engine; a user's own setting stays."""
    monkeypatch.delenv(BIND, raising=False)
    apply_cpu_env()
    assert os.environ[BIND] == cpu_groups(allowed_cpus(), 1)
    if CORES >= 2:
        apply_cpu_env(data_parallel_size=2)
        assert os.environ[BIND] == cpu_groups(allowed_cpus(), 2)
    monkeypatch.setenv(BIND, "0")
    apply_cpu_env()
    assert os.environ[BIND] == "0"


def test_what_vllm_would_refuse_is_one_line_naming_the_setting(tmp_path, monkeypatch):
    monkeypatch.delenv(BIND, raising=False)
    smol = model_folder(tmp_path / "smol", heads=9, kv_heads=3)  # SmolLM2-135M's heads
    with pytest.raises(InputError, match=r"^tensor_parallel_size = 2 does not divide the 9 attention heads of smol"):
        check_parallel(CPU, smol, tensor_parallel_size=2)
    with pytest.raises(InputError, match=r"^tensor_parallel_size = 3 neither divides nor is a multiple of the 2 "):
        check_parallel(CPU, model_folder(tmp_path / "kv", heads=6, kv_heads=2), tensor_parallel_size=3)
    too_many = CORES + 1
    with pytest.raises(InputError, match=rf"^data_parallel_size = {too_many}: {too_many} vLLM ranks on CPU need a core "
                                         rf"each; this process may use {CORES}$"):
        check_parallel(CPU, smol, data_parallel_size=too_many)
    with pytest.raises(InputError, match="data_parallel_size: expected at least 1, got 0"):
        check_parallel(CPU, smol, data_parallel_size=0)
    if CORES >= 2:
        with pytest.raises(InputError, match=rf"data_parallel_size = 2: {BIND}=0-1 binds 1 core group\(s\); 2 vLLM "
                                             r"ranks need 2, separated by '\|'"):
            cpu_env({BIND: "0-1"}, data_parallel_size=2)
    with pytest.raises(InputError, match="data_parallel_size = 2 is vLLM's; the transformers engine"):
        RationaleConfig(serve="embedded", engine="transformers", data_parallel_size=2)
    with pytest.raises(InputError, match="tensor_parallel_size: expected at least 1, got 0"):
        RationaleConfig(serve="embedded", tensor_parallel_size=0)
    with pytest.raises(InputError, match="data_parallel_size = 2: no model is served for the run .*give "
                                         "client.base_url a list"):
        RationaleConfig(data_parallel_size=2)  # the teacher's endpoint is someone else's server
    with pytest.raises(InputError, match="no model is served or loaded for the run"):
        StudentRationalesConfig(backend="endpoint", data_parallel_size=2, client=ClientConfig(base_url="http://h/v1"))
    StudentRationalesConfig(backend="endpoint", data_parallel_size=2)  # served for the run: fine
    StudentRationalesConfig(backend="local", tensor_parallel_size=2)


@pytest.mark.skipif(not vllm_status().ok, reason=f"vLLM cannot run here: {vllm_status().reason}")
def test_slim_serve_refusal_is_one_line(tmp_path):
    """`slim serve` on SmolLM2-135M (9 heads) with --tensor-parallel-size 2: exit 1, one line, no traceback,
    nothing started."""
    from eval.assets import smollm2_path

    cmd = [sys.executable, "-m", "slim.cli", "serve", "--model", str(smollm2_path()), "--tensor-parallel-size", "2"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == ("error: tensor_parallel_size = 2 does not divide the 9 attention "
                                                 f"heads of {Path(smollm2_path()).name} (vLLM splits them evenly "
                                                 "over the ranks)")


class Recorder:
    """Stands in for the engines a stage starts: what it was asked for, and answers like the fake server."""

    def __init__(self, calls: list):
        self.calls = calls

    def generator(self, *args, **kwargs):
        self.calls.append(("make_generator", kwargs))
        return FakeGen()

    @contextmanager
    def endpoint(self, client, serve=None, adapter=None, log_path=None, **kwargs):
        self.calls.append(("endpoint", kwargs))
        yield FakeGen(), "vllm"


class FakeGen:
    engine, model_name = "vllm", "fake"

    def stream(self, jobs, attempt=0):
        for key, prompt in jobs:
            yield key, Completion("Step 1: Fargo.\nStep 2: Drama.\nStep 3: Movie 1.", 5, 9, 0.01, "stop")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.mark.parametrize("backend", ["local", "endpoint"])
def test_the_student_stage_passes_the_sizes_to_vllm(backend, tmp_path, monkeypatch):
    """Offline (make_generator -> VllmGenerator) and served for the run (endpoint -> Server): the sizes
    reach vLLM and ask for it (engine auto -> vllm); sizes of 1 leave the engine choice as it was."""
    import slim.local
    import slim.serve
    from slim.finetune import SlimStudentStage
    from tests.slim_fake_openai import make_dataset

    calls: list = []
    rec = Recorder(calls)
    monkeypatch.setattr(slim.local, "make_generator", rec.generator)
    monkeypatch.setattr(slim.serve, "endpoint", rec.endpoint)
    monkeypatch.setattr("slim.engine.vllm_status", lambda: CPU)
    run = make_dataset(tmp_path / "run")
    (run / SlimStudentStage.name).mkdir()
    (run / SlimStudentStage.name / "adapter_config.json").write_text("{}")
    cfg = StudentRationalesConfig(backend=backend, users=4, data_parallel_size=2)
    counts = run_stage(StudentRationalesStage(run, cfg)).counts
    assert counts["complete"] == 4 and counts["engine"] == "vllm"
    kind, kwargs = calls[-1]
    if backend == "local":
        assert kind == "make_generator" and kwargs["engine"] == "vllm"
        assert kwargs["data_parallel_size"] == 2 and kwargs["tensor_parallel_size"] == 1
    else:
        assert kind == "endpoint" and kwargs == {"engine": "auto", "data_parallel_size": 2, "tensor_parallel_size": 1}
    run_stage(StudentRationalesStage(run, replace(cfg, data_parallel_size=1, users=6)))
    kind, kwargs = calls[-1]
    assert kwargs.get("engine") == "auto" and kwargs.get("data_parallel_size", 1) == 1


def test_the_teacher_stage_passes_the_sizes_to_its_server(tmp_path, monkeypatch):
    import slim.serve
    from slim.rationales import TeacherRationalesStage
    from tests.slim_fake_openai import make_dataset

    calls: list = []
    monkeypatch.setattr(slim.serve, "endpoint", Recorder(calls).endpoint)
    run = make_dataset(tmp_path / "run")
    cfg = RationaleConfig(serve="embedded", users=3, tensor_parallel_size=2,
                          client=ClientConfig(base_url="", model="m"))
    assert run_stage(TeacherRationalesStage(run, cfg)).counts["complete"] == 3
    assert calls == [("endpoint", {"engine": "auto", "data_parallel_size": 1, "tensor_parallel_size": 2})]


# --- real engines -------------------------------------------------------------------------------------

STATUS = vllm_status()
engines = pytest.mark.skipif(not STATUS.ok or CORES < 2, reason=f"vLLM cannot run here ({STATUS.reason}) or "
                                                                f"fewer than 2 cores ({CORES})")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer LLaMA (2 attention heads, 1 key-value head: tensor parallel 2 is possible) with
    the SmolLM2 tokenizer and chat template; a 1 GiB KV cache per engine."""
    from tests.test_vllm import save_tiny_llama

    root = tmp_path_factory.mktemp("vllm-parallel")
    save_tiny_llama(root / "model")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(BIND, raising=False)  # engines started by other modules' tests leave their core groups behind
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.setenv("RATIONALE_REC_CACHE", str(root / "cache"))
        yield {"model": root / "model", "root": root}


@pytest.fixture(scope="module")
def reference(tiny):
    """Greedy float32 answers of the transformers path: every parallel vLLM layout in float32 must give
    the same (and no engine start-up is spent on a reference)."""
    from slim.local import make_generator

    with make_generator(tiny["model"], None, max_new_tokens=8, temperature=0.0, engine="transformers") as gen:
        return [c.text for c in gen.generate(PROMPTS)]


@engines
@pytest.mark.slow
def test_two_data_parallel_engines_offline(tiny, reference):
    """data_parallel_size = 2 offline: two engine processes (vLLM's AsyncLLM), every key answered once,
    the one engine's greedy answers; a stream closed early leaves the engines working."""
    from slim.vllm_offline import VllmGenerator

    with VllmGenerator(tiny["model"], max_new_tokens=8, dtype="float32", data_parallel_size=2) as gen:
        assert gen.dp is not None and gen.llm is None
        assert gen.dp.engine.vllm_config.parallel_config.data_parallel_size == 2
        results = dict(gen.stream((f"u{i}", p) for i, p in enumerate(PROMPTS * 3)))
        assert sorted(results) == sorted(f"u{i}" for i in range(len(PROMPTS) * 3))
        assert all(isinstance(c, Completion) and 0 < c.completion_tokens <= 8 for c in results.values())
        assert [results[f"u{i}"].text for i in range(len(PROMPTS))] == reference
        assert [c.text for c in gen.generate(PROMPTS)] == reference
        stream = gen.stream(enumerate(PROMPTS * 4))
        next(stream)
        stream.close()
        assert [c.text for c in gen.generate(PROMPTS[:2])] == reference[:2]


@engines
@pytest.mark.slow
def test_two_data_parallel_engines_served(tiny, reference):
    """A served model with data_parallel_size = 2 (`--data-parallel-size 2`): the project's client gets
    the one engine's greedy answers, and vLLM's metrics show both engines answering."""
    import urllib.request

    from slim.serve import Server

    with Server(tiny["model"], backend="auto", dtype="float32", log_path=tiny["root"] / "dp2.log",
                data_parallel_size=2) as server:
        assert server.backend == "vllm"
        client = ChatClient(ClientConfig(base_url=server.base_url, model=server.model_name, temperature=0.0,
                                         max_tokens=8, concurrency=8, max_retries=0, timeout_s=300))
        results = dict(client.stream(enumerate(PROMPTS * 3)))
        metrics = urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/metrics", timeout=30).read().decode()
    assert sorted(results) == list(range(len(PROMPTS) * 3))
    assert [results[i].text.strip() for i in range(len(PROMPTS))] == reference
    done = {}
    for line in metrics.splitlines():
        if line.startswith("vllm:request_success_total{") and 'engine="' in line:
            engine = line.split('engine="')[1].split('"')[0]
            done[engine] = done.get(engine, 0) + float(line.rsplit(" ", 1)[1])
    assert set(done) == {"0", "1"} and all(n > 0 for n in done.values()), done
    assert sum(done.values()) == len(PROMPTS) * 3 + 1  # and the readiness ping
    assert "EngineCore_DP1" in (tiny["root"] / "dp2.log").read_text()


@engines
@pytest.mark.slow
def test_two_tensor_parallel_ranks_offline(tiny, reference):
    """tensor_parallel_size = 2 offline (vllm.LLM over 2 ranks, gloo on CPU): every key answered; on this
    model in float32 the one engine's greedy answers."""
    from slim.vllm_offline import VllmGenerator

    with VllmGenerator(tiny["model"], max_new_tokens=8, dtype="float32", tensor_parallel_size=2) as gen:
        assert gen.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
        texts = [c.text for c in gen.generate(PROMPTS)]
    assert texts == reference
