"""SLIM student fine-tuning speed: training examples/s of the slim-student stage's Trainer on real
student prompts and teacher rationales, float32 against bf16 autocast, random against length-grouped
batches, at several batch sizes. Each variant trains a fresh LoRA for the same number of steps.
On a shared machine wall time says little: examples per CPU second (of this process; run it with
OMP_NUM_THREADS=1 so no thread spins waiting for a core) is the figure to compare.

    python bench/bench_sft.py --data RUN/data --records RUN/slim-teacher-rationales/records.jsonl
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from eval.assets import smollm2_path
from slim.finetune import IGNORE, SlimStudentConfig, make_trainer, tokenize_example, training_pairs
from slim.hardware import native_bf16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="RUN/data")
    ap.add_argument("--records", required=True, help="the teacher's records.jsonl")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per variant")
    ap.add_argument("--batch-size", default="4,8", help="comma-separated batch sizes")
    ap.add_argument("--variants", default="fp32-random-full,fp32-random,bf16-random,bf16-grouped",
                    help="PRECISION-SAMPLING[-full]: fp32|bf16 - random|grouped batches; -full: the LM head on "
                         "every position (default: answer positions only)")
    args = ap.parse_args()

    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, set_seed

    base = Path(smollm2_path())
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    cfg = SlimStudentConfig()
    rows = [tokenize_example(tok, p, a, cfg.max_length) for p, a in
            training_pairs(args.data, args.records, cfg, base).values()]
    lengths = sorted(len(r["input_ids"]) for r in rows)
    print(f"{len(rows)} examples, tokens per example: median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
          f"native bf16 here: {native_bf16()}")
    print("| variant | batch | steps | seconds | examples/s | CPU s | examples/CPU s |\n|---|---|---|---|---|---|---|")
    for b in (int(x) for x in args.batch_size.split(",")):
        for variant in args.variants.split(","):
            precision, sampling, *full = variant.split("-")
            collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE, padding=True) if full else None
            set_seed(cfg.seed)
            with tempfile.TemporaryDirectory() as out:
                trainer = make_trainer(cfg, base, tok, rows, [], Path(out), collator, max_steps=args.steps,
                                       per_device_train_batch_size=b, bf16=precision == "bf16",
                                       train_sampling_strategy="group_by_length" if sampling == "grouped" else "random",
                                       logging_steps=args.steps, disable_tqdm=True)
                cpu = time.process_time()
                seconds = trainer.train().metrics["train_runtime"]
                cpu = time.process_time() - cpu
            n = args.steps * b
            print(f"| {variant} | {b} | {args.steps} | {seconds:.1f} | {n / seconds:.2f} | {cpu:.1f} | {n / cpu:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
