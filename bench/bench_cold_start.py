"""Item cold start of the fused models: what the text -> item-vector map (`cold_ridge`) costs and buys.

Trains one joint hybrid per backbone and seed on a finished run (`fusion.train.train_seed`, the
fusion stage's own training on the run's vectors), then scores validation and test under full
ranking at several ridge penalties side by side (the map is applied at scoring only, so one training
serves every penalty):
NDCG@10 overall, on tail items and on rare items (seen at most 5 times in training), and how many rare
targets reach the top 10. The model is trained (and early-stopped on validation) with the stage's
default `cold_ridge`, so the comparison leans towards that value. `--shuffle` adds a control: the
same map fitted on item texts shuffled among the items with text, so what it buys without the right
text shows next to what it buys with it.

    python bench/bench_cold_start.py --run runs/demo --backbones sasrec,gru4rec --seeds 42,43
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

import slmrec.gru4rec  # noqa: F401  (registers the backbones a run may hold)
import slmrec.llm  # noqa: F401
import slmrec.sasrec  # noqa: F401
from bench_fusion_settings import cells, groups_of
from eval.dataset import load_dataset
from eval.evaluate import rank_users
from fusion.model import HybridConfig
from fusion.train import train_seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished run (data, backbones, vectors)")
    ap.add_argument("--backbones", default="sasrec,gru4rec,slmrec-student")
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--ridges", default="0,0.3,0.1,0.05,0.03", help="cold_ridge values (0: no map)")
    ap.add_argument("--shuffle", action="store_true", help="also the map fitted on shuffled item texts")
    args = ap.parse_args()
    run = Path(args.run)
    ds = load_dataset(run / "data")
    print("| backbone | seed | cold_ridge | texts | valid NDCG@10 all | tail | rare | rare in top 10 "
          "| test NDCG@10 all | tail | rare | rare in top 10 |\n" + "|---" * 12 + "|")
    for backbone in args.backbones.split(","):
        for seed in map(int, args.seeds.split(",")):
            cfg = HybridConfig(backbone=backbone, freeze_backbone=backbone == "slmrec-student")
            model, _, tc = train_seed(ds, cfg, run, run / "bench-cold-start", seed, backbone)
            model.config = replace(model.config, cold_ridge=0.0)
            with torch.no_grad():
                fused = model.item_vectors()          # the trained item side, before any map
            text = model.item_text.clone()
            shuffled, rows = text.clone(), model.item_has.nonzero().squeeze(1)  # texts shuffled among items with text
            shuffled[rows] = text[rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]]
            for ridge in map(float, args.ridges.split(",")):
                for name, texts in (("own", text), ("shuffled", shuffled))[:1 + (args.shuffle and ridge > 0)]:
                    model.config = replace(model.config, cold_ridge=ridge)
                    model.item_text.copy_(texts)      # only the map reads the shuffled texts
                    with torch.no_grad():
                        items = model.text_mapped(fused) if ridge else fused
                    model.item_text.copy_(text)
                    model.item_vectors = lambda items=items: items  # score with these item vectors
                    row = " | ".join(cells(rank_users(model, ds, s, "full", max_len=tc.max_len)[0], groups_of(ds, s))
                                     for s in ("valid", "test"))
                    del model.item_vectors
                    print(f"| {backbone} | {seed} | {ridge:g} | {name} | {row} |", flush=True)

if __name__ == "__main__":
    main()
