"""vLLM as the generation engine where it runs and is the faster one, transformers elsewhere.

One probe (`vllm_status`, a subprocess so a broken vLLM cannot take this process down) says whether
vLLM imports here and on which device; `engine_choice` turns a request (auto | vllm | transformers)
into an engine, a dtype and a one-line reason (`slim.hardware.choose`: vLLM only where it is the
faster engine, bf16 only where it is native) that is printed, so a run always says which engine wrote it.

`VllmGenerator` is in-process offline generation with the `Generator` interface of
`slim.local.LocalGenerator` (`stream(jobs)` -> (key, Completion) as each request finishes), so a
generation run can use either. `slim.serve.Server` uses `serve_command` for the server.

What vLLM needs here, handled once:
- a model folder whose `config.json` still carries the GGUF `quantization_config` of the cached
  SmolLM2 (its weights are plain float32) is refused by vLLM: `servable_model_dir` gives a copy
  without it (symlinks to the weights, a cleaned `config.json`);
- on CPU a LoRA adapter forces eager mode and runs at half the speed of transformers: the merged
  model (`slim.lora.merged_dir`) is used instead; on a GPU the adapter is loaded with LoRA support;
- on CPU vLLM sizes its KV cache from `VLLM_CPU_KVCACHE_SPACE` (GiB) and binds its OpenMP threads
  from `VLLM_CPU_OMP_THREADS_BIND`: `cpu_env` sets both (and no reserved core) unless already set;
- on CPU a seeded sampling request whose prompt is split over two engine steps (chunked prefill)
  kills the engine ("CPU Generator does not use offset": vLLM rewinds the request's generator as on a
  GPU): `cpu_scheduler_args` turns chunked prefill off, with a step budget that holds a whole prompt;
- bf16 where the CPU has it natively (AVX-512 BF16: 1.8x float32 vLLM; 61-72% of greedy student
  outputs identical to float32 transformers, float32 vLLM: all of them), float32 elsewhere (emulated
  bf16 is 60x slower); eager mode on CPU (torch.compile costs minutes of start-up for 1.15-1.5x).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from eval.errors import InputError

from .client import Completion
from .hardware import EngineChoice, choose, detect, generation_dtype

ENGINES = ("auto", "vllm", "transformers")
LORA_NAME = "student"  # the name a served or offline LoRA adapter is requested by
SUPPORTED_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}

_PROBE = ("import json, vllm\n"
          "from vllm.platforms import current_platform as p\n"
          "print(json.dumps({'version': getattr(vllm, '__version__', '?'), 'device': p.device_type or ''}))\n")


@dataclass(frozen=True)
class VllmStatus:
    ok: bool
    reason: str
    device: str = ""       # "cpu", "cuda", ... ("" when vLLM does not run)
    version: str = ""

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"


@functools.lru_cache(maxsize=None)
def vllm_status(python: str = sys.executable) -> VllmStatus:
    """Whether vLLM imports in `python` and finds a device; probed once per interpreter, in a
    subprocess (an import can take seconds, fail on a mismatched torchvision, or abort)."""
    if python == sys.executable and importlib.util.find_spec("vllm") is None:
        return VllmStatus(False, "vllm is not installed")
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "VLLM_NO_USAGE_STATS": "1"}
    try:
        p = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        return VllmStatus(False, "vllm import timed out (300 s)")
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {p.returncode}"
        if "not installed" in why or "No module named 'vllm'" in why:
            return VllmStatus(False, "vllm is not installed")
        return VllmStatus(False, f"vllm is installed but does not import ({why[:200]})")
    try:
        info = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return VllmStatus(False, "vllm import printed nothing usable")
    if not info["device"]:
        return VllmStatus(False, f"vllm {info['version']} finds no device it supports (a GPU build on a CPU "
                                 f"machine? install vllm-cpu)", version=info["version"])
    return VllmStatus(True, f"vllm {info['version']} imports and runs on {info['device']}", info["device"],
                      info["version"])


def engine_choice(engine: str = "auto", work_tokens: int | None = None) -> EngineChoice:
    """The engine and dtype for a request (auto | vllm | transformers) on this machine, for a job of
    at most `work_tokens` completion tokens (None: a server): vLLM where it runs and is the faster
    engine here (`slim.hardware.choose`); vllm where it cannot run is an error."""
    if engine not in ENGINES:
        raise InputError(f"unknown generation engine '{engine}' (choose {', '.join(ENGINES)})")
    if engine == "transformers":  # no need to probe vLLM
        return choose(engine, detect(), False, "")
    status = vllm_status()
    return choose(engine, detect(), status.ok, status.reason, status.device, work_tokens)


def announce(what: str, engine: str, why: str, detail: str = "") -> None:
    """The one line that says which engine does the work and why (stderr, so stdout stays parseable)."""
    print(f"{what}: {engine}{f' ({detail})' if detail else ''} - {why}", file=sys.stderr, flush=True)


def _cpu_ranges(cpus: Iterable[int]) -> str:
    """{0,1,2,5} -> '0-2,5' (the format of VLLM_CPU_OMP_THREADS_BIND)."""
    out: list[list[int]] = []
    for c in sorted(cpus):
        if out and c == out[-1][1] + 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in out)


def cpu_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default os.environ) plus vLLM's CPU settings where unset: a 2 GiB KV cache, OpenMP
    threads bound to every core this process may use, none reserved (1.7x the default on 2 cores)."""
    env = dict(os.environ if env is None else env)
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        cpus = set(range(os.cpu_count() or 1))
    for key, value in {**CPU_DEFAULTS, "VLLM_CPU_OMP_THREADS_BIND": _cpu_ranges(cpus)}.items():
        env.setdefault(key, value)
    return env


def cpu_scheduler_args(model_dir: str | Path) -> dict[str, Any]:
    """vLLM engine arguments for CPU: no chunked prefill (seeded sampling of a split prompt crashes the
    CPU engine), so a step must hold a whole prompt: a budget of the model's context length (at least
    vLLM's default of 2,048 tokens)."""
    from eval.io import read_json

    context = int(read_json(Path(model_dir) / "config.json").get("max_position_embeddings") or 0)
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(context, 2048)}


def gguf_quantized(model_dir: str | Path) -> bool:
    """Whether config.json carries a GGUF quantization_config (left over on de-quantized weights)."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.exists():
        return False
    quant = json.loads(cfg.read_text()).get("quantization_config") or {}
    return isinstance(quant, dict) and quant.get("quant_method") == "gguf"


def servable_model_dir(model_dir: str | Path, cache: str | Path | None = None) -> Path:
    """`model_dir` itself, or, when its config.json carries a GGUF quantization_config (which vLLM
    refuses), a cached copy without it: symlinks to every other file, a cleaned config.json. The
    copy is keyed by the folder and its config, so it follows a changed model."""
    from eval.assets import cache_dir
    from eval.io import atomic_dir

    src = Path(model_dir).resolve()
    if not gguf_quantized(src):
        return src
    text = (src / "config.json").read_text()
    key = hashlib.sha256(f"{src}\n{text}".encode()).hexdigest()[:12]
    out = Path(cache or cache_dir() / "vllm-models") / f"{src.name}-{key}"
    if (out / "config.json").exists():
        return out
    config = json.loads(text)
    del config["quantization_config"]
    with atomic_dir(out) as tmp:
        for f in src.iterdir():
            if f.name != "config.json":
                (tmp / f.name).symlink_to(f)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def lora_rank(adapter: str | Path) -> int:
    """The smallest LoRA rank vLLM supports that holds the adapter's rank."""
    from eval.io import read_json

    r = int(read_json(Path(adapter) / "adapter_config.json")["r"])
    return next((s for s in SUPPORTED_LORA_RANKS if s >= r), r)


def model_to_load(status: VllmStatus, model_path: str | Path | None,
                  adapter: str | Path | None) -> tuple[Path, Path | None]:
    """(model folder vLLM loads, adapter it applies or None): on CPU the merged adapter, on a GPU the
    (cleaned) base with the adapter on top."""
    from .lora import adapter_base, merged_dir

    if adapter and status.cpu:
        return servable_model_dir(merged_dir(adapter, model_path)), None
    base = model_path or adapter_base(adapter)
    if not Path(base).exists():
        raise InputError(f"{base}: model folder not found")
    return servable_model_dir(base), (Path(adapter) if adapter else None)


def serve_command(status: VllmStatus, model_path: str | Path | None, adapter: str | Path | None, host: str,
                  port: int, served_name: str, python: str = sys.executable, dtype: str | None = None,
                  prefix_caching: bool = True, extra_args: Iterable[str] = ()) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of an OpenAI-compatible vLLM server. `python -m vllm.entrypoints.openai.api_server`
    from this interpreter: vllm-cpu's `vllm` console script dies looking up a package named vllm."""
    model, lora = model_to_load(status, model_path, adapter)
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", host,
           "--port", str(port), "--served-model-name", served_name, "--generation-config", "vllm"]
    if lora is not None:
        cmd += ["--enable-lora", "--lora-modules", f"{LORA_NAME}={lora}", "--max-lora-rank", str(lora_rank(lora))]
    if status.cpu:
        cmd += ["--dtype", dtype or generation_dtype(detect()), "--enforce-eager", "--no-enable-chunked-prefill",
                "--max-num-batched-tokens", str(cpu_scheduler_args(model)["max_num_batched_tokens"])]
    elif dtype:
        cmd += ["--dtype", dtype]
    if not prefix_caching:
        cmd += ["--no-enable-prefix-caching"]
    cmd += list(extra_args)
    env = cpu_env() if status.cpu else dict(os.environ)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    return cmd, env


class VllmGenerator:
    """In-process vLLM generation, the `Generator` of `slim.local.LocalGenerator`: greedy
    (temperature 0) or sampled with a per-request seed, the tokenizer's chat template applied as
    transformers does it (the same prompt tokens), completions yielded as they finish.

    vLLM batches continuously (every job is queued, up to `max_num_seqs` decode together), so
    `batch_size` is accepted for the interface and unused. `dtype` None: bfloat16 where native, else
    float32 (`slim.hardware.generation_dtype`); "float32" matches transformers' greedy output.
    `prefix_caching` False for fair benchmarks; `engine_args` go to `vllm.LLM` as they are."""

    engine = "vllm"

    def __init__(self, model_path: str | Path | None = None, adapter: str | Path | None = None,
                 batch_size: int = 16, max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 42,
                 dtype: str | None = None, prefix_caching: bool = True, enforce_eager: bool | None = None,
                 max_num_seqs: int | None = None, status: VllmStatus | None = None, **engine_args: Any):
        if model_path is None and adapter is None:
            raise InputError("generation needs a model path or an adapter")
        self.status = status or vllm_status()
        if not self.status.ok:
            raise InputError(f"vLLM cannot run here: {self.status.reason}")
        model, lora = model_to_load(self.status, model_path, adapter)
        if self.status.cpu:
            for key, value in cpu_env().items():  # read by the engine process vLLM starts below
                os.environ.setdefault(key, value)
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engine's INFO lines would bury the progress bar
        from transformers import AutoTokenizer
        from vllm import LLM

        self.model_name = str(adapter or model_path)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.temperature, self.seed = temperature, seed
        self.dtype = dtype or generation_dtype(detect())
        self.tok = AutoTokenizer.from_pretrained(model)
        kwargs: dict[str, Any] = dict(model=str(model), dtype=self.dtype, seed=seed,
                                      enable_prefix_caching=prefix_caching, generation_config="vllm",
                                      enforce_eager=self.status.cpu if enforce_eager is None else enforce_eager)
        if self.status.cpu:
            kwargs.update(cpu_scheduler_args(model))
        if max_num_seqs:
            kwargs["max_num_seqs"] = max_num_seqs
        kwargs.update(engine_args)  # anything else vllm.LLM takes (max_model_len, ...)
        self.lora_request = None
        if lora is not None:
            from vllm.lora.request import LoRARequest

            kwargs.update(enable_lora=True, max_lora_rank=lora_rank(lora))
            self.lora_request = LoRARequest(LORA_NAME, 1, str(lora))
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - t0
        eos = getattr(self.llm.llm_engine.model_config.hf_config, "eos_token_id", None)
        self.eos_ids = {self.tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}

    def sampling_params(self, attempt: int = 0):
        """Greedy, or sampled with seed + attempt (a request's own generator: the same draws in any batch)."""
        from vllm import SamplingParams

        if self.temperature > 0:
            return SamplingParams(temperature=self.temperature, top_p=1.0, top_k=0, max_tokens=self.max_new_tokens,
                                  seed=self.seed + attempt)
        return SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens with the chat template, exactly as `LocalGenerator` builds them."""
        ids = self.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
        return list(ids)

    def completion(self, output, seconds: float) -> Completion:
        o = output.outputs[0]
        ids = list(o.token_ids)
        n = len(ids) - (1 if ids and o.finish_reason == "stop" and ids[-1] in self.eos_ids else 0)
        return Completion(text=o.text.strip(), prompt_tokens=len(output.prompt_token_ids or ()),
                          completion_tokens=n, seconds=seconds, finish_reason=o.finish_reason)

    def generate(self, prompts: list[str]) -> list[Completion]:
        """Completions in prompt order (all at once)."""
        done = dict(self.stream(enumerate(prompts)))
        return [done[i] for i in range(len(prompts))]

    def stream(self, jobs: Iterable[tuple[Any, str]],
               attempt: int = 0) -> Iterator[tuple[Any, Completion | Exception]]:
        """Queue every job, step the engine, yield each (key, Completion) as it finishes; `seconds` is
        the time since the previous completion (amortised, so they add up to the wall time). Closing
        the iterator early aborts what is still queued. `attempt` > 0 (asking again for off-format
        answers) samples with seed + attempt, as the endpoint client does; greedy repeats itself."""
        jobs = list(jobs)
        if not jobs:
            return
        engine = self.llm.llm_engine
        prompts = [{"prompt_token_ids": self.prompt_ids(p)} for _, p in jobs]
        ids = self.llm.enqueue(prompts, self.sampling_params(attempt), lora_request=self.lora_request, use_tqdm=False)
        # enqueue returns vLLM's internal ids ("<external>-<random>"); outputs carry the external one
        pending = {rid.split("-", 1)[0]: (key, rid) for rid, (key, _) in zip(ids, jobs)}
        last = time.perf_counter()
        try:
            while pending and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        key, _ = pending.pop(out.request_id)
                        now = time.perf_counter()
                        yield key, self.completion(out, now - last)
                        last = now
            for key, _ in pending.values():  # the engine dropped them: say so instead of losing them silently
                yield key, RuntimeError("vLLM finished without an output for this request")
            pending = {}
        finally:
            if pending:
                engine.abort_request([rid for _, rid in pending.values()], internal=True)

    def close(self) -> None:
        """Stop the engine process (also done at interpreter exit)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None

    def __enter__(self) -> "VllmGenerator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
