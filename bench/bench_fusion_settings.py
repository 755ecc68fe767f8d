"""Fusion settings side by side: does a training setting of the fused models change what they rank?

Trains the fusion stage's model (its own `build` and `fit`, the run's vectors) once per backbone, seed
and variant on a finished run, each variant being the stage's defaults with a few settings changed,
and prints validation and test NDCG@10 under full ranking, overall, on tail items and on rare items
(seen at most 5 times in training), with the rare targets that reach the top 10. Then, per backbone,
each variant against the first one over the same test users: the per-user NDCG@10 and MRR averaged
over the seeds, a paired bootstrap interval of the difference and a sign-flip p-value (eval's
`paired_test`), overall and per group.

    python bench/bench_fusion_settings.py --run runs/demo --backbones sasrec,gru4rec --seeds 42,43,44 \\
        --variant "no dropout: id_dropout=0" --variant "dropout: id_dropout=0.1"
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import slmrec.gru4rec  # noqa: F401  (registers the backbones a run may hold)
import slmrec.llm  # noqa: F401
import slmrec.sasrec  # noqa: F401
from eval.config import from_dict, parse_override, set_dotted
from eval.dataset import SeqDataset, load_dataset
from eval.evaluate import rank_users
from eval.metrics import from_ranks
from eval.significance import paired_test, per_user
from fusion.groups import RARE, item_popularity_groups, users_by_test_item
from fusion.train import FusionTrainConfig, build
from fusion.vectors import load_vectors
from slmrec.trainer import fit


def parse_variant(spec: str) -> tuple[str, dict]:
    """'name: key=value, key=value' -> (name, the settings as a nested table)."""
    name, _, body = spec.partition(":")
    settings: dict = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        set_dotted(settings, *parse_override(item))
    return name.strip(), settings


def groups_of(ds: SeqDataset, split: str) -> dict[str, np.ndarray]:
    """The users of `split` by target: every user, tail items, rare items."""
    return {"all": np.arange(ds.num_users),
            "tail": users_by_test_item(ds, item_popularity_groups(ds)["tail"], split),
            "rare": np.flatnonzero(ds.item_popularity[ds.target(split)] <= RARE)}


def cells(r: np.ndarray, groups: dict[str, np.ndarray]) -> str:
    nd = " | ".join(f"{from_ranks(r[u])['NDCG@10']:.4f}" for u in groups.values())
    return f"{nd} | {int((r[groups['rare']] < 10).sum())}/{len(groups['rare'])}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished run (data, backbones, vectors)")
    ap.add_argument("--backbones", default="sasrec,gru4rec,slmrec-student")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--text", default="both", help="the text the hybrids read (both, items, users, none)")
    ap.add_argument("--variant", action="append", required=True,
                    help="'name: key=value, ...' fusion settings over the stage's defaults; the first is the baseline")
    args = ap.parse_args()
    run = Path(args.run)
    ds = load_dataset(run / "data")
    vectors = load_vectors(run / "vectors")
    variants = [parse_variant(v) for v in args.variant]
    split_groups = {s: groups_of(ds, s) for s in ("valid", "test")}
    print("| backbone | seed | variant | best epoch | valid NDCG@10 all | tail | rare | rare in top 10 "
          "| test NDCG@10 all | tail | rare | rare in top 10 |\n" + "|---" * 12 + "|")
    tests: dict[str, dict[str, list[np.ndarray]]] = {}
    for backbone in args.backbones.split(","):
        for seed in map(int, args.seeds.split(",")):
            for name, settings in variants:
                base = FusionTrainConfig(backbone=backbone, text=args.text,
                                         freeze_backbone=backbone == "slmrec-student")
                cfg = from_dict(FusionTrainConfig, settings, f"variant '{name}'", base)
                torch.manual_seed(seed)
                model = build(ds, cfg, vectors, run / backbone, run / "bench-fusion-settings")
                tc = replace(cfg.train, max_len=model.config.max_len, seed=seed)
                log = fit(model, ds, tc, desc=f"{backbone} seed {seed} {name}")
                ranks = {s: rank_users(model, ds, s, "full", max_len=tc.max_len)[0] for s in split_groups}
                tests.setdefault(backbone, {}).setdefault(name, []).append(ranks["test"])
                row = " | ".join(cells(ranks[s], g) for s, g in split_groups.items())
                print(f"| {backbone} | {seed} | {name} | {log['best_epoch']} | {row} |", flush=True)
    print("\nTest, per-user metrics averaged over the seeds; each variant minus the first: "
          "difference [95 % interval], p\n\n| backbone | variant | group | NDCG@10 | MRR |\n" + "|---" * 5 + "|")
    first = variants[0][0]
    for backbone, by_variant in tests.items():
        mean = {n: {m: np.mean([per_user(r)[m] for r in rs], axis=0) for m in ("NDCG@10", "MRR")}
                for n, rs in by_variant.items()}
        for name in list(by_variant)[1:]:
            for group, users in split_groups["test"].items():
                diffs = [paired_test(mean[name][m][users], mean[first][m][users]) for m in ("NDCG@10", "MRR")]
                shown = [f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] p={d['p']:.3f}" for d in diffs]
                print(f"| {backbone} | {name} vs {first} | {group} ({len(users)}) | " + " | ".join(shown) + " |")


if __name__ == "__main__":
    main()
