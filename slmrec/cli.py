"""`slmrec`: ID-backbone (SASRec, GRU4Rec) pre-training, LLM teacher training and distillation."""
from __future__ import annotations

from pathlib import Path

import typer

from eval.cli import guarded
from eval.report import floor_of, print_table

from .llm_cli import register
from .pretrain import PretrainConfig, pretrain
from .trainer import TrainConfig

app = typer.Typer(help="SLMRec: SASRec pre-training, LLM teacher training, layer-wise distillation.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.command("pretrain")
def pretrain_cmd(
    run: Path = typer.Option(..., help="Run directory (reads RUN/data, writes RUN/<model>)."),
    model: str = typer.Option("sasrec", help="Backbone: sasrec | gru4rec."),
    hidden: int = typer.Option(64, help="Item-embedding size."),
    layers: int = 2,
    heads: int = typer.Option(2, help="Attention heads (SASRec)."),
    gru_hidden: int = typer.Option(128, help="GRU state size (GRU4Rec)."),
    dropout: float = 0.2,
    max_len: int = typer.Option(50, help="Most recent items a history keeps."),
    epochs: int = 200, batch_size: int = 128, lr: float = 1e-3,
    patience: int = typer.Option(10, help="Epochs without better validation MRR before stopping."),
    seed: int = 42,
    force: bool = typer.Option(False, help="Retrain even if the output is up to date."),
) -> None:
    """Train an ID backbone (cross-entropy over all items) and export its item embeddings for SLMRec."""
    cfg = PretrainConfig(model=model, hidden=hidden, layers=layers, heads=heads, gru_hidden=gru_hidden,
                         dropout=dropout,
                         train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience,
                                           max_len=max_len, seed=seed))
    metrics = pretrain(run / "data", run / model, cfg, force=force)
    for protocol, m in metrics.items():
        print_table(f"{model} test: {protocol}", {model: m}, floor=floor_of(m))


register(app)
main = guarded(app)
