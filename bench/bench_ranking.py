"""Full-ranking evaluation in blocks of items against all items at once: time and memory.

Each case runs in a fresh process (peak memory is the process's high-water mark over what it held
before ranking, `VmHWM` after resetting it through /proc/self/clear_refs). Cases: the ml-1m data set
(6,040 users, 3,416 items) prepared by bench/bench_sasrec_ml1m.py when present (`--ml1m`), and a
synthetic catalogue of `--items` items (default 1M) with `--users` users whose histories hold 50 random
items; both scored by a dot product of random 64-dim vectors (ranking's cost does not depend on the
vectors being trained). Methods: "all at once" is the code before chunking (kept as the reference in
tests/test_chunked_ranking.py), "blocks of N" is `rank_users(chunk_size=N)`; each row also says whether
its ranks equal the first method's and its top-20 the first blocked method's (all at once, torch.topk
ordered equal scores arbitrarily; blocks put the smaller item id first). Usage:
  python bench/bench_ranking.py [--ml1m runs/bench-ml1m/data] [--items 1000000] [--users 1024] [--threads 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.evaluate import Ranking, default_chunk, metrics_of, rank_users  # noqa: E402
from eval.scoring import DotScorer  # noqa: E402


class RandomDot(DotScorer):
    def __init__(self, num_users: int, num_items: int, dim: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.users = torch.randn(num_users, dim, generator=g)
        self.items = torch.randn(num_items + 1, dim, generator=g)

    def user_vectors(self, users, histories):
        return self.users[users]

    def item_vectors(self):
        return self.items


class Synthetic:
    """What `rank_users` reads of a data set, for `users` users among `items` items: 50 random history
    items each, a random test target."""

    def __init__(self, users: int, items: int, history: int = 50, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_users, self.num_items = users, items
        self._hist = rng.integers(1, items + 1, size=(users, history))
        self._target = rng.integers(1, items + 1, size=users)

    def eval_users(self, split):
        return np.arange(self.num_users)

    def target(self, split):
        return self._target

    def history(self, user, split):
        return self._hist[user]


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(case: dict) -> dict:
    torch.set_num_threads(case["threads"])
    if case["data"] == "ml1m":
        from eval.dataset import load_dataset
        ds = load_dataset(case["path"])
    else:
        ds = Synthetic(case["users"], case["items"])
    model = RandomDot(ds.num_users, ds.num_items)
    before = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    if case["chunk"] == 0:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_chunked_ranking import unchunked
        ranking = Ranking(*unchunked(model, ds, batch_size=case["batch"]), ds.eval_users("test"))
    else:
        ranking = rank_users(model, ds, "test", "full", batch_size=case["batch"], chunk_size=case["chunk"])
    seconds = time.perf_counter() - t0
    m = metrics_of(ranking)
    digest = hashlib.sha256(ranking.ranks.tobytes() + ranking.candidates.tobytes()).hexdigest()[:12]
    return {"seconds": seconds, "users_per_s": len(ranking.ranks) / seconds, "peak_extra_mb": rss_mb("VmHWM") - before,
            "MRR": m["MRR"], "NDCG@10": m["NDCG@10"], "ranks": digest,
            "top": hashlib.sha256(ranking.top.tobytes()).hexdigest()[:12]}


def run(case: dict, script: str = __file__) -> dict:
    """`script --child CASE` in a fresh process: its last line of output, parsed (or its error)."""
    out = subprocess.run([sys.executable, script, "--child", json.dumps(case)], capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    from slim.hardware import detect
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    return (f"CPU flags: {detect().isa_flags()}; {os.cpu_count()} cores; torch {torch.__version__}; "
            f"commit {commit or 'unknown'}; load average {os.getloadavg()[0]:.1f}")


def parse_or_run_child(ap: argparse.ArgumentParser, child: Callable[[dict], dict]) -> argparse.Namespace | None:
    """The parent's arguments (with --json); or, called as `--child CASE`, run that case here, print its
    result and return None."""
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return None
    return args


def finish(rows: list[dict], json_path: str | None) -> None:
    """The load after the cases (a busy machine skews them), and the rows as JSON if asked."""
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if json_path:
        Path(json_path).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ml1m", default="runs/bench-ml1m/data", help="a prepared ml-1m data folder (skipped if absent)")
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", default="0,default,4096", help="0 = all at once (the code before chunking)")
    args = parse_or_run_child(ap, child)
    if args is None:
        return
    print(machine(), flush=True)
    chunks = [default_chunk(args.batch) if c == "default" else int(c) for c in args.chunks.split(",")]
    datasets = []
    if Path(args.ml1m, "manifest.json").exists():
        datasets.append({"data": "ml1m", "path": args.ml1m, "label": "ml-1m (6,040 users, 3,416 items)"})
    datasets.append({"data": "synthetic", "users": args.users, "items": args.items,
                     "label": f"synthetic ({args.users:,} users, {args.items:,} items)"})
    rows = []
    print("| data | method | seconds | users/s | peak extra MB | MRR | ranks as the first | top-20 as the first blocks |")
    print("|---|---|---|---|---|---|---|---|")
    for data in datasets:
        first = first_blocks = None
        for chunk in chunks:
            case = {**data, "chunk": chunk, "batch": args.batch, "threads": args.threads}
            r = run(case)
            method = "all at once (before)" if chunk == 0 else f"blocks of {chunk:,}"
            rows.append({**case, **r, "method": method})
            if "error" in r:
                print(f"| {data['label']} | {method} | failed: {r['error']} | | | | | |", flush=True)
                continue
            first = first or r
            first_blocks = first_blocks or (r if chunk else None)
            same_top = "-" if not chunk else "yes" if r["top"] == first_blocks["top"] else "NO"
            print(f"| {data['label']} | {method} | {r['seconds']:.2f} | {r['users_per_s']:.0f} | "
                  f"{r['peak_extra_mb']:.0f} | {r['MRR']:.5f} | {'yes' if r['ranks'] == first['ranks'] else 'NO'} | "
                  f"{same_top} |", flush=True)
    finish(rows, args.json)


if __name__ == "__main__":
    main()
