"""`slim`: teacher rationales, serving, student fine-tuning, student rationales, rationale vectors."""
from __future__ import annotations

import json
import signal
import sys
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
    frequency_penalty: Optional[float] = typer.Option(None, help="Repetition penalty (OpenAI semantics)."),
    timeout: float = typer.Option(120.0, help="Per-request timeout (s)."),
    retries: int = typer.Option(5, help="Retries on 429/5xx/timeouts, exponential backoff."),
    history_tokens: int = typer.Option(128, help="Token budget of a rendered history (most recent items kept)."),
    price_prompt: float = typer.Option(0.0, help="USD per 1M prompt tokens (cost estimate)."),
    price_completion: float = typer.Option(0.0, help="USD per 1M completion tokens (cost estimate)."),
    seed: int = 42,
) -> None:
    """Teacher chain-of-thought rationales (3 steps) for a sample of users; resumable."""
    from .rationales import RationaleConfig, generate_rationales

    if (base_url is None) == (serve is None):
        raise typer.BadParameter("give exactly one of --base-url and --serve")
    client = ClientConfig(base_url=base_url or "", model=model or "", api_key_env=api_key_env,
                          temperature=temperature, max_tokens=max_tokens, concurrency=concurrency,
                          frequency_penalty=frequency_penalty, timeout_s=timeout, max_retries=retries, price_prompt_per_1m=price_prompt,
                          price_completion_per_1m=price_completion, seed=seed)
    cfg = RationaleConfig(template=template, users=users, seed=seed, history_tokens=history_tokens, client=client,
                          serve=str(serve) if serve else None)
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


@app.command("finetune-student")
def finetune_cmd(
    data: Path = typer.Option(..., help="Prepared data folder."),
    records: Path = typer.Option(..., help="Teacher records.jsonl (records with errors are skipped)."),
    out: Path = typer.Option(..., help="Adapter folder to write (adapter + tokenizer + manifest.json)."),
    base_model: Optional[Path] = typer.Option(None, help="Local causal LM folder (default: SmolLM2-135M-Instruct)."),
    epochs: float = 2.0, lr: float = 5e-4, batch_size: int = 4,
    max_length: int = typer.Option(512, help="Max prompt + answer tokens per example."),
    history_tokens: int = typer.Option(128, help="Token budget of a rendered history (as in slim generate)."),
    lora_r: int = 16, lora_alpha: int = 32, val_fraction: float = 0.1, seed: int = 42,
    force: bool = typer.Option(False, help="Retrain even if the adapter is up to date."),
) -> None:
    """LoRA fine-tuning of the student on (student prompt -> teacher rationale), loss on answers only."""
    from .finetune import FinetuneConfig, finetune_student

    cfg = FinetuneConfig(base_model=str(base_model) if base_model else None, epochs=epochs, lr=lr,
                         batch_size=batch_size, max_length=max_length, history_tokens=history_tokens,
                         lora_r=lora_r, lora_alpha=lora_alpha, val_fraction=val_fraction, seed=seed)
    _print_summary(finetune_student(data, records, out, cfg, force=force))


@app.command("generate")
def generate_cmd(
    data: Path = typer.Option(..., help="Prepared data folder."),
    adapter: Path = typer.Option(..., help="Student LoRA adapter folder (from finetune-student)."),
    out: Path = typer.Option(..., help="Output folder: records.jsonl + manifest.json."),
    backend: str = typer.Option("local", help="local (in-process batched generate) | endpoint (served)."),
    base_url: Optional[str] = typer.Option(None, help="Endpoint already serving the student (endpoint backend); "
                                                      "default: serve it for the run."),
    model: Optional[str] = typer.Option(None, help="Model name in requests (default: the served model)."),
    base_model: Optional[Path] = typer.Option(None, help="Base model folder (default: the adapter's)."),
    users: Optional[int] = typer.Option(None, help="Seeded sample of N users (default: all)."),
    max_tokens: int = 96, temperature: float = 0.0,
    batch_size: int = typer.Option(16, help="Users per batch (local backend)."),
    concurrency: int = typer.Option(4, help="Requests in flight (endpoint backend)."),
    timeout: float = 900.0, history_tokens: int = 128, seed: int = 42,
) -> None:
    """Student rationales for every user, in the teacher's record format; resumable."""
    from .rationales import RationaleConfig
    from .student import StudentConfig, generate_student

    client = ClientConfig(model=model or "", temperature=temperature, max_tokens=max_tokens,
                          concurrency=concurrency, timeout_s=timeout, seed=seed)
    cfg = StudentConfig(adapter=str(adapter), base_model=str(base_model) if base_model else None, backend=backend,
                        base_url=base_url, batch_size=batch_size,
                        rationale=RationaleConfig(template=STUDENT, users=users, seed=seed,
                                                  history_tokens=history_tokens, client=client))
    _print_summary(generate_student(data, out, cfg))


@app.command("encode")
def encode_cmd(
    data: Path = typer.Option(..., help="Prepared data folder (item texts)."),
    records: Path = typer.Option(..., help="Rationale records.jsonl (student's, for every user)."),
    out: Path = typer.Option(..., help="LanceDB folder (tables user_rationales, item_texts)."),
    model: Optional[Path] = typer.Option(None, help="sentence-transformers folder (default: all-MiniLM-L6-v2)."),
    prompt_version: Optional[str] = typer.Option(None, help="Encode only records of this prompt version."),
    batch_size: int = 64,
    ann_index: bool = typer.Option(False, help="Build an ANN (IVF-PQ) index, for large catalogs."),
    force: bool = typer.Option(False, help="Check every row even if records and data are unchanged."),
) -> None:
    """Encode user rationales and item texts into LanceDB, re-encoding only changed rows."""
    from .encode import EncodeConfig, encode

    cfg = EncodeConfig(model=str(model) if model else None, batch_size=batch_size,
                       prompt_version=prompt_version, ann_index=ann_index)
    _print_summary(encode(data, records, out, cfg, force=force))


def main() -> None:
    """Console entry: SIGTERM unwinds like Ctrl-C, so a server started for a run is stopped with it."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    guarded(app)()

if __name__ == "__main__":
    main()
