"""What this machine runs fast: its CPU flags, native bf16, and the generation engine and dtype they call for.

One rule for every generation path (the teacher's server, the student's in-process generation,
`slim serve`, `fusion serve --serve-student`), decided from measurements on both kinds of x86-64 CPU
(`bench/bench_generation.py`, figures in bench/results):

- bf16 only where it is native: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or AMX. Elsewhere
  torch emulates it (a 576-wide matmul on an AVX2 EPYC: 1.2 GFLOP/s in bf16, 72 in float32).
- vLLM on a GPU wherever it runs, and on a CPU with AVX-512 (AVX-512 BF16 Xeon: vLLM bf16 4.1x and
  float32 2.3x transformers' float32 batched generate). On an AVX2-only CPU vLLM in bf16 is the
  slowest option (emulated: 1.5-5 tokens/s); in float32 it decodes 1.3x faster than transformers
  once started but starts ~50 s later, so "auto" picks it there only for an offline job whose
  output pays that back, and serves with the transformers batching server (see `CPU_FIGURES`).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

# SmolLM2-135M on 2 cores, the figures the CPU rule stands on: completion tokens/s once started, and
# start-up seconds (bench/results: 2026-11-23-vllm-cpu.md for AVX-512 BF16, 2026-12-02-generation-avx2.md
# for AVX2: offline, 32 student prompts; served, the teacher at concurrency 32).
CPU_FIGURES = {
    "avx512_bf16": {"vllm bfloat16": 271.0, "vllm float32": 154.0, "transformers float32": 66.8},
    "avx2": {"vllm float32": 29.0, "transformers float32": 23.0, "vllm startup s": 52.0,
             "served vllm float32": 17.0, "served transformers float32": 17.3},
}


def avx2_break_even_tokens() -> float:
    """Completion tokens above which vLLM float32's start-up pays for itself on an AVX2-only CPU."""
    fig = CPU_FIGURES["avx2"]
    return fig["vllm startup s"] / (1 / fig["transformers float32"] - 1 / fig["vllm float32"])


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

    auto never picks the slower engine: vLLM on a GPU and on a CPU with AVX-512; on an AVX2-only CPU
    vLLM float32 decodes 1.3x faster than transformers once started but takes ~50 s to start, so it
    is picked only for a job large enough to pay that back (a server there: transformers, whose
    batching server matched vLLM's). Asking for vllm where it cannot run is an error."""
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
    if vllm_device == "cpu" and not hw.avx512:
        fig, even = CPU_FIGURES["avx2"], avx2_break_even_tokens()
        speed = fig["vllm float32"] / fig["transformers float32"]
        if work_tokens is None:
            return EngineChoice("transformers", TRANSFORMERS_DTYPE,
                                f"{vllm_why}, but this CPU has no AVX-512: served, vLLM float32 is no faster than "
                                f"the batching server there ({fig['served vllm float32']:.0f} vs "
                                f"{fig['served transformers float32']:.0f} tokens/s measured on an AVX2 CPU) and "
                                f"starts {fig['vllm startup s']:.0f} s slower")
        if work_tokens < even:
            return EngineChoice("transformers", TRANSFORMERS_DTYPE,
                                f"{vllm_why}, but this CPU has no AVX-512: vLLM float32 decodes {speed:.1f}x faster "
                                f"here once started, but its {fig['vllm startup s']:.0f} s start-up pays back only "
                                f"above ~{even:,.0f} tokens (this job: at most {work_tokens:,})")
        return EngineChoice("vllm", dtype, f"{vllm_why}; no AVX-512: {dtype} (bf16 is emulated here), "
                                               f"{speed:.1f}x transformers once started, its start-up paid back "
                                               f"above ~{even:,.0f} tokens (this job: at most {work_tokens:,})")
    if vllm_device == "cpu":
        fig = CPU_FIGURES["avx512_bf16"]
        speed = fig[f"vllm {dtype}"] / fig["transformers float32"]
        return EngineChoice("vllm", dtype, f"{vllm_why}; {hw.kind}: vLLM {dtype} {speed:.1f}x transformers "
                                           f"(measured on an AVX-512 BF16 CPU)")
    return EngineChoice("vllm", dtype, vllm_why)
