"""SASRec on ml-1m with the SASRec paper's protocol, next to its published figures.

Paper protocol: every rating is an interaction (no threshold), 5-core, leave-one-out, 100 negatives
sampled from items the user never rated. Published (Kang & McAuley 2018, Table III): HR@10 0.8245,
NDCG@10 0.5905. Usage: python bench/bench_sasrec_ml1m.py [--run runs/bench-ml1m] [--epochs 200]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from eval.dataset import prepare_dataset
from eval.preprocess import PrepareConfig
from eval.io import read_json
from eval.stage import run_stage
from slmrec.pretrain import BackboneStage, PretrainConfig
from slmrec.trainer import TrainConfig

PUBLISHED = {"HR@10": 0.8245, "NDCG@10": 0.5905}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench-ml1m"))
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    ds = prepare_dataset(PrepareConfig(source="ml-1m", rating_gt=None, user_core=5, item_core=5,
                                       negatives=[100]), args.run)
    print(f"ml-1m: {ds.num_users} users, {ds.num_items} items, {len(ds.interactions)} interactions "
          f"(paper: 6,040 users, 3,416 items) in {time.perf_counter() - t0:.0f}s")
    cfg = PretrainConfig(hidden=args.hidden, layers=2, heads=1, dropout=0.2,
                         train=TrainConfig(epochs=args.epochs, patience=args.patience, batch_size=128,
                                           lr=1e-3, max_len=args.max_len, select_protocol="100"))
    t0 = time.perf_counter()
    stage = BackboneStage(args.run, cfg)
    run_stage(stage, force=True)
    metrics = read_json(stage.out / "metrics.json")["100 negatives"]
    train_s = time.perf_counter() - t0
    print(f"\nSASRec (CE over all items), trained+evaluated in {train_s / 60:.1f} min on "
          f"{torch.get_num_threads()} threads")
    print(f"{'metric':<9}{'measured':>10}{'published':>11}{'ratio':>8}")
    for k, ref in PUBLISHED.items():
        print(f"{k:<9}{metrics[k]:>10.4f}{ref:>11.4f}{metrics[k] / ref:>8.3f}")
    print(f"{'MRR':<9}{metrics['MRR']:>10.4f}   (random floor {metrics['random_MRR']:.4f})")
    print(f"random HR@10 {metrics['random_HR@10']:.4f}, NDCG@10 {metrics['random_NDCG@10']:.4f}")


if __name__ == "__main__":
    main()
