"""`slmrec train-teacher` and `slmrec distill`, added to the slmrec app by `register(app)`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from eval.report import floor_of, print_table

from .distill import DistillConfig
from .llm import DEFAULT_PROMPT, LLMRecConfig
from .llm_train import DistillRunConfig, LLMTrainConfig, TeacherConfig, distill, distill_ablation, train_teacher

Run = Annotated[Path, typer.Option(help="Run directory (reads RUN/data and RUN/sasrec).")]
Base = Annotated[str | None, typer.Option(help="Base LLaMA-family model: HF folder or .gguf file "
                                                "(default: the embedded SmolLM2-135M).")]
Stride = Annotated[int, typer.Option(help="Keep every n-th base layer instead of the first ones.")]
LoraR = Annotated[int, typer.Option(help="LoRA rank.")]
LoraAlpha = Annotated[int, typer.Option(help="LoRA alpha.")]
LoraDropout = Annotated[float, typer.Option(help="LoRA dropout.")]
LoraTargets = Annotated[str, typer.Option(help="Comma-separated modules that get LoRA adapters.")]
Prompt = Annotated[str, typer.Option(help="Prompt template name in prompts/ or a file.")]
MaxLen = Annotated[int, typer.Option(help="Most recent history items the model reads.")]
Epochs = Annotated[float, typer.Option(help="Training epochs (fractions allowed).")]
BatchSize = Annotated[int, typer.Option(help="Per-device training batch size.")]
Lr = Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")]
Positions = Annotated[str, typer.Option(help="Train on every prefix ('all') or the last item only ('last').")]
EvalsPerEpoch = Annotated[int, typer.Option(help="Validation-MRR checks (and checkpoints) per epoch.")]
ValidUsers = Annotated[int | None, typer.Option(help="Validate on a random subset of users (default all).")]
Bf16 = Annotated[bool, typer.Option(help="bf16 base weights and mixed precision (GPU).")]
Seed = Annotated[int, typer.Option(help="Random seed.")]
Force = Annotated[bool, typer.Option(help="Retrain even if the output is up to date.")]


def _model(base, layers, stride, lora_r, lora_alpha, lora_dropout, lora_targets, prompt, bf16, seed) -> LLMRecConfig:
    return LLMRecConfig(base=base, layers=layers, layer_stride=stride, lora_r=lora_r, lora_alpha=lora_alpha,
                        lora_dropout=lora_dropout, lora_targets=[t.strip() for t in lora_targets.split(",")],
                        prompt=prompt, dtype="bfloat16" if bf16 else "float32", seed=seed)


def _train(max_len, epochs, batch_size, lr, positions, evals_per_epoch, valid_users, bf16, seed) -> LLMTrainConfig:
    return LLMTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, max_len=max_len, positions=positions,
                          evals_per_epoch=evals_per_epoch, valid_users=valid_users, bf16=bf16, seed=seed)


def _show(title: str, metrics: dict[str, dict]) -> None:
    for protocol, m in metrics.items():
        print_table(f"{title} test: {protocol}", {title: m}, floor=floor_of(m))


def train_teacher_cmd(
    run: Run, base: Base = None,
    layers: Annotated[int, typer.Option(help="Decoder layers of the teacher.")] = 8,
    stride: Stride = 1, lora_r: LoraR = 16, lora_alpha: LoraAlpha = 32, lora_dropout: LoraDropout = 0.05,
    lora_targets: LoraTargets = "gate_proj,up_proj,down_proj", prompt: Prompt = DEFAULT_PROMPT,
    max_len: MaxLen = 20, epochs: Epochs = 1.0, batch_size: BatchSize = 32, lr: Lr = 2e-3,
    positions: Positions = "all", evals_per_epoch: EvalsPerEpoch = 2, valid_users: ValidUsers = None,
    bf16: Bf16 = False, seed: Seed = 42, force: Force = False,
) -> None:
    """Train the LLM teacher (E4SRec-style, LoRA) on SASRec item embeddings; writes RUN/teacher."""
    cfg = TeacherConfig(model=_model(base, layers, stride, lora_r, lora_alpha, lora_dropout, lora_targets, prompt,
                                     bf16, seed),
                        train=_train(max_len, epochs, batch_size, lr, positions, evals_per_epoch, valid_users,
                                     bf16, seed))
    _show("teacher", train_teacher(run / "data", run / "sasrec", run / "teacher", cfg, force=force))


def distill_cmd(
    run: Run,
    layers: Annotated[int, typer.Option(help="Decoder layers of the student.")] = 4,
    blocks: Annotated[int, typer.Option(help="Blocks B: features aligned after every N/B layers.")] = 4,
    lambda_cos: Annotated[float, typer.Option(help="Weight of the cosine feature loss (0 = off).")] = 1.0,
    lambda_norm: Annotated[float, typer.Option(help="Weight of the L2 feature loss (0 = off).")] = 0.1,
    lambda_ms: Annotated[float, typer.Option(help="Weight of the intermediate heads' CE (0 = off).")] = 1.0,
    online: Annotated[bool, typer.Option(help="Online KD: train a fresh teacher alongside the student.")] = False,
    teacher_layers: Annotated[int, typer.Option(help="Online KD: depth of the teacher.")] = 8,
    ablation: Annotated[bool, typer.Option(help="Train and test the four variants of SLMRec's Table 4 "
                                                "(writes RUN/ablation).")] = False,
    base: Base = None, stride: Stride = 1, lora_r: LoraR = 16, lora_alpha: LoraAlpha = 32,
    lora_dropout: LoraDropout = 0.05, lora_targets: LoraTargets = "gate_proj,up_proj,down_proj",
    prompt: Prompt = DEFAULT_PROMPT, max_len: MaxLen = 20, epochs: Epochs = 1.0, batch_size: BatchSize = 32,
    lr: Lr = 2e-3, positions: Positions = "all", evals_per_epoch: EvalsPerEpoch = 2, valid_users: ValidUsers = None,
    bf16: Bf16 = False, seed: Seed = 42, force: Force = False,
) -> None:
    """Distill a student from RUN/teacher (offline KD) or with a teacher trained alongside (--online); writes RUN/student."""
    cfg = DistillRunConfig(
        student=_model(base, layers, stride, lora_r, lora_alpha, lora_dropout, lora_targets, prompt, bf16, seed),
        distill=DistillConfig(blocks=blocks, lambda_cos=lambda_cos, lambda_norm=lambda_norm, lambda_ms=lambda_ms,
                              mode="online" if online else "offline"),
        train=_train(max_len, epochs, batch_size, lr, positions, evals_per_epoch, valid_users, bf16, seed),
        online_teacher_layers=teacher_layers)
    teacher = None if online else run / "teacher"
    if ablation:
        distill_ablation(run / "data", teacher, run / "ablation", cfg, sasrec=run / "sasrec", force=force)
        return
    _show("student", distill(run / "data", teacher, run / "student", cfg, sasrec=run / "sasrec", force=force))


def register(app: typer.Typer) -> None:
    """Add the LLM stages to the `slmrec` app."""
    app.command("train-teacher")(train_teacher_cmd)
    app.command("distill")(distill_cmd)
