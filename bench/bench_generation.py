"""Student rationale generation: vLLM vs transformers on the same prompts, offline and served.

The prompts are the project's real student prompts (the student template over the users of a
prepared data folder); the model is the trained student adapter (`--adapter RUN/slim-student`) or
the base SmolLM2. Greedy decoding, prefix caching off (the prompts share the template), and:

  1. offline batch: transformers `LocalGenerator` (float32, batched `model.generate`, the project's
     in-process path) vs `VllmGenerator` (bf16): start-up seconds, completion tokens/s, the
     vLLM/transformers ratio per round (passes interleaved, median reported), whether vLLM repeats
     itself, and the share of prompts whose greedy output is identical to transformers' (vLLM bf16,
     and float32 in a last engine);
  2. served: `vllm` and `transformers serve` up side by side through the project's `Server` and
     `ChatClient`, each concurrency level sent to one then the other (a bounded number of requests
     per level): tokens/s and the ratio.

  python bench/bench_generation.py --data runs/demo/data --adapter runs/demo/slim-student
  python bench/bench_generation.py --data runs/demo/data --no-serve --prompts 32     # offline only
  python bench/bench_generation.py --data runs/demo/data --engines transformers       # no vLLM here

Timings on a shared 2-core machine are noisy: compare runs made back to back.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from eval.assets import smollm2_path
from eval.dataset import load_dataset
from slim.client import ChatClient, ClientConfig, Completion, Generator
from slim.local import LocalGenerator
from slim.prompts import STUDENT
from slim.rationales import GenerationConfig, sample_users, user_prompts
from slim.serve import Server


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="Prepared data folder (prompts from its users).")
    ap.add_argument("--adapter", default=None, help="Student LoRA adapter (default: none, the base model).")
    ap.add_argument("--model", default=None, help="Base model folder (default: the adapter's base, else SmolLM2).")
    ap.add_argument("--template", default=STUDENT, help="Prompt version (default: the student's).")
    ap.add_argument("--engines", default="transformers,vllm", help="Comma list: transformers, vllm.")
    ap.add_argument("--prompts", type=int, default=64, help="Users (prompts) for the offline batch.")
    ap.add_argument("--max-tokens", type=int, default=96, help="Most completion tokens (the student's default).")
    ap.add_argument("--history-tokens", type=int, default=128)
    ap.add_argument("--batch-size", default="16", help="transformers batch size(s), comma list (16: the student's).")
    ap.add_argument("--rounds", type=int, default=2, help="Offline passes per engine, interleaved.")
    ap.add_argument("--fp32-agreement", action=argparse.BooleanOptionalAction, default=True,
                    help="Also run vLLM in float32 (greedy agreement with float32 transformers).")
    ap.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True, help="Also bench the servers.")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=8, help="Requests per concurrency level (at least the level).")
    ap.add_argument("--serve-max-tokens", type=int, default=48, help="Most completion tokens per served request "
                                                                      "(transformers serve is slow).")
    ap.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = ap.parse_args()

    engines = args.engines.split(",")
    model = args.model or (None if args.adapter else str(smollm2_path()))
    ds = load_dataset(args.data)
    cfg = GenerationConfig(template=args.template, history_tokens=args.history_tokens)
    prompts = list(user_prompts(ds, sample_users(ds.num_users, args.prompts, 0), cfg).values())
    what = f"{'adapter ' + args.adapter if args.adapter else 'model ' + str(model)}"
    console = Console(width=120)
    console.print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
                  f"(others' work on a shared machine skews every figure)")
    console.print(f"{len(prompts)} {args.template} prompts from {args.data}; {what}; greedy, "
                  f"{args.max_tokens} max tokens, prefix caching off")
    results: dict = {"prompts": len(prompts), "max_tokens": args.max_tokens, "model": what, "offline": [],
                     "served": [], "agreement": {}, "load_average_start": round(os.getloadavg()[0], 2)}

    # 1. offline batch: every engine loaded, then passes interleaved round by round, so load from
    # other work on a shared machine hits both; the ratio is taken per round (paired), then the median
    table = Table(title="offline batch (in-process), passes interleaved")
    for col in ("round", "engine", "dtype", "batch", "start-up s", "seconds", "completion tokens", "tokens/s",
                "load avg"):
        table.add_column(col, justify="right")
    texts: dict[str, list[str | None]] = {}
    gens: dict[str, tuple[Generator, str, str, float]] = {}  # label -> (generator, dtype, batch, start-up s)

    def row(rnd: int, label: str, dt: float, n: int) -> float:
        _, dtype, batch, startup = gens[label]
        load = os.getloadavg()[0]
        table.add_row(str(rnd), label.split(":")[0], dtype, batch, f"{startup:.1f}", f"{dt:.1f}", str(n),
                      f"{n / dt:.1f}", f"{load:.2f}")
        results["offline"].append({"round": rnd, "engine": label.split(":")[0], "dtype": dtype, "batch": batch,
                                   "startup_s": round(startup, 1), "seconds": round(dt, 1), "completion_tokens": n,
                                   "tokens_per_s": round(n / dt, 1), "load_average": round(load, 2)})
        print(json.dumps(results["offline"][-1]), file=sys.stderr, flush=True)
        return n / dt

    if "transformers" in engines:
        for b in (int(x) for x in args.batch_size.split(",")):
            t0 = time.perf_counter()
            gen = LocalGenerator(model, args.adapter, b, args.max_tokens, 0.0)
            gens[f"transformers:{b}"] = (gen, "float32", str(b), time.perf_counter() - t0)
    if "vllm" in engines:
        from slim.vllm_engine import VllmGenerator

        t0 = time.perf_counter()
        gens["vllm:bf16"] = (VllmGenerator(model, args.adapter, max_new_tokens=args.max_tokens, temperature=0.0,
                                           dtype="bfloat16", prefix_caching=False), "bfloat16", "continuous",
                             time.perf_counter() - t0)
    ratios: list[float] = []
    for rnd in range(1, args.rounds + 1):
        tps: dict[str, float] = {}
        for label, (gen, *_) in gens.items():
            dt, n, out = measure(gen, prompts)
            tps[label] = row(rnd, label, dt, n)
            if label == "vllm:bf16" and "vllm-bfloat16" in texts:
                results["agreement"]["vllm-bfloat16 run to run"] = round(agreement(out, texts["vllm-bfloat16"]), 3)
            texts.setdefault("transformers" if label.startswith("transformers") else "vllm-bfloat16", out)
        hf = max((v for k, v in tps.items() if k.startswith("transformers")), default=None)
        if hf and "vllm:bf16" in tps:
            ratios.append(tps["vllm:bf16"] / hf)
    if "vllm:bf16" in gens:
        gens["vllm:bf16"][0].close()
        if args.fp32_agreement:  # float32 vLLM: greedy agreement with float32 transformers (and its speed)
            t0 = time.perf_counter()
            gens["vllm:fp32"] = (VllmGenerator(model, args.adapter, max_new_tokens=args.max_tokens, temperature=0.0,
                                               dtype="float32", prefix_caching=False), "float32", "continuous",
                                 time.perf_counter() - t0)
            dt, n, texts["vllm-float32"] = measure(gens["vllm:fp32"][0], prompts)
            row(args.rounds, "vllm:fp32", dt, n)
            gens["vllm:fp32"][0].close()
    console.print(table)
    if ratios:
        median = statistics.median(ratios)
        results["offline_ratio_per_round"] = [round(r, 2) for r in ratios]
        results["offline_ratio"] = round(median, 2)
        console.print(f"offline: vLLM bf16 / best transformers batch, per round: "
                      f"{', '.join(f'{r:.2f}x' for r in ratios)}; median {median:.2f}x")
    if "vllm-bfloat16 run to run" in results["agreement"]:
        console.print(f"vLLM bf16 run to run: {results['agreement']['vllm-bfloat16 run to run']:.0%} of outputs "
                      f"identical")
    if "transformers" in texts:
        for k in ("vllm-float32", "vllm-bfloat16"):
            if k in texts:
                share = agreement(texts[k], texts["transformers"])
                results["agreement"][k] = round(share, 3)
                console.print(f"greedy agreement {k} vs transformers float32: {share:.0%} of {len(prompts)} "
                              f"outputs identical")

    # 2. served: both servers up at once, each concurrency level sent to one then the other
    if args.serve:
        levels = [int(c) for c in args.concurrency.split(",")]
        table = Table(title=f"served (OpenAI-compatible endpoint, the project's ChatClient), "
                            f"{args.serve_max_tokens} max tokens, backends interleaved")
        for col in ("backend", "start-up s", "concurrency", "requests", "seconds", "completion tokens", "tokens/s",
                    "load avg"):
            table.add_column(col, justify="right")
        served: dict[tuple[str, int], float] = {}
        backends = [e for e in ("vllm", "transformers") if e in engines]
        with contextlib.ExitStack() as stack:
            servers = {b: stack.enter_context(Server(model, args.adapter, backend=b, prefix_caching=False))
                       for b in backends}
            for c in levels:
                n_req = max(args.requests, c)
                for backend, server in servers.items():
                    client = ChatClient(ClientConfig(base_url=server.base_url, model=server.model_name, temperature=0,
                                                     max_tokens=args.serve_max_tokens, concurrency=c, timeout_s=1800))
                    dt, n, _ = measure(client, (prompts * (n_req // len(prompts) + 1))[:n_req])
                    served[backend, c] = n / dt
                    load = os.getloadavg()[0]
                    table.add_row(backend, f"{server.startup_s:.1f}", str(c), str(n_req), f"{dt:.1f}", str(n),
                                  f"{n / dt:.1f}", f"{load:.2f}")
                    results["served"].append({"backend": backend, "startup_s": round(server.startup_s, 1),
                                              "concurrency": c, "requests": n_req, "seconds": round(dt, 1),
                                              "completion_tokens": n, "tokens_per_s": round(n / dt, 1),
                                              "load_average": round(load, 2)})
                    print(json.dumps(results["served"][-1]), file=sys.stderr, flush=True)
        console.print(table)
        for c in levels:
            if ("vllm", c) in served and ("transformers", c) in served:
                console.print(f"served, concurrency {c}: vLLM / transformers serve = "
                              f"{served['vllm', c] / served['transformers', c]:.1f}x")
    results["load_average_end"] = round(os.getloadavg()[0], 2)
    console.print(f"load average at end (1 min): {results['load_average_end']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
