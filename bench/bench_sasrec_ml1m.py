"""SASRec (or GRU4Rec) on ml-1m next to the published figures: 100 negatives (the SASRec paper) and
full ranking.

Data as the SASRec paper: every rating is an interaction (no threshold), 5-core, leave-one-out; its
100 negatives are sampled from items the user never rated. Published, 100 negatives (Kang & McAuley
2018, Table III): HR@10 0.8245, NDCG@10 0.5905. Published, full ranking, NDCG@10: SASRec with BCE
0.1259, with sampled softmax 0.1684, gSASRec 0.1726, eSASRec 0.1772, FuXi-alpha 0.1813 (the
figures eSASRec's paper collects); SASRec+ (full cross-entropy, Klenitskiy & Vasilev 2023) HR@10
0.3152. The defaults are SASRec+'s settings and model (`--block sasrec --positions from-first
--init-std 0.02 --qkv-init xavier --no-attn-out-dropout`; `--block pre-ln --positions from-latest
--init-std 0 --qkv-init same --attn-out-dropout` is the project's default SASRec). Model selection:
validation MRR under full ranking. Prints a time-to-quality curve (validation and test full-ranking
figures against training minutes) and writes it with the results to
RUN/bench-<model>-<settings>-seed<S>.json; a seed whose JSON is there is read, not trained again
(seeds can run as separate processes, then one command prints their table). Usage:
  python bench/bench_sasrec_ml1m.py [--run runs/bench-ml1m] [--model sasrec] [--loss ce] [--seeds 42 43 44]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from eval.dataset import SeqDataset, prepare_dataset
from eval.evaluate import evaluate
from eval.io import read_json, write_json
from eval.preprocess import PrepareConfig
from slim.hardware import cpu_flags
from slmrec.pretrain import PretrainConfig, build_backbone, test_metrics
from slmrec.trainer import TrainConfig, fit

PUBLISHED_100 = {"HR@10": 0.8245, "NDCG@10": 0.5905}
PUBLISHED_FULL = {"SASRec (BCE)": 0.1259, "SASRec (sampled softmax)": 0.1684, "gSASRec": 0.1726,
                  "eSASRec": 0.1772, "FuXi-alpha": 0.1813}


def machine() -> str:
    flags = sorted(f for f in cpu_flags() if f == "avx2" or f.startswith(("avx512", "amx")))
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    return (f"{torch.get_num_threads()} threads, CPU flags {' '.join(flags) or 'none'}, "
            f"torch {torch.__version__}, commit {commit or 'unknown'}")


def settings_id(cfg: PretrainConfig) -> str:
    """A short hash of every setting but the seed: a seed's checkpoints and result belong to exactly
    one set of settings, so another command neither resumes nor overwrites them."""
    settings = asdict(cfg)
    settings["train"] = {k: v for k, v in settings["train"].items() if k != "seed"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def work_dir(run: Path, cfg: PretrainConfig) -> Path:
    """Where a seed's checkpoints live while it trains."""
    return run / f".bench-{cfg.model}-{settings_id(cfg)}-seed{cfg.train.seed}.work"


def result_file(run: Path, cfg: PretrainConfig) -> Path:
    return run / f"bench-{cfg.model}-{settings_id(cfg)}-seed{cfg.train.seed}.json"


def run_seed(ds: SeqDataset, cfg: PretrainConfig, curve_every: int, run: Path) -> dict:
    """Train one seed; the curve's test figures come every `curve_every` validations (not timed). Each
    validated epoch leaves a checkpoint in `work_dir`: the same command, stopped, goes on from it (its
    curve and training minutes included)."""
    torch.manual_seed(cfg.train.seed)
    model = build_backbone(cfg, ds.num_items)

    def test_full(m: torch.nn.Module, entry: dict) -> dict:
        point = {}
        if (entry["epoch"] // cfg.train.eval_every) % curve_every == 0:
            t = evaluate(m, ds, "test", "full", max_len=cfg.train.max_len)
            point = {"test_HR@10": t["HR@10"], "test_NDCG@10": t["NDCG@10"]}
        print(f"epoch {entry['epoch']} at {entry['seconds'] / 60:.1f} min: " + ", ".join(
            f"{k} {v:.4f}" for k, v in {**entry, **point}.items() if k not in ("epoch", "seconds")), flush=True)
        return point

    work = work_dir(run, cfg)
    work.mkdir(parents=True, exist_ok=True)
    log = fit(model, ds, cfg.train, desc=f"{cfg.model} seed {cfg.train.seed}", monitor=test_full, checkpoint=work)
    return {"config": asdict(cfg), "log": log, "test": test_metrics(model, ds, cfg.train.max_len)}


def report(result: dict) -> None:
    log, test = result["log"], result["test"]
    print(f"\nseed {result['config']['train']['seed']}: {len(log['epochs']) - 1} validations, "
          f"{log['train_seconds'] / 60:.1f} min of training, best epoch {log['best_epoch']} "
          f"(valid MRR {log['best_valid_MRR']:.4f})")
    print(f"{'epoch':>5}{'minutes':>9}{'loss':>8}{'val MRR':>9}{'val N@10':>9}{'test H@10':>10}{'test N@10':>10}")
    for e in log["epochs"]:
        cells = [f"{e[k]:>{w}.4f}" if k in e else " " * w
                 for k, w in (("loss", 8), ("valid_MRR", 9), ("valid_NDCG@10", 9), ("test_HR@10", 10),
                              ("test_NDCG@10", 10))]
        print(f"{e['epoch']:>5}{e['seconds'] / 60:>9.1f}{''.join(cells)}")
    full, neg = test["full ranking"], test["100 negatives"]
    print(f"test, full ranking: HR@10 {full['HR@10']:.4f}, NDCG@10 {full['NDCG@10']:.4f}, MRR {full['MRR']:.4f} "
          f"(random NDCG@10 {full['random_NDCG@10']:.4f})")
    print(f"test, 100 negatives: HR@10 {neg['HR@10']:.4f} (paper {PUBLISHED_100['HR@10']}), "
          f"NDCG@10 {neg['NDCG@10']:.4f} (paper {PUBLISHED_100['NDCG@10']}), MRR {neg['MRR']:.4f}")


def summary(results: list[dict]) -> None:
    """Mean and spread over seeds, beside the published figures."""
    def stat(protocol: str, k: str) -> str:
        v = np.array([r["test"][protocol][k] for r in results])
        return f"{v.mean():.4f}" + (f" +- {v.std(ddof=1):.4f}" if len(v) > 1 else "")
    minutes = np.mean([r["log"]["train_seconds"] / 60 for r in results])
    print(f"\n{len(results)} seed(s), {minutes:.1f} min of training each on average")
    print(f"full ranking: HR@10 {stat('full ranking', 'HR@10')}, NDCG@10 {stat('full ranking', 'NDCG@10')}")
    print("  published full-ranking NDCG@10: " + ", ".join(f"{k} {v}" for k, v in PUBLISHED_FULL.items()))
    print(f"100 negatives: HR@10 {stat('100 negatives', 'HR@10')}, NDCG@10 {stat('100 negatives', 'NDCG@10')}"
          f" (paper {PUBLISHED_100['HR@10']} / {PUBLISHED_100['NDCG@10']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench-ml1m"))
    ap.add_argument("--model", default="sasrec", choices=["sasrec", "gru4rec"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--patience", type=int, default=20, help="epochs without a better validation MRR")
    ap.add_argument("--loss", default="ce", choices=["ce", "sampled", "gbce"])
    ap.add_argument("--negatives", type=int, default=256)
    ap.add_argument("--gbce-t", type=float, default=0.75)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                    help="cosine: from --lr to 0 over --epochs")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--length-pools", type=int, default=1,
                    help="1: plain shuffled batches (SASRec+'s); 8: 25 %% faster epochs, a little less learnt per epoch")
    ap.add_argument("--windows", default="latest", choices=["latest", "all"],
                    help="all: train every next-item pair, the history cut into --max-len windows (ml-1m: 1.4x the rows, 1.2x the time of an epoch)")
    ap.add_argument("--eval-every", type=int, default=1, help="epochs between validations")
    ap.add_argument("--minutes", type=float, default=0, help="training time budget per seed (0: none)")
    ap.add_argument("--curve-every", type=int, default=1, help="validations between test points of the curve")
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.1)  # SASRec+'s (Klenitskiy & Vasilev 2023) on ml-1m
    ap.add_argument("--gru-hidden", type=int, default=64, help="GRU4Rec's state size (their GRU4Rec: 64)")
    # SASRec+'s block, positions and initialisation: ahead of the pre-norm default at every epoch on ml-1m
    ap.add_argument("--block", default="sasrec", choices=["pre-ln", "sasrec"])
    ap.add_argument("--positions", default="from-first", choices=["from-latest", "from-first"])
    ap.add_argument("--init-std", type=float, default=0.02, help="> 0: every weight N(0, std); 0: scaled init")
    ap.add_argument("--qkv-init", default="xavier", choices=["same", "xavier"], help="xavier: SASRec+'s q/k/v init")
    ap.add_argument("--attn-out-dropout", action=argparse.BooleanOptionalAction, default=False,
                    help="dropout on the attention's output too (the default: on its weights only, as SASRec+)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    ds = prepare_dataset(PrepareConfig(source="ml-1m", rating_gt=None, user_core=5, item_core=5,
                                       negatives=[100]), args.run)
    print(f"ml-1m: {ds.num_users} users, {ds.num_items} items, {len(ds.interactions)} interactions "
          f"(paper: 6,040 users, 3,416 items) in {time.perf_counter() - t0:.0f}s")
    print(f"machine: {machine()}")
    # each backbone's own settings; the other backbone's stay unset (None)
    own = ({k: getattr(args, k) for k in ("heads", "block", "positions", "init_std", "qkv_init", "attn_out_dropout")}
           if args.model == "sasrec" else {"gru_hidden": args.gru_hidden})
    results = []
    for seed in args.seeds:
        train = TrainConfig(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                            lr_schedule=args.lr_schedule, max_len=args.max_len, select_protocol="full", seed=seed,
                            loss=args.loss, negatives=args.negatives, gbce_t=args.gbce_t,
                            windows=args.windows, length_pools=args.length_pools, eval_every=args.eval_every,
                            time_budget_s=60 * args.minutes)
        cfg = PretrainConfig(model=args.model, hidden=args.hidden, layers=args.layers, dropout=args.dropout,
                             train=train, **own)
        out = result_file(args.run, cfg)
        done = read_json(out) if out.exists() else None
        if done is None:
            done = {**run_seed(ds, cfg, args.curve_every, args.run), "machine": machine()}
            write_json(out, done)
            shutil.rmtree(work_dir(args.run, cfg))  # the seed's result is written: its checkpoints go
        results.append(done)
        report(results[-1])
    summary(results)


if __name__ == "__main__":
    main()
