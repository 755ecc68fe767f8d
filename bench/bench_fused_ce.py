"""SASRec's full cross-entropy step: fused and chunked (`slmrec.fused_ce`) against the plain product +
`F.cross_entropy` it replaced, side by side: seconds per training step, peak memory, and the loss and
gradients of one step from the same weights.

Each case runs in a fresh process (peak memory: the process's high-water mark over what it held before
the steps, `VmHWM` reset through /proc/self/clear_refs). Histories are random and full (every position
real: the most positions a batch can have). Cases: ml-1m's shape (3,416 items, batch 128, max_len 200)
and a large catalogue (`--items`, batch 32). Usage:
  python bench/bench_fused_ce.py [--items 50000] [--steps 10] [--threads 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ranking import finish, machine, parse_or_run_child, rss_mb, run  # noqa: E402  (bench/ is the script's folder)
from slmrec.sasrec import SASRec, SASRecConfig  # noqa: E402
from slmrec.seqrec import trim_padding  # noqa: E402


def unfused_loss(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss before fusing: every position's logits over every item held at once."""
    inputs, targets = trim_padding(inputs, targets)
    h = model.encode(inputs)
    keep = targets > 0
    logits = h[keep] @ model.item_emb.weight.T
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets[keep])


def child(case: dict) -> dict:
    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=case["items"], hidden=64, layers=2, heads=1, max_len=200, dropout=0.0))
    x = torch.randint(1, case["items"] + 1, (case["batch"], 201), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1], x[:, 1:]
    loss_fn = unfused_loss if case["method"] == "unfused" else lambda m, i, t: m.training_loss(None, i, t)
    loss = loss_fn(model, inputs, targets)
    loss.backward()  # the first step's loss and gradient norm: the same weights in both methods
    first = {"loss": loss.item(), "grad_norm": torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    before = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    times = []
    for _ in range(case["steps"]):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model, inputs, targets).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {**first, "seconds": times[len(times) // 2], "peak_extra_mb": rss_mb("VmHWM") - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=50_000, help="the large catalogue's items")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per case (the median is printed)")
    ap.add_argument("--threads", type=int, default=2)
    args = parse_or_run_child(ap, child)
    if args is None:
        return
    print(machine(), flush=True)
    rows = []
    print("| case | method | s/step | peak extra MB | first loss | first grad norm | speed-up | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for label, items, batch in (("ml-1m shape", 3416, 128), (f"{args.items:,} items", args.items, 32)):
        base = None
        for method in ("unfused", "fused"):
            case = {"items": items, "batch": batch, "method": method, "steps": args.steps, "threads": args.threads}
            r = run(case, __file__)
            rows.append({**case, **r, "label": label})
            if "error" in r:
                print(f"| {label}, batch {batch} x 200 | {method} | failed: {r['error']} | | | | | |", flush=True)
                continue
            base = base or (r if method == "unfused" else None)
            ratios = (f"{base['seconds'] / r['seconds']:.2f}x | {r['peak_extra_mb'] / max(base['peak_extra_mb'], 1):.2f}"
                      if base else " | ")
            print(f"| {label}, batch {batch} x 200 | {method} | {r['seconds']:.3f} | {r['peak_extra_mb']:.0f} | "
                  f"{r['loss']:.6f} | {r['grad_norm']:.6f} | {ratios} |", flush=True)
    finish(rows, args.json)


if __name__ == "__main__":
    main()
