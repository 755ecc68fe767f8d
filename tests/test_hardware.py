"""The engine and dtype rule for every combination of CPU flags, vLLM status and request (fake flags)."""
import itertools

import pytest

from eval.errors import InputError
from slim.hardware import Hardware, break_even_tokens, choose, cpu_figures, cpu_flags, generation_dtype

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
CPUS = {
    "avx2": Hardware("cpu", AVX2),
    "avx512": Hardware("cpu", AVX2 | {"avx512f", "avx512bw", "avx512vl"}),
    "avx512_bf16": Hardware("cpu", AVX2 | {"avx512f", "avx512bw", "avx512_bf16"}),
    "amx": Hardware("cpu", AVX2 | {"avx512f", "amx_bf16", "amx_tile"}),
    "old": Hardware("cpu", frozenset({"sse4_2"})),
}
GPUS = {"gpu_bf16": Hardware("cuda", AVX2, gpu_bf16=True), "gpu_fp16": Hardware("cuda", AVX2, gpu_bf16=False)}
VLLM = {  # (ok, why, device)
    "cpu build": (True, "vllm 0.32.0 imports and runs on cpu", "cpu"),
    "gpu build": (True, "vllm 0.26.0 imports and runs on cuda", "cuda"),
    "missing": (False, "vllm is not installed", ""),
}


def test_cpu_flags_come_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma\nbugs\t\t: spectre\n"
                    "processor\t: 1\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
    assert cpu_flags(info) == {"fpu", "sse4_2", "avx", "avx2", "fma"}
    assert cpu_flags(tmp_path / "missing") == frozenset()  # not Linux: no flags, so no bf16 and no AVX-512
    hw = Hardware("cpu", cpu_flags(info))
    assert not hw.native_bf16 and not hw.avx512 and hw.isa_flags() == "avx avx2 fma sse4_2"


@pytest.mark.parametrize("name", [*CPUS, *GPUS])
def test_bf16_only_where_native(name):
    hw = {**CPUS, **GPUS}[name]
    native = name in ("avx512_bf16", "amx", "gpu_bf16")
    assert hw.native_bf16 is native
    assert (generation_dtype(hw) == "bfloat16") is native
    for requested, vllm in itertools.product(("auto", "vllm", "transformers"), VLLM.values()):
        if requested == "vllm" and not vllm[0]:
            continue
        for work in (None, 10, 10**7):
            choice = choose(requested, hw, *vllm, work)
            assert choice.dtype != "bfloat16" or native, (requested, vllm, choice)
            assert choice.engine == "vllm" or choice.dtype == "float32"  # the transformers path is float32


@pytest.mark.parametrize("cpu, served", [("avx2", "transformers"), ("old", "transformers"), ("avx512", "vllm"),
                                         ("avx512_bf16", "vllm"), ("amx", "vllm")])
def test_auto_on_a_cpu_picks_the_faster_engine(cpu, served):
    """A server: vLLM where its server beats the batching server (AVX-512); a small job (vLLM's start-up
    not paid back): transformers on every CPU; a large one: vLLM on every CPU, bf16 only where native."""
    hw = CPUS[cpu]
    dtype = "bfloat16" if cpu in ("avx512_bf16", "amx") else "float32"
    for work, engine in ((None, served), (1_000, "transformers"), (10**6, "vllm")):
        choice = choose("auto", hw, *VLLM["cpu build"], work)
        assert choice.engine == engine and "\n" not in choice.reason, (work, choice)
        assert choice.dtype == (dtype if engine == "vllm" else "float32")
        assert choice.reason.startswith(VLLM["cpu build"][1]) and hw.kind in choice.reason
        if dtype == "float32":
            assert "bf16 is emulated" in choice.reason


@pytest.mark.parametrize("cpu", list(CPUS))
def test_vllm_only_for_a_job_that_pays_its_start_up(cpu):
    """vLLM decodes faster than transformers once started but starts 20-50 s later: auto takes it for
    an offline job from the break-even of the CPU's kind up, and says so."""
    fig = cpu_figures(CPUS[cpu])
    even = break_even_tokens(fig)
    assert even == pytest.approx(fig["vllm startup s"] * fig["vllm"] * fig["transformers"]
                                 / (fig["vllm"] - fig["transformers"]))
    small = choose("auto", CPUS[cpu], *VLLM["cpu build"], int(even) - 1)
    large = choose("auto", CPUS[cpu], *VLLM["cpu build"], int(even) + 1)
    assert small.engine == "transformers" and f"at most {int(even) - 1:,}" in small.reason
    assert large.engine == "vllm" and f"above ~{even:,.0f} tokens" in large.reason
    no_gain = {**fig, "vllm": fig["transformers"]}
    assert break_even_tokens(no_gain) == float("inf")


@pytest.mark.parametrize("cpu", ["avx2", "avx512", "avx512_bf16"])
def test_the_rule_agrees_with_the_measured_figures(cpu):
    """Where auto picks an engine on a CPU, the figures it stands on make that engine the faster one:
    job time = start-up + tokens / tokens per second; a server by its served throughput."""
    fig = cpu_figures(CPUS[cpu])
    even = break_even_tokens(fig)
    for tokens in (even / 2, even * 2):
        vllm_s = fig["vllm startup s"] + tokens / fig["vllm"]
        hf_s = tokens / fig["transformers"]
        picked = choose("auto", CPUS[cpu], *VLLM["cpu build"], int(tokens)).engine
        assert picked == ("vllm" if vllm_s < hf_s else "transformers")
    served = choose("auto", CPUS[cpu], *VLLM["cpu build"]).engine
    assert served == ("vllm" if fig["served vllm"] > fig["served transformers"] else "transformers")


@pytest.mark.parametrize("gpu", list(GPUS))
def test_a_gpu_uses_vllm_where_it_runs(gpu):
    choice = choose("auto", GPUS[gpu], *VLLM["gpu build"])
    assert choice.engine == "vllm" and choice.dtype == ("bfloat16" if gpu == "gpu_bf16" else "float16")
    assert choose("auto", GPUS[gpu], *VLLM["missing"]).engine == "transformers"


def test_asking_decides_and_a_missing_vllm_is_an_error():
    for hw in CPUS.values():
        assert choose("vllm", hw, *VLLM["cpu build"]).engine == "vllm"  # asked for: even where slower
        assert choose("transformers", hw, *VLLM["cpu build"]).reason == "asked for"
        fallback = choose("auto", hw, *VLLM["missing"])
        assert fallback.engine == "transformers" and fallback.reason == "fallback: vllm is not installed"
        with pytest.raises(InputError, match="engine vllm asked for, but vllm is not installed"):
            choose("vllm", hw, *VLLM["missing"])
