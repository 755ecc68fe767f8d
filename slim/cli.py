"""`slim`: teacher rationales, serving, student fine-tuning, student rationales, their quality, rationale vectors."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from eval.cli import guarded, stage_command
from eval.errors import user_path
from eval.io import MANIFEST, read_json
from eval.stage import Stage

from .encode import ProfileVectorsStage, VectorsStage
from .finetune import SlimStudentStage
from .profile import ProfileRationalesStage
from .quality import QUALITY_MD, QualityStage
from .rationales import TeacherRationalesStage
from .student import StudentRationalesStage

app = typer.Typer(help="SLIM: chain-of-thought rationales from a teacher LLM, distilled into a small student.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _print_counts(stage: Stage) -> None:
    typer.echo(json.dumps(read_json(stage.out / MANIFEST)["counts"], indent=2, default=str))


for command, stage_class in (("generate-rationales", TeacherRationalesStage), ("finetune-student", SlimStudentStage),
                             ("generate", StudentRationalesStage), ("profile", ProfileRationalesStage),
                             ("encode", VectorsStage), ("encode-profile", ProfileVectorsStage)):
    stage_command(app, command, stage_class, _print_counts)
stage_command(app, "quality", QualityStage, lambda stage: typer.echo((stage.out / QUALITY_MD).read_text()))


@app.command("serve")
def serve_cmd(
    model: Optional[Path] = typer.Option(None, help="Model folder (default: the adapter's base, else SmolLM2)."),
    adapter: Optional[Path] = typer.Option(None, help="LoRA adapter folder to serve on top of the model."),
    port: Optional[int] = typer.Option(None, help="Port (default: a free one)."),
    host: str = "127.0.0.1",
    backend: str = typer.Option("auto", help="auto (vLLM where it runs and is the faster engine on this machine, "
                                                "else the transformers batching server) | vllm | transformers."),
    data_parallel_size: int = typer.Option(1, help="vLLM engines, each with the whole model (vLLM's "
                                                   "--data-parallel-size: one per GPU; on CPU each its share of the "
                                                   "cores); above 1 the backend is vLLM."),
    tensor_parallel_size: int = typer.Option(1, help="GPUs (on CPU: core groups) each engine splits the model over "
                                                     "(vLLM's --tensor-parallel-size); above 1 the backend is vLLM."),
) -> None:
    """Start a local OpenAI-compatible server, wait until it answers, print its base_url; Ctrl-C, SIGTERM or
    SIGHUP stops it."""
    from eval.assets import smollm2_path

    from .serve import Server

    if model is not None:
        user_path(model, "model", "a model folder (--model)")
    if adapter is not None:
        user_path(adapter, "folder", "a LoRA adapter folder (--adapter)")
    with Server(model or (None if adapter else smollm2_path()), adapter, port, host, backend,
                data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size) as server:
        typer.echo(f"base_url={server.base_url}\nmodel={server.model_name}\nbackend={server.backend}")
        try:
            while server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


main = guarded(app)


if __name__ == "__main__":
    main()
