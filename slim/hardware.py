"""What this machine runs fast: its CPU flags, native bf16, and the generation engine and dtype they call for.

One rule for every generation path (the teacher's server, the student's in-process generation,
`slim serve`, `fusion serve --serve-student`), decided from measurements on both kinds of x86-64 CPU
(`bench/bench_generation.py`, figures in bench/results):

- bf16 only where it is native: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or AMX. Elsewhere
  torch emulates it (a 576-wide matmul on an AVX2 EPYC: 1.2 GFLOP/s in bf16, 72 in float32).
- vLLM on a GPU wherever it runs. On a CPU it decodes faster than transformers' batched generate once
  started (AVX-512 BF16 Xeon, 64 prompts: bf16 3.9x, float32 1.7x; AVX2 EPYC: float32 1.3x, bf16 is
  emulated there and the slowest option, 1.5-5 tokens/s) but starts 20-50 s later, so "auto" picks
  it for an offline job only where the job's output pays that back, and for a server where vLLM's
  server beats the transformers batching server (AVX-512: yes; AVX2: no). See `CPU_FIGURES`.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

# SmolLM2-135M on 2 cores, the figures the CPU rule stands on, per kind of CPU and the dtype vLLM runs
# in there: completion tokens/s once started offline (the demo student's job: 64 prompts, 40 tokens; on
# AVX2 32 prompts, 48 tokens), vLLM's start-up seconds, and served tokens/s at concurrency 32 (vLLM's
# server against the transformers batching server). bench/results: 2026-12-03-generation-avx512.md
# (AVX-512 BF16 + AMX Xeon; the "avx512" row is vLLM in float32 on that machine: the AVX-512 kernels a
# CPU without BF16 runs) and 2026-12-02-generation-avx2.md (AVX2 EPYC).
CPU_FIGURES = {
    "avx512_bf16": {"vllm": 222.3, "transformers": 57.2, "vllm startup s": 21.0,
                    "served vllm": 175.9, "served transformers": 40.7},
    "avx512": {"vllm": 96.9, "transformers": 57.2, "vllm startup s": 25.5,
               "served vllm": 15.9, "served transformers": 14.2},
    "avx2": {"vllm": 29.0, "transformers": 23.0, "vllm startup s": 52.0,
             "served vllm": 17.0, "served transformers": 17.3},
}


def cpu_figures(hw: Hardware) -> dict[str, float]:
    """The measured figures for this kind of CPU (an older CPU than AVX2 reads the AVX2 ones)."""
    return CPU_FIGURES["avx512_bf16" if hw.native_bf16 else "avx512" if hw.avx512 else "avx2"]


def break_even_tokens(fig: dict[str, float]) -> float:
    """Completion tokens above which vLLM's start-up pays for itself (inf where it is no faster)."""
    gain = 1 / fig["transformers"] - 1 / fig["vllm"]
    return fig["vllm startup s"] / gain if gain > 0 else float("inf")


TRANSFORMERS_DTYPE = "float32"  # the transformers path (slim.local.LocalGenerator) computes in float32


@dataclass(frozen=True)
class Hardware:
    """The device generation runs on and, for a CPU, its instruction-set flags (/proc/cpuinfo)."""
    device: str = "cpu"                  # "cpu" or "cuda"
    flags: frozenset[str] = frozenset()  # the CPU's flags
    gpu_bf16: bool = False               # a CUDA GPU that supports bf16

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls in hardware: a bf16 GPU, or AVX-512 BF16 / AMX on a CPU."""
        if self.device == "cuda":
            return self.gpu_bf16
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    @property
    def kind(self) -> str:
        """A short name for announcements and benchmark tables."""
        if self.device == "cuda":
            return "GPU"
        if self.native_bf16:
            return "CPU with AVX-512 BF16" if "avx512_bf16" in self.flags else "CPU with AMX"
        return "CPU with AVX-512 (no BF16)" if self.avx512 else \
            "CPU with AVX2, no AVX-512" if "avx2" in self.flags else "CPU without AVX2"

    def isa_flags(self) -> str:
        """The flags that decide speed here (printed beside every benchmark figure)."""
        keep = sorted(f for f in self.flags if re.match(r"(avx|amx|fma|f16c|sse4)", f))
        return " ".join(keep) or "none found"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's flags (the first processor's `flags` line; empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    m = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return frozenset(m.group(1).split()) if m else frozenset()


@functools.lru_cache(maxsize=None)
def detect() -> Hardware:
    """This machine: a CUDA GPU where torch sees one, else the CPU and its flags."""
    import torch

    if torch.cuda.is_available():
        return Hardware("cuda", cpu_flags(), torch.cuda.is_bf16_supported(including_emulation=False))
    return Hardware("cpu", cpu_flags())


def native_bf16() -> bool:
    """Whether bf16 runs natively on this machine (training autocast and generation alike)."""
    return detect().native_bf16


def generation_dtype(hw: Hardware) -> str:
    """bfloat16 where native, float32 elsewhere (a GPU without bf16: float16)."""
    if hw.native_bf16:
        return "bfloat16"
    return "float16" if hw.device == "cuda" else "float32"


@dataclass(frozen=True)
class EngineChoice:
    engine: str   # "vllm" or "transformers"
    dtype: str    # what the engine computes in
    reason: str   # one line: why this engine here


def choose(requested: str, hw: Hardware, vllm_ok: bool, vllm_why: str, vllm_device: str = "",
           work_tokens: int | None = None) -> EngineChoice:
    """The engine and dtype for a request (auto | vllm | transformers) on `hw`, given whether vLLM
    imports and runs (`vllm_ok`, `vllm_why`, the device it found) and, for a job of known size, the
    most completion tokens it asks for (`work_tokens`; None: a server, whose work is unknown).

    auto never picks the slower engine: vLLM on a GPU; on a CPU, by the figures of its kind
    (`CPU_FIGURES`): vLLM decodes faster once started (1.3x on AVX2 in float32, 3.9x on AVX-512 BF16)
    but starts 20-50 s later than transformers, so an offline job gets it only where its output pays
    that back, and a server where vLLM's served throughput beats the batching server's (AVX-512: 2-4x;
    AVX2: no faster). Asking for vllm where it cannot run is an error."""
    from eval.errors import InputError

    dtype = generation_dtype(hw)
    if requested == "transformers":
        return EngineChoice("transformers", TRANSFORMERS_DTYPE, "asked for")
    if not vllm_ok:
        if requested == "vllm":
            raise InputError(f"engine vllm asked for, but {vllm_why}")
        return EngineChoice("transformers", TRANSFORMERS_DTYPE, f"fallback: {vllm_why}")
    if requested == "vllm":
        return EngineChoice("vllm", dtype, f"asked for; {vllm_why}")
    if vllm_device != "cpu":
        return EngineChoice("vllm", dtype, vllm_why)
    fig = cpu_figures(hw)
    even = break_even_tokens(fig)
    where = f"{vllm_why}; {hw.kind}" + ("" if dtype == "bfloat16" else " (vLLM in float32: bf16 is emulated here)")
    if work_tokens is None:
        if fig["served vllm"] > fig["served transformers"]:
            ratio = fig["served vllm"] / fig["served transformers"]
            return EngineChoice("vllm", dtype, f"{where}: served, vLLM {dtype} {ratio:.1f}x the batching server")
        return EngineChoice("transformers", TRANSFORMERS_DTYPE,
                            f"{where}: served, vLLM is no faster than the batching server here "
                            f"({fig['served vllm']:.0f} vs {fig['served transformers']:.0f} tokens/s) and starts "
                            f"{fig['vllm startup s']:.0f} s slower")
    if even == float("inf"):
        return EngineChoice("transformers", TRANSFORMERS_DTYPE,
                            f"{where}: vLLM {dtype} is no faster here ({fig['vllm']:.0f} vs "
                            f"{fig['transformers']:.0f} tokens/s)")
    speed = f"vLLM {dtype} decodes {fig['vllm'] / fig['transformers']:.1f}x faster once started"
    if work_tokens < even:
        return EngineChoice("transformers", TRANSFORMERS_DTYPE,
                            f"{where}: {speed}, but its {fig['vllm startup s']:.0f} s start-up pays back only "
                            f"above ~{even:,.0f} tokens (this job: at most {work_tokens:,})")
    return EngineChoice("vllm", dtype, f"{where}: {speed}, its start-up paid back above ~{even:,.0f} tokens "
                                       f"(this job: at most {work_tokens:,})")
