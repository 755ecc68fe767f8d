"""`fusion`: data preparation, fused models, evaluation reports and the whole pipeline."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from eval.cli import guarded
from eval.dataset import prepare_dataset, source_inputs
from eval.io import is_up_to_date
from eval.preprocess import PrepareConfig
from eval.report import floor_of, print_table

app = typer.Typer(help="Fusion of rationale vectors with recommenders, evaluation and the end-to-end pipeline.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _group() -> None:
    """Keep sub-command names even while the app has a single command."""


@app.command("prepare")
def prepare_cmd(
    run: Path = typer.Option(..., help="Run directory; writes RUN/data."),
    source: str = typer.Option("ml-100k", help="Embedded data set (ml-100k, ml-1m) or a path."),
    format: str = typer.Option("auto", help="recbole | movielens | amazon | auto."),
    meta: Optional[str] = typer.Option(None, help="Amazon metadata file (meta_*.json[l].gz)."),
    rating_gt: Optional[float] = typer.Option(3.0, help="Keep ratings above this (SLMRec: >3)."),
    all_ratings: bool = typer.Option(False, help="Keep every rating (SASRec paper protocol)."),
    user_core: int = 5, item_core: int = 5,
    negatives: str = typer.Option("100,999", help="Sizes of the fixed negative candidate lists."),
    seed: int = 42,
    force: bool = typer.Option(False, help="Rebuild even if the output is up to date."),
) -> None:
    """Read raw data, filter, k-core, split leave-one-out and sample fixed candidates."""
    cfg = PrepareConfig(source=source, format=format, meta=meta, rating_gt=None if all_ratings else rating_gt,
                        user_core=user_core, item_core=item_core,
                        negatives=[int(n) for n in negatives.split(",") if n], seed=seed)
    out = run / "data"
    if not force and is_up_to_date(out, source_inputs(cfg), cfg.to_dict()):
        typer.echo(f"{out}: up to date")
        return
    ds = prepare_dataset(cfg, out)
    typer.echo(f"{out}: {ds.manifest['counts']}")


@app.command("evaluate")
def evaluate_cmd(
    run: Path = typer.Option(..., help="Run directory; scores every trained model in it."),
    out: Optional[Path] = typer.Option(None, help="Report folder (default RUN/report)."),
) -> None:
    """Score every model of a run on the same fixed candidates and full ranking; write the report."""
    from .report import evaluate_run
    evaluate_run(run, out or run / "report")


main = guarded(app)
