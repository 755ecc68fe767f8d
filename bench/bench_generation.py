"""Rationale generation on this machine: every engine and dtype side by side, and the one "auto" picks.

The prompts are the project's real student prompts (the student template over the users of a
prepared data folder); the model is the trained student adapter (`--adapter RUN/slim-student`) or
the base SmolLM2. Greedy decoding, prefix caching off (the prompts share the template). Printed, with
the CPU's flags:

  1. the matmul ceiling: float32 and bfloat16 GFLOP/s of a decode-shaped matmul (batch x hidden @
     hidden x MLP), and the decode ceiling in tokens/s it implies (2 x parameters FLOP a token);
  2. offline batch, one row per engine: transformers float32 (`LocalGenerator`, batched `generate`),
     transformers with each optimisation that is kept, vLLM float32 and vLLM bfloat16
     (`VllmGenerator`): start-up, completion tokens/s, share of the ceiling, greedy agreement with
     transformers float32; then the engine `auto` picks here and its ratio to the best (>= 0.9). An
     engine far below the others (vLLM bf16 where bf16 is emulated: ~2 tokens/s) runs on
     `--slow-prompts` prompts only, so the bench ends;
  3. served (`--serve`): vLLM's server in each vLLM dtype of `--engines` and the transformers batching
     server, through the project's `Server` and `ChatClient` at each concurrency level (a bounded
     number of requests per level).

  python bench/bench_generation.py --data runs/demo/data --adapter runs/demo/slim-student
  python bench/bench_generation.py --data runs/demo/data --engines transformers --serve

Timings on a shared 2-core machine are noisy: compare rows of one run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from eval.assets import smollm2_path
from eval.dataset import load_dataset
from slim.client import ChatClient, ClientConfig, Completion, Generator
from slim.hardware import detect
from slim.local import LocalGenerator
from slim.lora import adapter_base, load_causal_lm
from slim.prompts import STUDENT
from slim.rationales import GenerationConfig, sample_users, user_prompts
from slim.serve import Server
from slim.engine import engine_choice

# transformers float32 as it was, with each optimisation kept (prompt-prefix reuse), vLLM in both dtypes
ENGINES = ("transformers", "transformers+prefix", "vllm-float32", "vllm-bfloat16")


def matmul_gflops(dtype_name: str, rows: int, hidden: int, inner: int, seconds: float = 2.0) -> float:
    """GFLOP/s of a rows x hidden @ hidden x inner matmul in `dtype_name` on this machine's threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(rows, hidden, dtype=dtype), torch.randn(hidden, inner, dtype=dtype)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * rows * hidden * inner * n / (time.perf_counter() - t0) / 1e9


def measure(gen: Generator, prompts: list[str]) -> tuple[float, int, list[str | None]]:
    """(seconds, completion tokens, texts in prompt order; None where a request failed)."""
    texts: list[str | None] = [None] * len(prompts)
    tokens = 0
    t0 = time.perf_counter()
    for i, c in gen.stream(enumerate(prompts)):
        if isinstance(c, Completion):
            texts[i], tokens = c.text, tokens + c.completion_tokens
    return time.perf_counter() - t0, tokens, texts


def agreement(a: list[str | None], b: list[str | None]) -> float:
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else float("nan")


def make(engine: str, model: str | None, adapter: str | None, args) -> Generator:
    if engine.startswith("transformers"):
        return LocalGenerator(model, adapter, args.batch_size, args.max_tokens, 0.0,
                              prefix_reuse=engine == "transformers+prefix")
    from slim.vllm_offline import VllmGenerator

    return VllmGenerator(model, adapter, max_new_tokens=args.max_tokens, temperature=0.0,
                         dtype=engine.split("-")[1], prefix_caching=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="Prepared data folder (prompts from its users).")
    ap.add_argument("--adapter", default=None, help="Student LoRA adapter (default: none, the base model).")
    ap.add_argument("--model", default=None, help="Base model folder (default: the adapter's base, else SmolLM2).")
    ap.add_argument("--template", default=STUDENT, help="Prompt version (default: the student's).")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"Comma list of {', '.join(ENGINES)}.")
    ap.add_argument("--prompts", type=int, default=64, help="Users (prompts) for the offline batch.")
    ap.add_argument("--slow-prompts", type=int, default=8, help="Prompts for an engine whose dtype is emulated "
                                                                "here (vLLM bf16 without native bf16).")
    ap.add_argument("--max-tokens", type=int, default=48, help="Most completion tokens (the demo student's).")
    ap.add_argument("--history-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64, help="transformers batch size (the demo student's).")
    ap.add_argument("--serve", action=argparse.BooleanOptionalAction, default=False, help="Also bench the servers.")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=32, help="Requests per concurrency level (at least the level).")
    ap.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = ap.parse_args()

    import torch

    hw = detect()
    engines = args.engines.split(",")
    model = args.model or (None if args.adapter else str(smollm2_path()))
    ds = load_dataset(args.data)
    cfg = GenerationConfig(template=args.template, history_tokens=args.history_tokens)
    prompts = list(user_prompts(ds, sample_users(ds.num_users, args.prompts, 0), cfg).values())
    console = Console(width=140)
    console.print(f"{hw.kind}; flags: {hw.isa_flags()}; {torch.get_num_threads()} threads; load average "
                  f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    console.print(f"{len(prompts)} {args.template} prompts from {args.data}; "
                  f"{'adapter ' + args.adapter if args.adapter else 'model ' + str(model)}; greedy, "
                  f"{args.max_tokens} max tokens, prefix caching off")
    results: dict = {"cpu": hw.kind, "flags": hw.isa_flags(), "prompts": len(prompts), "max_tokens": args.max_tokens,
                     "offline": [], "served": []}

    # 1. the ceiling: a decode step is (batch x hidden) @ (hidden x ...) matmuls over every parameter
    lm = load_causal_lm(model or adapter_base(args.adapter))
    mcfg, params = lm.config, sum(p.numel() for p in lm.parameters())
    del lm
    ceiling = {d: matmul_gflops(d, min(args.batch_size, 64), mcfg.hidden_size, mcfg.intermediate_size)
               for d in ("float32", "bfloat16")}
    tokens_ceiling = {d: g * 1e9 / (2 * params) for d, g in ceiling.items()}
    results["ceiling"] = {"gflops": {d: round(g, 1) for d, g in ceiling.items()},
                          "tokens_per_s": {d: round(t, 1) for d, t in tokens_ceiling.items()}, "parameters": params}
    console.print(f"matmul {min(args.batch_size, 64)}x{mcfg.hidden_size} @ {mcfg.hidden_size}x"
                  f"{mcfg.intermediate_size}: float32 {ceiling['float32']:.1f} GFLOP/s, bfloat16 "
                  f"{ceiling['bfloat16']:.1f} GFLOP/s; decode ceiling ({params / 1e6:.0f}M parameters): float32 "
                  f"{tokens_ceiling['float32']:.0f} tokens/s, bfloat16 {tokens_ceiling['bfloat16']:.0f} tokens/s")

    # 2. offline: one engine at a time (two engines in memory slow each other on 2 cores)
    table = Table(title="offline batch (in-process), greedy")
    for col in ("engine", "dtype", "prompts", "start-up s", "seconds", "completion tokens", "tokens/s",
                "share of ceiling", "agrees with transformers"):
        table.add_column(col, justify="right")
    texts: dict[str, list[str | None]] = {}
    speed: dict[str, float] = {}
    job_s: dict[str, float] = {}  # start-up + generation: what the job costs with this engine
    for engine in engines:
        dtype = "float32" if engine.startswith("transformers") else engine.split("-")[1]
        emulated = dtype == "bfloat16" and not hw.native_bf16
        batch = prompts[:args.slow_prompts] if emulated else prompts
        t0 = time.perf_counter()
        try:
            gen = make(engine, model, args.adapter, args)
        except Exception as e:  # noqa: BLE001 - an engine that cannot run here is a row that says so
            console.print(f"{engine}: cannot run here ({type(e).__name__}: {str(e)[:200]})")
            continue
        startup = time.perf_counter() - t0
        dt, n, out = measure(gen, batch)
        getattr(gen, "close", lambda: None)()
        texts[engine], speed[engine] = out, n / dt
        if not emulated:
            job_s[engine] = startup + dt
        agree = agreement(out, texts["transformers"]) if "transformers" in texts else float("nan")
        share = n / dt / tokens_ceiling[dtype]
        table.add_row(engine.split("-")[0], dtype + (" (emulated)" if emulated else ""), str(len(batch)),
                      f"{startup:.1f}", f"{dt:.1f}", str(n), f"{n / dt:.1f}", f"{share:.0%}", f"{agree:.0%}")
        results["offline"].append({"engine": engine, "dtype": dtype, "emulated": emulated, "prompts": len(batch),
                                   "startup_s": round(startup, 1), "seconds": round(dt, 1), "completion_tokens": n,
                                   "tokens_per_s": round(n / dt, 1), "share_of_ceiling": round(share, 3),
                                   "greedy_agreement": round(agree, 3)})
        print(json.dumps(results["offline"][-1]), file=sys.stderr, flush=True)
    console.print(table)
    # what auto picks for this job (its size: prompts x max tokens) and for a server (size unknown)
    choice = engine_choice("auto", len(prompts) * args.max_tokens)
    picked = "transformers+prefix" if choice.engine == "transformers" else f"vllm-{choice.dtype}"
    results["auto"] = {"engine": choice.engine, "dtype": choice.dtype, "reason": choice.reason,
                       "served": engine_choice("auto").engine}
    console.print(f"auto picks for this job: {choice.engine} ({choice.dtype}) - {choice.reason}")
    console.print(f"auto picks for a server: {results['auto']['served']}")
    if picked in speed:
        best = max(speed, key=speed.get)
        fastest_job = min(job_s, key=job_s.get)
        ratio, job_ratio = speed[picked] / speed[best], job_s[fastest_job] / job_s[picked]
        results["auto"].update(best=best, ratio_to_best=round(ratio, 3), fastest_job=fastest_job,
                               job_ratio_to_fastest=round(job_ratio, 3))
        console.print(f"picked {picked}: {speed[picked]:.1f} tokens/s, job {job_s[picked]:.1f} s with start-up; "
                      f"best tokens/s {best}: {speed[best]:.1f} (ratio {ratio:.2f}); fastest job {fastest_job}: "
                      f"{job_s[fastest_job]:.1f} s (ratio {job_ratio:.2f}, "
                      f"{'ok' if job_ratio >= 0.9 else 'BELOW 0.9'})")

    # 3. served: the servers one after the other, each concurrency level in turn
    if args.serve:
        levels = [int(c) for c in args.concurrency.split(",")]
        table = Table(title=f"served (OpenAI-compatible endpoint, the project's ChatClient), {args.max_tokens} "
                            f"max tokens")
        for col in ("backend", "dtype", "start-up s", "concurrency", "requests", "seconds", "completion tokens",
                    "tokens/s"):
            table.add_column(col, justify="right")
        servers = [("vllm", e.split("-")[1]) for e in engines if e.startswith("vllm-")]
        servers += [("transformers", None)] if any(e.startswith("transformers") for e in engines) else []
        for backend, dtype in servers:
            with contextlib.ExitStack() as stack:
                try:
                    server = stack.enter_context(Server(model, args.adapter, backend=backend, dtype=dtype,
                                                        prefix_caching=False, max_batch=max(levels)))
                except Exception as e:  # noqa: BLE001 - say so and go on with the other server
                    console.print(f"{backend} server: cannot run here ({type(e).__name__}: {str(e)[:200]})")
                    continue
                for c in levels:
                    n_req = max(args.requests, c)
                    client = ChatClient(ClientConfig(base_url=server.base_url, model=server.model_name, temperature=0,
                                                     max_tokens=args.max_tokens, concurrency=c, timeout_s=1800))
                    dt, n, _ = measure(client, (prompts * (n_req // len(prompts) + 1))[:n_req])
                    table.add_row(backend, server.dtype, f"{server.startup_s:.1f}", str(c), str(n_req), f"{dt:.1f}",
                                  str(n), f"{n / dt:.1f}")
                    results["served"].append({"backend": backend, "dtype": server.dtype,
                                              "startup_s": round(server.startup_s, 1), "concurrency": c,
                                              "requests": n_req, "seconds": round(dt, 1), "completion_tokens": n,
                                              "tokens_per_s": round(n / dt, 1)})
                    print(json.dumps(results["served"][-1]), file=sys.stderr, flush=True)
        console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
