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
    analysis_protocol: str = typer.Option("full", help="Protocol of the group, popularity and efficiency "
                                                       "analyses: full or a candidate size (e.g. 999)."),
) -> None:
    """Score every model of a run on the same fixed candidates and full ranking; write the report."""
    from .report import evaluate_run
    evaluate_run(run, out or run / "report", analysis_protocol)


@app.command("train")
def train_cmd(
    run: Path = typer.Option(..., help="Run directory (reads RUN/data, the backbone and the vectors)."),
    name: str = typer.Option(..., help="Model name; writes RUN/fusion/NAME."),
    mode: str = typer.Option("hybrid", help="hybrid (text + ID backbone) | text (ID-agnostic text matching)."),
    backbone: str = typer.Option("student", help="Backbone folder in RUN for hybrid: student (SLMRec) or sasrec."),
    vectors: Optional[Path] = typer.Option(None, help="LanceDB folder of `slim encode` (default RUN/vectors)."),
    finetune_backbone: bool = typer.Option(False, help="Train the backbone too (default: frozen)."),
    hidden: int = typer.Option(64, help="Size of the text-only model's vectors."),
    user_group: Optional[int] = typer.Option(None, help="Train and select on one of the 5 history-length groups "
                                                        "(0 = shortest)."),
    epochs: int = 100, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 1e-4, patience: int = 10,
    seed: int = 42,
    force: bool = typer.Option(False, help="Retrain even if the output is up to date."),
) -> None:
    """Fuse rationale and item-text vectors with an ID backbone (SLIM's fusion), or match text alone."""
    from slmrec.trainer import TrainConfig

    from .train import FuseConfig, train_fused
    from .vectors import load_vectors
    cfg = FuseConfig(mode=mode, backbone=backbone, freeze_backbone=not finetune_backbone, hidden=hidden,
                     user_group=user_group, train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr,
                                                              weight_decay=weight_decay, patience=patience, seed=seed))
    metrics = train_fused(run, name, cfg, load_vectors(vectors or run / "vectors"), force=force)
    for protocol, m in metrics.items():
        print_table(f"fusion {name} test: {protocol}", {name: m}, floor=floor_of(m))


@app.command("run")
def run_cmd(
    run: Path = typer.Option(Path("runs/demo"), help="Run directory for every stage's outputs."),
    preset: str = typer.Option("demo", help="Shipped preset (demo, paper) or your own .toml file."),
    set_: list[str] = typer.Option([], "--set", help="Override a preset setting: section.key=value (repeatable)."),
    until: Optional[str] = typer.Option(None, help="Stop after this stage (e.g. 'sasrec')."),
) -> None:
    """The whole pipeline, stage by stage; finished stages are skipped, so a killed run resumes."""
    from .pipeline import Pipeline, load_preset
    Pipeline(run, load_preset(preset, set_)).run_all(until)


main = guarded(app)


if __name__ == "__main__":
    main()
