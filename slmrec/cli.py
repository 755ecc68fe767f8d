"""`slmrec`: ID-backbone pre-training, LLM teacher training and layer-wise distillation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from eval.cli import check_paths, guarded, run_folder, settings, stage_command
from eval.io import METRICS_FILE, read_json
from eval.stage import is_main_process
from eval.tables import floor_of, print_table

from .llm_train import SLMRecStudentConfig, StudentStage, TeacherStage, distill_ablation
from .pretrain import BackboneStage

app = typer.Typer(help="SLMRec: ID-backbone pre-training, LLM teacher training, layer-wise distillation.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def show_metrics(folder: Path) -> None:
    """The test metrics a model stage wrote, one table per protocol (under torchrun / accelerate
    launch, by rank 0 alone)."""
    if not is_main_process():
        return
    for protocol, m in read_json(folder / METRICS_FILE).items():
        print_table(f"{folder.name} test: {protocol}", {folder.name: m}, floor=floor_of(m))


for command, stage in (("pretrain", BackboneStage), ("train-teacher", TeacherStage), ("distill", StudentStage)):
    stage_command(app, command, stage, lambda s: show_metrics(s.out))


@app.command("distill-ablation")
def ablation_cmd(
    run: Path = typer.Option(..., help="Run directory (reads RUN/data and RUN/slmrec-teacher)."),
    preset: Optional[str] = typer.Option(None, help="Take the slmrec-student settings of this preset."),
    set_: list[str] = typer.Option([], "--set", help="Override a slmrec-student setting: key.path=value."),
    force: bool = typer.Option(False, help="Retrain variants even if up to date."),
) -> None:
    """SLMRec's Table 4: the student with no feature loss, then + cos, + norm, + multi-supervision;
    writes RUN/ablation/<variant> and RUN/ablation/report.md."""
    cfg = settings(SLMRecStudentConfig, StudentStage.name, preset, set_, {})
    check_paths(cfg, StudentStage.name)
    distill_ablation(run_folder(run), cfg, force)


main = guarded(app)


if __name__ == "__main__":
    main()
