"""Efficiency of SLMRec: 32-, 8- and 4-layer LLM recommenders built side by side (random weights).

Prints total/trainable parameters, training step time, inference throughput (users scored against
all items per second) and ratios against the deepest model, plus the speedup of computing the shared
prompt prefix once per batch. The paper reports the 4-layer student 6.6x faster to train and 8.0x
faster at inference than 32-layer E4SRec; the layer count alone bounds that at 8x.

    python bench/bench_slmrec.py                                  # CPU, SmolLM2-135M shape
    python bench/bench_slmrec.py --llama7b --bf16 --device cuda   # GPU, LLaMA-2-7B shape
    python bench/bench_slmrec.py --llama7b --hidden 64 --layers 4,2,1   # check the 7B path on CPU
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from eval.scoring import dot_scores
from slmrec.llm import LLMRec, LLMRecConfig, prompt_ids

LLAMA7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)


def base_shape(args: argparse.Namespace) -> dict:
    """LlamaConfig fields of the benchmarked base (no weights are loaded)."""
    if args.llama7b:
        shape = dict(LLAMA7B)
    else:
        from eval.assets import smollm2_path
        from transformers import LlamaConfig

        c = LlamaConfig.from_pretrained(smollm2_path())
        shape = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                     max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps)
    if args.hidden:  # shrink the width (keeps heads' proportions) to check a big shape on a small machine
        scale = args.hidden / shape["hidden_size"]
        heads = max(1, int(shape["num_attention_heads"] * scale))
        shape.update(hidden_size=args.hidden, intermediate_size=max(8, int(shape["intermediate_size"] * scale)),
                     num_attention_heads=heads, num_key_value_heads=min(heads, shape["num_key_value_heads"]))
    return shape


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Mean seconds of `fn` over `repeats` runs after one warm-up run."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def bench_one(layers: int, shape: dict, prompt: list[int], args: argparse.Namespace) -> dict:
    dtype = "bfloat16" if args.bf16 else "float32"
    items = torch.randn(args.num_items + 1, args.item_dim)
    cfg = LLMRecConfig(llama={**shape, "num_hidden_layers": layers}, prompt_ids=prompt, dtype=dtype)
    model = LLMRec(cfg, items).to(args.device)
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(1, args.num_items + 1, (args.batch_size, args.max_len), generator=g).to(args.device)
    targets = torch.randint(1, args.num_items + 1, (args.batch_size, args.max_len), generator=g).to(args.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(hist, targets)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    train_s = timed(step, args.device, args.steps)
    model.eval()
    users = torch.arange(args.infer_batch)
    infer_hist = torch.randint(1, args.num_items + 1, (args.infer_batch, args.max_len), generator=g).to(args.device)
    out = {"layers": layers, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "trainable_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
           "train_step_s": train_s}
    for name, cached in (("users_per_s", True), ("users_per_s_no_prefix_cache", False)):
        def infer(cached: bool = cached) -> None:
            with torch.no_grad(), torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
                dot_scores(model.user_vectors(users, infer_hist, prefix_cache=cached), model.item_emb, None)
        out[name] = args.infer_batch / timed(infer, args.device, args.steps)
    del model, opt
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="32,8,4", help="Comma-separated depths; ratios are against the first.")
    p.add_argument("--llama7b", action="store_true", help="LLaMA-2-7B shape (hidden 4096) instead of SmolLM2.")
    p.add_argument("--hidden", type=int, default=None, help="Override the hidden size (quick checks).")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16, help="Training batch.")
    p.add_argument("--infer-batch", type=int, default=64, help="Users per inference batch.")
    p.add_argument("--max-len", type=int, default=20, help="History items per user.")
    p.add_argument("--num-items", type=int, default=1008)
    p.add_argument("--item-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="Timed repeats (after one warm-up).")
    p.add_argument("--json", default=None, help="Also write the rows to this file.")
    args = p.parse_args()
    shape = base_shape(args)
    # the real prompt's token count (SmolLM2 tokenizer), ids folded into the benchmarked vocabulary
    prompt = [t % shape["vocab_size"] for t in prompt_ids(LLMRecConfig(), shape["vocab_size"])]
    rows = [bench_one(int(n), shape, prompt, args) for n in args.layers.split(",")]
    ref = rows[0]
    print(f"base shape: {json.dumps(shape)}  prompt tokens: {len(prompt)}  history: {args.max_len}  "
          f"device: {args.device}  dtype: {'bf16' if args.bf16 else 'fp32'}")
    print(f"{'layers':>6} {'params M':>9} {'trainable M':>11} {'step s':>8} {'users/s':>9} {'no-cache u/s':>12} "
          f"{'prefix x':>8} {'train x':>8} {'infer x':>8}")
    for r in rows:
        r.update(prefix_cache_speedup=r["users_per_s"] / r["users_per_s_no_prefix_cache"],
                 train_speedup=ref["train_step_s"] / r["train_step_s"],
                 infer_speedup=r["users_per_s"] / ref["users_per_s"],
                 infer_speedup_vs_uncached=r["users_per_s"] / ref["users_per_s_no_prefix_cache"])
        print(f"{r['layers']:>6} {r['params_M']:>9.1f} {r['trainable_M']:>11.2f} {r['train_step_s']:>8.3f} "
              f"{r['users_per_s']:>9.1f} {r['users_per_s_no_prefix_cache']:>12.1f} {r['prefix_cache_speedup']:>8.2f} "
              f"{r['train_speedup']:>8.2f} {r['infer_speedup']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
