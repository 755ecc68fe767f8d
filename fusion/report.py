"""`fusion evaluate`: every trained model of a run, judged on the same candidates, in one report."""
from __future__ import annotations

import json
from pathlib import Path

from eval.dataset import load_dataset
from eval.errors import InputError
from eval.evaluate import PROTOCOLS, evaluate, protocol_label, protocols_of
from eval.report import write_metrics_report

from .registry import LOADERS, load_model, max_len_of


def find_models(run: Path) -> dict[str, Path]:
    """Model folders of a run (any sub-folder whose config.json names a known model_type), by name."""
    found = {}
    for cfg in sorted(run.glob("**/config.json")):
        try:
            kind = json.loads(cfg.read_text()).get("model_type")
        except json.JSONDecodeError:
            continue
        if kind in LOADERS and not any(part.startswith(".") for part in cfg.relative_to(run).parts):
            found[str(cfg.parent.relative_to(run))] = cfg.parent
    return found


def evaluate_run(run: Path, out: Path, protocols: tuple[str, ...] = PROTOCOLS) -> dict:
    ds = load_dataset(run / "data")
    models = find_models(run)
    if not models:
        raise InputError(f"{run}: no trained model found (run `slmrec pretrain --run {run}` first)")
    results: dict[str, dict[str, dict]] = {}
    for name, path in models.items():
        model = load_model(path)
        for p in protocols_of(ds, protocols):
            results.setdefault(protocol_label(p), {})[name] = evaluate(model, ds, "test", p, max_len=max_len_of(model))
    write_metrics_report(out, results, f"Test metrics: {run.name}")
    return results
