"""LoRA supervised fine-tuning of the student: student prompt -> the teacher's rationale.

Examples are built with the model's chat template (the same one the server applies at generation
time) and the loss covers the answer tokens only: prompt positions are labelled -100. A seeded set of
teacher users is held out of training (`heldout_users.json`) so the student can be judged against the
teacher on users it never saw. On a CPU with AVX-512 BF16 (or AMX) and on bf16 GPUs the matmuls run in
bf16 autocast; batches group examples of similar length, so little of a batch is padding, and the LM
head scores answer positions only (`AnswerCollator`).
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval.assets import smollm2_path
from eval.config import setting
from eval.dataset import load_dataset
from eval.errors import InputError
from eval.io import CONFIG, write_json
from eval.stage import Stage
from prompts import template_path

from .hardware import native_bf16
from .lora import load_causal_lm
from .prompts import STUDENT, instruction_words
from .records import RECORDS, parse_steps, rationale_text, read_records

IGNORE = -100
HELDOUT = "heldout_users.json"  # in RUN/slim-student: teacher users kept out of fine-tuning


@dataclass(frozen=True)
class SlimStudentConfig:
    base_model: str | None = setting(None, "Local causal LM folder (none: SmolLM2-135M-Instruct).")
    template: str = setting(STUDENT, "Student prompt version in prompts/ (the one it will be asked with).")
    history_tokens: int = setting(128, "Token budget of a rendered history (as in student generation).")
    max_length: int = setting(512, "Most prompt + answer tokens per example; longer answers lose their tail.")
    epochs: float = setting(2.0, "Training epochs.")
    lr: float = setting(5e-4, "Peak learning rate (cosine schedule).")
    batch_size: int = setting(4, "Examples per batch.")
    grad_accum: int = setting(1, "Gradient accumulation steps.")
    lora_r: int = setting(16, "LoRA rank.")
    lora_alpha: int = setting(32, "LoRA alpha.")
    lora_dropout: float = setting(0.05, "LoRA dropout.")
    target_modules: list[str] = setting(help="Modules that get LoRA adapters.",
                                        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
    val_fraction: float = setting(0.1, "Share of the teacher's records (after `heldout`) used for validation.")
    heldout: int = setting(0, "Teacher users with well-formed records kept out of fine-tuning and validation "
                              "(seeded), listed in heldout_users.json: the student is compared with the "
                              "teacher on them.")
    bf16: bool | None = setting(None, "bf16 autocast (none: where the hardware runs it natively: a bf16 GPU, "
                                      "a CPU with AVX-512 BF16 or AMX).")
    seed: int = setting(42, "Random seed.")


def tokenize_example(tok, prompt: str, answer: str, max_length: int) -> dict[str, list[int]]:
    """Chat-formatted prompt + answer + end-of-turn, with the prompt masked out of the labels."""
    p = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                tokenize=True, return_dict=True)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + a)[:max_length]
    labels = ([IGNORE] * len(p) + a)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def training_pairs(data_dir: str | Path, records: str | Path, cfg: SlimStudentConfig,
                   tokenizer: str | Path) -> dict[int, tuple[str, str]]:
    """user -> (student prompt, teacher rationale) for every teacher record without an error (parsed
    again, so records written before a parser fix are judged by the current rules)."""
    ds = load_dataset(data_dir)
    recs = {u: r for u, r in read_records(records, ok_only=True).items()
            if parse_steps(r.get("text", ""), instruction_words(r["prompt_version"], ds.domain))[1] is None}
    if not recs:
        raise InputError(f"{records}: no teacher record without an error to train on")
    from .rationales import GenerationConfig, user_prompts

    prompts = user_prompts(ds, sorted(recs), GenerationConfig(template=cfg.template, history_tokens=cfg.history_tokens,
                                                              tokenizer=str(tokenizer)))
    return {u: (prompts[u], rationale_text(recs[u])) for u in sorted(recs)}


def split_users(users: list[int], heldout: int, val_fraction: float, seed: int) -> tuple[list[int], list[int], list[int]]:
    """(held out, validation, training) users: one seeded permutation, held-out users first; at least
    one user is left to train on."""
    if heldout < 0 or heldout >= len(users):
        raise InputError(f"heldout = {heldout}: must be at least 0 and below the {len(users)} teacher users "
                         f"with a well-formed record")
    order = [users[i] for i in np.random.default_rng(seed).permutation(len(users))]
    held, rest = sorted(order[:heldout]), order[heldout:]
    n_val = max(1, int(round(len(rest) * val_fraction))) if len(rest) > 1 and val_fraction > 0 else 0
    return held, sorted(rest[:n_val]), sorted(rest[n_val:])


def training_args(cfg: SlimStudentConfig, out: Path, evaluate: bool, **overrides: Any):
    """The Trainer's arguments: cosine schedule, length-grouped batches, bf16 autocast where native."""
    import torch
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(
        output_dir=str(out / "trainer"), num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, eval_strategy="epoch" if evaluate else "no",
        save_strategy="no", logging_steps=5, report_to=[], seed=cfg.seed, lr_scheduler_type="cosine",
        warmup_steps=0, use_cpu=not torch.cuda.is_available(), train_sampling_strategy="group_by_length",
        bf16=native_bf16() if cfg.bf16 is None else cfg.bf16)
    return TrainingArguments(**{**kwargs, **overrides})


class AnswerCollator:
    """Pads a batch (DataCollatorForSeq2Seq) and has the LM head score only the positions from just
    before the batch's earliest answer token (`logits_to_keep`): prompt positions carry no loss, and
    the head over a 49k vocabulary is a fifth of a small model's work per token. The labels are cut
    to the same window; what is cut is all -100, so the loss and its token count are unchanged."""

    def __init__(self, tok):
        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE, padding=True)

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.pad(rows)
        labels = batch["labels"]
        answer = (labels != IGNORE).any(dim=0).nonzero()
        if len(answer):  # logits at position t predict the label at t + 1: keep from first answer - 1
            keep = labels.shape[1] - max(int(answer[0]) - 1, 0)
            batch["labels"], batch["logits_to_keep"] = labels[:, -keep:], keep
        return batch


def make_trainer(cfg: SlimStudentConfig, base: Path, tok, train: list[dict], val: list[dict], out: Path,
                 collator: Any = None, **overrides: Any):
    """A Trainer of a fresh LoRA on `base` for tokenized examples (`collator` None: AnswerCollator;
    `overrides` go to TrainingArguments)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    model = get_peft_model(load_causal_lm(base), LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, task_type="CAUSAL_LM"))
    return Trainer(model=model, args=training_args(cfg, out, bool(val), **overrides),
                   train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(val) if val else None,
                   data_collator=collator or AnswerCollator(tok))


class SlimStudentStage(Stage):
    """LoRA fine-tuning of the SLIM student on (student prompt -> teacher rationale), loss on the
    answer only, a seeded set of teacher users held out; writes RUN/slim-student (adapter, tokenizer,
    heldout_users.json)."""

    name = "slim-student"
    config_class = SlimStudentConfig

    def inputs(self) -> dict[str, Path]:
        from .rationales import TeacherRationalesStage

        files = {"data": self.data_dir, "records": self.run / TeacherRationalesStage.name,
                 "template": template_path(self.config.template)}
        if self.config.base_model is None:  # the embedded default may change with its package; a path is in the config
            files["base"] = smollm2_path()
        return files

    def build(self, out: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoTokenizer, set_seed

        cfg = self.config
        base = Path(cfg.base_model or smollm2_path())
        if not (base / CONFIG).exists():
            raise InputError(f"{base}: not a model folder (no config.json)")
        set_seed(cfg.seed)
        tok = AutoTokenizer.from_pretrained(base)
        tok.pad_token = tok.pad_token or tok.eos_token
        pairs = training_pairs(self.data_dir, self.inputs()["records"] / RECORDS, cfg, base)
        held, val_users, train_users = split_users(sorted(pairs), cfg.heldout, cfg.val_fraction, cfg.seed)
        rows = {u: tokenize_example(tok, *pairs[u], cfg.max_length) for u in val_users + train_users}
        trainer = make_trainer(cfg, base, tok, [rows[u] for u in train_users], [rows[u] for u in val_users], out)
        result = trainer.train()
        # the Trainer's figure is this process's share; the mean over processes is the whole batch's
        train_loss, acc = result.training_loss, trainer.accelerator
        if acc.num_processes > 1:
            train_loss = float(acc.reduce(torch.tensor(train_loss, device=acc.device), reduction="mean"))
        last = [h for h in trainer.state.log_history if "eval_loss" in h and h["step"] == trainer.state.global_step]
        val_loss = last[-1]["eval_loss"] if last else trainer.evaluate()["eval_loss"] if val_users else None
        trainer.model.save_pretrained(out)
        tok.save_pretrained(out)
        write_json(out / HELDOUT, held)
        shutil.rmtree(out / "trainer", ignore_errors=True)
        seconds = result.metrics["train_runtime"]
        return {"train_examples": len(train_users), "val_examples": len(val_users), "heldout_users": len(held),
                "train_loss": round(train_loss, 4),
                "val_loss": None if val_loss is None else round(val_loss, 4),
                "val_perplexity": None if val_loss is None else round(math.exp(val_loss), 2),
                "answer_tokens": int(sum(sum(x != IGNORE for x in r["labels"]) for r in rows.values())),
                "bf16": trainer.args.bf16, "seconds": round(seconds, 1),
                "examples_per_s": round(len(train_users) * cfg.epochs / seconds, 3) if seconds else None,
                "history": [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]}
