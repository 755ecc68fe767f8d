"""What vLLM needs on this project's machines, handled once for its server and its offline engine.

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

Data and tensor parallelism (`data_parallel_size`, `tensor_parallel_size`, vLLM's own): the server
takes `--data-parallel-size` / `--tensor-parallel-size`; on CPU every rank (data x tensor) gets its
own group of this process's cores (`VLLM_CPU_OMP_THREADS_BIND` groups split by "|"), so the ranks
need a core each. `check_parallel` says in one line, naming the setting, what vLLM would refuse
(more ranks than cores or GPUs, a tensor-parallel size that does not divide the attention heads).

`serve_command` is the server's argv (`slim.serve.Server` runs it).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from eval.errors import InputError
from eval.io import CONFIG

from .engine import LORA_NAME, VllmStatus, check_parallel_engine, parallel_names
from .hardware import detect, generation_dtype

SUPPORTED_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
BIND = "VLLM_CPU_OMP_THREADS_BIND"
_SET_HERE: dict[str, str] = {}  # what `apply_cpu_env` put in os.environ (a later call may change it; a user's value stays)


def _cpu_ranges(cpus: Iterable[int]) -> str:
    """{0,1,2,5} -> '0-2,5' (the format of VLLM_CPU_OMP_THREADS_BIND)."""
    out: list[list[int]] = []
    for c in sorted(cpus):
        if out and c == out[-1][1] + 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in out)


def allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def cpu_groups(cpus: Iterable[int], ranks: int) -> str:
    """`ranks` contiguous groups of the cores, as VLLM_CPU_OMP_THREADS_BIND lists them ('0-1|2-3')."""
    cpus = sorted(cpus)
    n = len(cpus)
    return "|".join(_cpu_ranges(cpus[i * n // ranks:(i + 1) * n // ranks]) for i in range(ranks))


def user_environ() -> dict[str, str]:
    """os.environ without the values `apply_cpu_env` put there (an engine's settings are not the user's)."""
    return {k: v for k, v in os.environ.items() if _SET_HERE.get(k) != v}


def cpu_env(env: dict[str, str] | None = None, data_parallel_size: int = 1,
            tensor_parallel_size: int = 1) -> dict[str, str]:
    """`env` (default `user_environ()`) plus vLLM's CPU settings where unset: a 2 GiB KV cache, OpenMP
    threads bound to every core this process may use, none reserved (1.7x the default on 2 cores);
    with several ranks (data x tensor parallel) the cores split into one group per rank."""
    env = dict(user_environ() if env is None else env)
    ranks = data_parallel_size * tensor_parallel_size
    cpus = allowed_cpus()
    if ranks > len(cpus):
        raise InputError(f"{parallel_names(data_parallel_size, tensor_parallel_size)}: {ranks} vLLM ranks on CPU "
                         f"need a core each; this process may use {len(cpus)}")
    for key, value in {**CPU_DEFAULTS, BIND: cpu_groups(cpus, ranks)}.items():
        env.setdefault(key, value)
    groups = env[BIND].split("|")
    if env[BIND] not in ("auto", "nobind") and len(groups) != ranks:
        raise InputError(f"{parallel_names(data_parallel_size, tensor_parallel_size)}: {BIND}={env[BIND]} binds "
                         f"{len(groups)} core group(s); {ranks} vLLM ranks need {ranks}, separated by '|' "
                         f"(or unset it: {cpu_groups(cpus, ranks)})")
    return env


def apply_cpu_env(data_parallel_size: int = 1, tensor_parallel_size: int = 1) -> None:
    """`cpu_env` into os.environ, for an engine started in this process: a value set here by an earlier
    call is replaced (another engine may need other core groups), one set by the user is kept."""
    base = user_environ()
    for key, value in cpu_env(base, data_parallel_size, tensor_parallel_size).items():
        if key not in base:
            os.environ[key] = _SET_HERE[key] = value


def check_parallel(status: VllmStatus, model_dir: str | Path, data_parallel_size: int = 1,
                   tensor_parallel_size: int = 1) -> None:
    """One line, naming the setting, for what vLLM would refuse with these parallel sizes: a size
    below 1, a tensor-parallel size that does not divide the model's attention (or key-value) heads,
    more ranks than this machine's cores (CPU) or visible GPUs."""
    from eval.io import read_json

    check_parallel_engine("vllm", data_parallel_size, tensor_parallel_size)
    if tensor_parallel_size > 1:
        config = read_json(Path(model_dir) / CONFIG)
        heads = int(config.get("num_attention_heads") or 0)
        kv = int(config.get("num_key_value_heads") or heads)
        if heads and heads % tensor_parallel_size:
            raise InputError(f"tensor_parallel_size = {tensor_parallel_size} does not divide the {heads} attention "
                             f"heads of {Path(model_dir).name} (vLLM splits them evenly over the ranks)")
        if kv and kv % tensor_parallel_size and tensor_parallel_size % kv:
            raise InputError(f"tensor_parallel_size = {tensor_parallel_size} neither divides nor is a multiple of the "
                             f"{kv} key-value heads of {Path(model_dir).name}")
    ranks = data_parallel_size * tensor_parallel_size
    if ranks == 1:
        return
    if status.cpu:
        cpu_env(None, data_parallel_size, tensor_parallel_size)  # too few cores, or a bind of other groups
    elif status.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if ranks > gpus:
            raise InputError(f"{parallel_names(data_parallel_size, tensor_parallel_size)}: {ranks} vLLM ranks need "
                             f"a GPU each; {gpus} visible here")


def cpu_scheduler_args(model_dir: str | Path) -> dict[str, Any]:
    """vLLM engine arguments for CPU: no chunked prefill (seeded sampling of a split prompt crashes the
    CPU engine), so a step must hold a whole prompt: a budget of the model's context length (at least
    vLLM's default of 2,048 tokens)."""
    from eval.io import read_json

    context = int(read_json(Path(model_dir) / CONFIG).get("max_position_embeddings") or 0)
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(context, 2048)}


def gguf_quantized(model_dir: str | Path) -> bool:
    """Whether config.json carries a GGUF quantization_config (left over on de-quantized weights)."""
    cfg = Path(model_dir) / CONFIG
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
    text = (src / CONFIG).read_text()
    key = hashlib.sha256(f"{src}\n{text}".encode()).hexdigest()[:12]
    out = Path(cache or cache_dir() / "vllm-models") / f"{src.name}-{key}"
    if (out / CONFIG).exists():
        return out
    config = json.loads(text)
    del config["quantization_config"]
    with atomic_dir(out) as tmp:
        for f in src.iterdir():
            if f.name != CONFIG:
                (tmp / f.name).symlink_to(f)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def lora_rank(adapter: str | Path) -> int:
    """The smallest LoRA rank vLLM supports that holds the adapter's rank."""
    from eval.io import read_json

    r = int(read_json(Path(adapter) / "adapter_config.json")["r"])
    return next((s for s in SUPPORTED_LORA_RANKS if s >= r), r)


def base_of(model_path: str | Path | None, adapter: str | Path | None) -> Path:
    """The model folder given, or the adapter's base: the heads vLLM splits are its."""
    from .lora import adapter_base

    return Path(model_path) if model_path else Path(adapter_base(adapter))


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
                  prefix_caching: bool = True, extra_args: Iterable[str] = (), data_parallel_size: int = 1,
                  tensor_parallel_size: int = 1) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of an OpenAI-compatible vLLM server. `python -m vllm.entrypoints.openai.api_server`
    from this interpreter: vllm-cpu's `vllm` console script dies looking up a package named vllm.
    `data_parallel_size` engines (vLLM's load balancer spreads the requests), each over
    `tensor_parallel_size` ranks."""
    check_parallel(status, base_of(model_path, adapter), data_parallel_size, tensor_parallel_size)
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
    if data_parallel_size > 1:
        cmd += ["--data-parallel-size", str(data_parallel_size)]
    if tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel_size)]
    cmd += list(extra_args)
    env = cpu_env(None, data_parallel_size, tensor_parallel_size) if status.cpu else dict(os.environ)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    return cmd, env
