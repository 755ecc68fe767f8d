"""`fusion`: data preparation, fused models, evaluation reports and the whole pipeline."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from eval.cli import guarded, stage_command
from eval.dataset import DataStage
from eval.io import read_json
from slmrec.cli import show_metrics

from .report import ReportStage
from .train import FusionStage

app = typer.Typer(help="Fusion of rationale vectors with recommenders, evaluation and the end-to-end pipeline.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

stage_command(app, "prepare", DataStage, lambda s: typer.echo(read_json(s.out / "manifest.json")["counts"]))
stage_command(app, "train", FusionStage, lambda s: show_metrics(s.out), named=True)
stage_command(app, "evaluate", ReportStage, lambda s: typer.echo((s.out / "report.md").read_text()))


@app.command("run")
def run_cmd(
    run: Path = typer.Option(Path("runs/demo"), help="Run directory for every stage's outputs."),
    preset: str = typer.Option("demo", help="Shipped preset (demo, paper) or your own .toml file."),
    set_: list[str] = typer.Option([], "--set", help="Override a preset setting: table.key=value (repeatable)."),
    until: Optional[str] = typer.Option(None, help="Stop after this stage's folder (e.g. 'sasrec')."),
) -> None:
    """The whole pipeline, stage by stage; finished stages are skipped, so a killed run resumes."""
    from .pipeline import build_stages, run_pipeline

    stages = build_stages(run, preset, set_)  # every setting is checked before anything runs
    run_pipeline(run, stages, until)


main = guarded(app)


if __name__ == "__main__":
    main()
