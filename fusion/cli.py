"""`fusion`: data preparation, fused models, evaluation reports and the whole pipeline."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from eval.cli import check_paths, guarded, run_folder, stage_command
from eval.dataset import DataStage
from eval.errors import InputError
from eval.io import MANIFEST, REPORT, read_json
from eval.registry import registered_type
from slmrec.cli import show_metrics

from .report import ReportStage
from .train import FusionStage

app = typer.Typer(help="Fusion of rationale vectors with recommenders, evaluation and the end-to-end pipeline.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

stage_command(app, "prepare", DataStage, lambda s: typer.echo(read_json(s.out / MANIFEST)["counts"]))
stage_command(app, "train", FusionStage, lambda s: show_metrics(s.out), named=True)
stage_command(app, "evaluate", ReportStage, lambda s: typer.echo((s.out / REPORT).read_text()))


@app.command("run")
def run_cmd(
    run: Path = typer.Option(Path("runs/demo"), help="Run directory for every stage's outputs."),
    preset: str = typer.Option("demo", help="Shipped preset (demo, study, paper) or your own .toml file."),
    set_: list[str] = typer.Option([], "--set", help="Override a preset setting: table.key=value (repeatable)."),
    until: Optional[str] = typer.Option(None, help="Stop after this stage's folder (e.g. 'sasrec')."),
    nproc: int = typer.Option(1, help="Processes each training stage runs on (ID backbones, SLMRec, SLIM "
                                      "fine-tuning, fused models): torchrun on this machine, data parallel, rank "
                                      "0 writes; the other stages run once. A batch size is per process: divide "
                                      "it by N to keep a 1-process run's global batch."),
) -> None:
    """The whole pipeline, stage by stage; finished stages are skipped, so a killed run resumes."""
    from .pipeline import build_stages, run_pipeline

    stages = build_stages(run_folder(run), preset, set_)  # every setting is checked before anything runs
    for stage in stages:
        check_paths(stage.config, stage.folder.replace("/", "."), missing_ok=True)
    run_pipeline(run, stages, until, nproc=nproc, preset=preset, overrides=set_)


@app.command("stage")
def stage_cmd(
    folder: str = typer.Argument(..., help="The stage's folder in the run, as `fusion run` names it (data, "
                                           "sasrec, slmrec-teacher, fusion/NAME, ...)."),
    run: Path = typer.Option(Path("runs/demo"), help="Run directory for every stage's outputs."),
    preset: str = typer.Option("demo", help="Shipped preset (demo, study, paper) or your own .toml file."),
    set_: list[str] = typer.Option([], "--set", help="Override a preset setting: table.key=value (repeatable)."),
    force: bool = typer.Option(False, help="Rebuild even if the output is up to date."),
) -> None:
    """One stage of the pipeline with the settings `fusion run` gives it (what `fusion run --nproc N`
    starts under torchrun for a training stage; under torchrun / accelerate launch every process
    trains and rank 0 writes)."""
    from eval.stage import is_main_process, run_stage

    from .pipeline import build_stages, stage_of

    stage = stage_of(build_stages(run_folder(run), preset, set_), folder, preset)
    check_paths(stage.config, folder.replace("/", "."))
    result = run_stage(stage, force=force)
    if is_main_process():
        typer.echo(f"{stage.out}: {result.status} ({result.seconds} s)")


def run_and_model(run: Path, model: str | None) -> tuple[Path, str | None]:
    """The run folder and the model folder asked for, checked before anything loads, so an error
    names the one asked for (the Recommender's own check lists the run's models, reading every
    config.json: a broken one of another model would be named instead)."""
    run = run_folder(run, must_exist=True)
    if model is not None:
        registered_type(run / model)
    return run, model


@app.command("recommend")
def recommend_cmd(
    run: Path = typer.Option(..., help="Run directory."),
    user: str = typer.Option(..., help="The user's raw id in the data set (users.parquet raw_id, e.g. '196' on "
                                       "ml-100k), not the 0-based index."),
    k: int = typer.Option(10, help="How many items (never one already in the user's history)."),
    model: Optional[str] = typer.Option(None, help="Model folder of the run, e.g. fusion/hybrid-slmrec-student or "
                                                   "sasrec (default: the fused model with the best validation MRR, "
                                                   "else sasrec)."),
    json_: bool = typer.Option(False, "--json", help="Print the answer as JSON (as `fusion serve` returns it)."),
) -> None:
    """A user's recent history, their rationale and the top-k items with the evidence linking each to it."""
    import json

    from .recommend import Recommender, show

    answer = Recommender(*run_and_model(run, model)).for_user(user, k)
    if json_:
        typer.echo(json.dumps(answer, indent=2, ensure_ascii=False))
    else:
        show(answer)


@app.command("serve")
def serve_cmd(
    run: Path = typer.Option(..., help="Run directory."),
    model: Optional[str] = typer.Option(None, help="Model folder of the run (default: as `fusion recommend`)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8080, help="Port to listen on."),
    token_env: Optional[str] = typer.Option(None, help="Environment variable holding a bearer token every API "
                                                       "request must carry (none: no token; never logged)."),
    student_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint of the SLIM student, for new "
                                                         "users (default: the run's, when its student rationales "
                                                         "were written through one; none: new users get 503)."),
    student_model: Optional[str] = typer.Option(None, help="Model name at that endpoint (default: its one model)."),
    student_timeout: float = typer.Option(120.0, help="Seconds a new user's rationale may take before the request "
                                                      "fails with 502."),
    serve_student: bool = typer.Option(False, help="Serve the run's SLIM student (RUN/slim-student, as `slim serve` "
                                                   "does: the engine and dtype the hardware calls for) for new users "
                                                   "while the service runs."),
) -> None:
    """Recommendations over HTTP (known users, new users' histories, items) and a page at /."""
    import contextlib
    import os

    import uvicorn

    from slim.finetune import SlimStudentStage
    from slim.serve import Server

    from .recommend import Recommender
    from .service import StudentWriter, create_app, student_settings

    token = None
    if token_env is not None:
        token = os.environ.get(token_env)
        if not token:
            raise InputError(f"--token-env: environment variable {token_env} is not set or empty")
    if serve_student and student_url:
        raise InputError("--serve-student and --student-url: give one of them")
    rec = Recommender(*run_and_model(run, model))
    cfg = student_settings(rec.run)
    url = student_url or (cfg.client.base_url if cfg.backend == "endpoint" else None)
    with contextlib.ExitStack() as stack:
        if serve_student:
            server = stack.enter_context(Server(adapter=rec.run / SlimStudentStage.name))
            url, student_model = server.base_url, student_model or server.model_name
        writer = StudentWriter(rec, url, student_model, student_timeout) if url else None
        typer.echo(f"serving {rec.run / rec.name} on http://{host}:{port}/ (new users: {url or 'off'})")
        # uvicorn shuts down on SIGTERM, then raises it again: `guarded`'s handler unwinds it (and stops the student)
        uvicorn.run(create_app(rec, writer, token), host=host, port=port)


main = guarded(app)


if __name__ == "__main__":
    main()
