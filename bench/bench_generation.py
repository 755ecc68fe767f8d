"""Rationale generation throughput (completion tokens/s) through the OpenAI-compatible endpoint.

Serves a model with each backend (`transformers serve`; `vllm serve` too on a GPU), sends the same
teacher prompts at several concurrency levels and prints a table; with two backends it also prints
their throughput ratio. `--local` adds in-process batched generation for comparison.

  python bench/bench_generation.py --data runs/dev/data --requests 8 --concurrency 1,2,4
  python bench/bench_generation.py --data runs/dev/data --backends transformers,vllm   # on a GPU
"""
from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from eval.assets import smollm2_path
from eval.dataset import load_dataset
from slim.client import ChatClient, ClientConfig, Generator
from slim.local import LocalGenerator
from slim.rationales import RationaleConfig, sample_users, user_prompts
from slim.serve import Server


def measure(gen: Generator, prompts: list[str]) -> tuple[float, int, float]:
    """(seconds, completion tokens, tokens/s) for all prompts."""
    t0 = time.perf_counter()
    tokens = sum(c.completion_tokens for _, c in gen.stream(enumerate(prompts)) if not isinstance(c, Exception))
    dt = time.perf_counter() - t0
    return dt, tokens, tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="Prepared data folder (prompts from its users).")
    ap.add_argument("--model", default=None, help="Model folder (default: SmolLM2-135M-Instruct).")
    ap.add_argument("--backends", default="transformers", help="Comma list: transformers, vllm.")
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--requests", type=int, default=8, help="Prompts per concurrency level.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--history-tokens", type=int, default=128)
    ap.add_argument("--local", action="store_true", help="Also time in-process batched generation.")
    args = ap.parse_args()

    model = str(args.model or smollm2_path())
    ds = load_dataset(args.data)
    cfg = RationaleConfig(history_tokens=args.history_tokens)
    prompts = list(user_prompts(ds, sample_users(ds.num_users, args.requests, 0), cfg).values())
    levels = [int(c) for c in args.concurrency.split(",")]
    table = Table(title=f"generation throughput: {len(prompts)} prompts x {args.max_tokens} max tokens")
    for col in ("backend", "concurrency / batch", "seconds", "completion tokens", "tokens/s"):
        table.add_column(col, justify="right")
    best: dict[str, float] = {}
    for backend in args.backends.split(","):
        with Server(model, backend=backend) as server:
            for c in levels:
                client = ChatClient(ClientConfig(base_url=server.base_url, model=server.model_name, temperature=0,
                                                 max_tokens=args.max_tokens, concurrency=c, timeout_s=1800))
                dt, n, tps = measure(client, prompts)
                best[backend] = max(best.get(backend, 0.0), tps)
                table.add_row(backend, str(c), f"{dt:.1f}", str(n), f"{tps:.1f}")
    if args.local:
        local = LocalGenerator(model, max_new_tokens=args.max_tokens)
        for c in levels:
            local.batch_size = c
            dt, n, tps = measure(local, prompts)
            table.add_row("in-process", str(c), f"{dt:.1f}", str(n), f"{tps:.1f}")
    console = Console()
    console.print(table)
    if "vllm" in best and "transformers" in best:
        console.print(f"vLLM / transformers best throughput: {best['vllm'] / best['transformers']:.1f}x")


if __name__ == "__main__":
    main()
