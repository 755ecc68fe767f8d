"""`slim`: teacher rationales, serving, student fine-tuning, student rationales, rationale vectors."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from eval.cli import guarded

from .client import ClientConfig
from .prompts import STUDENT, TEACHER

app = typer.Typer(help="SLIM: chain-of-thought rationales from a teacher LLM, distilled into a small student.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _print_summary(summary: dict) -> None:
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command("generate-rationales")
def generate_rationales_cmd(
    data: Path = typer.Option(..., help="Prepared data folder (e.g. runs/x/data)."),
    out: Path = typer.Option(..., help="Output folder: records.jsonl (append-only) + manifest.json."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1."),
    model: Optional[str] = typer.Option(None, help="Model name in requests (default: the served model)."),
    serve: Optional[Path] = typer.Option(None, help="Start a local server for this model folder for the run "
                                                     "(instead of --base-url)."),
    users: Optional[int] = typer.Option(None, help="Seeded sample of N users (default: all)."),
    template: str = typer.Option(TEACHER, help="Prompt version in prompts/ or a template file."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Name of the environment variable holding the key."),
    temperature: float = 0.7, max_tokens: int = 200, concurrency: int = 4,
    timeout: float = typer.Option(120.0, help="Per-request timeout (s)."),
    retries: int = typer.Option(5, help="Retries on 429/5xx/timeouts, exponential backoff."),
    history_tokens: int = typer.Option(256, help="Token budget of a rendered history."),
    price_prompt: float = typer.Option(0.0, help="USD per 1M prompt tokens (cost estimate)."),
    price_completion: float = typer.Option(0.0, help="USD per 1M completion tokens (cost estimate)."),
    seed: int = 42,
) -> None:
    """Teacher chain-of-thought rationales (3 steps) for a sample of users; resumable."""
    from .rationales import RationaleConfig, generate_rationales
    from .serve import Server

    if (base_url is None) == (serve is None):
        raise typer.BadParameter("give exactly one of --base-url and --serve")
    client = ClientConfig(base_url=base_url or "", model=model or "", api_key_env=api_key_env,
                          temperature=temperature, max_tokens=max_tokens, concurrency=concurrency,
                          timeout_s=timeout, max_retries=retries, price_prompt_per_1m=price_prompt,
                          price_completion_per_1m=price_completion, seed=seed)
    cfg = RationaleConfig(template=template, users=users, seed=seed, history_tokens=history_tokens, client=client)
    if serve is None:
        _print_summary(generate_rationales(data, out, cfg))
        return
    with Server(serve, log_path=out / "server.log") as server:
        client.base_url, client.model = server.base_url, model or server.model_name
        _print_summary(generate_rationales(data, out, cfg))


@app.command("serve")
def serve_cmd(
    model: Optional[Path] = typer.Option(None, help="Model folder (default: the adapter's base, else SmolLM2)."),
    adapter: Optional[Path] = typer.Option(None, help="LoRA adapter folder to serve on top of the model."),
    port: Optional[int] = typer.Option(None, help="Port (default: a free one)."),
    host: str = "127.0.0.1",
    backend: str = typer.Option("auto", help="auto (vllm if installed, else transformers) | vllm | transformers."),
) -> None:
    """Start a local OpenAI-compatible server, wait until it answers, print its base_url; Ctrl-C stops it."""
    from eval.assets import smollm2_path

    from .serve import Server

    with Server(model or (None if adapter else smollm2_path()), adapter, port, host, backend) as server:
        typer.echo(f"base_url={server.base_url}\nmodel={server.model_name}\nbackend={server.backend}")
        try:
            while server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


main = guarded(app)

if __name__ == "__main__":
    main()
