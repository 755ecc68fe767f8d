"""Fusion settings side by side: does a training setting of the fused models change what they rank?

Trains the fusion stage's model (`fusion.train.train_seed`: the stage's build and fit on the run's
backbone and vectors) once per backbone, seed and variant on a finished run, each variant being the
stage's defaults with a few settings changed, and prints validation and test NDCG@10 under full
ranking, overall, on tail items and on rare items (seen at most 5 times in training), with the rare
targets that reach the top 10. Then, per backbone, split and group, each variant against the first
over the same users and seeds: the mean difference in NDCG@10 and MRR with a t interval and
p-value (`eval.significance.seeds_test`: seeds and users as crossed random effects, so training
noise counts; at least 2 seeds). Choose a setting on validation, overall; test says
whether the choice holds, and the other rows describe (many p-values: some fall below 0.05 by chance).

    python bench/bench_fusion_settings.py --run runs/demo --backbones sasrec,gru4rec --seeds 42,43,44 \
        --variant "no dropout: id_dropout=0" --variant "dropout: id_dropout=0.1"
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

import slmrec.gru4rec  # noqa: F401  (registers the backbones a run may hold)
import slmrec.llm  # noqa: F401
import slmrec.sasrec  # noqa: F401
from eval.config import from_dict, parse_override, set_dotted
from eval.dataset import SeqDataset, load_dataset
from eval.errors import InputError
from eval.evaluate import rank_users
from eval.metrics import from_ranks, per_user
from eval.significance import seeds_test
from fusion.groups import RARE, item_groups
from fusion.model import HybridConfig
from fusion.train import train_seed

SPLITS = ("valid", "test")


def parse_variant(spec: str) -> tuple[str, dict]:
    """'name: key=value, key=value' -> (name, the settings as a nested table)."""
    name, colon, body = spec.partition(":")
    if not colon or not name.strip():
        raise InputError(f"--variant {spec!r}: expected 'name: key=value, ...'")
    settings: dict = {}
    for item in filter(None, (x.strip() for x in re.split(r",(?![^\[]*\])", body))):  # not inside [...]
        set_dotted(settings, *parse_override(item))
    return name.strip(), settings


def groups_of(ds: SeqDataset, split: str) -> dict[str, np.ndarray]:
    """The users of `split` by target: every user, tail items, rare items."""
    items = item_groups(ds, split)
    return {"all": np.arange(ds.num_users), "tail": items["tail"], "rare": items[f"seen <= {RARE}"]}


def cells(r: np.ndarray, n: np.ndarray, groups: dict[str, np.ndarray]) -> str:
    """Table cells of one split's ranks (n: candidate counts): NDCG@10 per group and the rare targets in
    the top 10."""
    nd = " | ".join(f"{from_ranks(r[u], n[u])['NDCG@10']:.4f}" for u in groups.values())
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
    variants = dict(parse_variant(v) for v in args.variant)
    if len(variants) < len(args.variant):
        raise InputError("--variant: two variants share a name")
    run = Path(args.run)
    ds = load_dataset(run / "data")
    groups = {s: groups_of(ds, s) for s in SPLITS}
    seeds = [int(x) for x in args.seeds.split(",")]
    if len(seeds) < 2:
        raise InputError("--seeds: at least 2 seeds, so that training noise can be measured")
    print("| backbone | seed | variant | best epoch | valid NDCG@10 all | tail | rare | rare in top 10 "
          "| test NDCG@10 all | tail | rare | rare in top 10 |\n" + "|---" * 12 + "|")
    ranks: dict[tuple[str, str, str], list[np.ndarray]] = {}  # (backbone, variant, split) -> per seed
    sizes: dict[str, np.ndarray] = {}  # split -> candidates per user (the same for every model)
    for backbone in args.backbones.split(","):
        for seed in seeds:
            for name, settings in variants.items():
                base = HybridConfig(backbone=backbone, text=args.text, freeze_backbone=backbone == "slmrec-student")
                cfg = from_dict(HybridConfig, settings, f"variant '{name}'", base)
                model, log, tc = train_seed(ds, cfg, run, run / "bench-fusion-settings", seed, f"{backbone} {name}")
                for split in SPLITS:
                    ranking = rank_users(model, ds, split, "full", max_len=tc.max_len)
                    ranks.setdefault((backbone, name, split), []).append(ranking.ranks)
                    sizes[split] = ranking.candidates
                row = " | ".join(cells(ranks[backbone, name, s][-1], sizes[s], groups[s]) for s in SPLITS)
                print(f"| {backbone} | {seed} | {name} | {log['best_epoch']} | {row} |", flush=True)
    first, *others = variants
    print(f"\nEach variant minus '{first}' over the same users and {len(seeds)} seeds: difference "
          "[95 % interval], p (seeds and users as crossed random effects)\n\n| backbone | variant | split | group | NDCG@10 | MRR |\n"
          + "|---" * 6 + "|")
    for backbone in args.backbones.split(","):
        for name in others:
            for split in SPLITS:
                a, b = (np.stack(ranks[backbone, v, split]) for v in (name, first))
                for group, users in ((g, u) for g, u in groups[split].items() if len(u) > 1):
                    va, vb = (per_user(x[:, users], sizes[split][users]) for x in (a, b))
                    tests = [seeds_test(va[m], vb[m]) for m in ("NDCG@10", "MRR")]
                    shown = [f"{t['diff']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}] p={t['p']:.3f}" for t in tests]
                    print(f"| {backbone} | {name} | {split} | {group} ({len(users)}) | " + " | ".join(shown) + " |")


if __name__ == "__main__":
    main()
