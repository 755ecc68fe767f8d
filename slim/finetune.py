"""LoRA supervised fine-tuning of the student: student prompt -> the teacher's rationale.

Examples are built with the model's chat template (the same one the server applies at generation
time) and the loss covers the answer tokens only: prompt positions are labelled -100.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval.assets import smollm2_path
from eval.dataset import load_dataset
from eval.errors import InputError
from eval.io import atomic_dir, file_hash, is_up_to_date, manifest, read_json, write_json

from .lora import load_causal_lm
from .prompts import STUDENT
from .rationales import RationaleConfig, user_prompts
from .records import parse_steps, rationale_text, read_records

IGNORE = -100


@dataclass
class FinetuneConfig:
    base_model: str | None = None          # local model folder; default: SmolLM2-135M-Instruct
    template: str = STUDENT
    history_tokens: int = 128              # must match the student generation budget
    max_length: int = 512                  # prompt + answer tokens; longer answers lose their tail
    epochs: float = 2.0
    lr: float = 5e-4
    batch_size: int = 4
    grad_accum: int = 1
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])
    val_fraction: float = 0.1
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_example(tok, prompt: str, answer: str, max_length: int) -> dict[str, list[int]]:
    """Chat-formatted prompt + answer + end-of-turn, with the prompt masked out of the labels."""
    p = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                tokenize=True, return_dict=True)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + a)[:max_length]
    labels = ([IGNORE] * len(p) + a)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def training_pairs(data_dir: str | Path, records: str | Path, cfg: FinetuneConfig, tokenizer: str | Path) -> list[tuple[str, str]]:
    """(student prompt, teacher rationale) for every teacher record without an error (parsed again, so
    records written before a parser fix are judged by the current rules)."""
    recs = {u: r for u, r in read_records(records, ok_only=True).items() if parse_steps(r.get("text", ""))[1] is None}
    if not recs:
        raise InputError(f"{records}: no teacher record without an error to train on")
    ds = load_dataset(data_dir)
    prompts = user_prompts(ds, sorted(recs), RationaleConfig(template=cfg.template, history_tokens=cfg.history_tokens,
                                                             tokenizer=str(tokenizer)))
    return [(prompts[u], rationale_text(recs[u])) for u in sorted(recs)]


def finetune_student(data_dir: str | Path, records: str | Path, out_dir: str | Path, cfg: FinetuneConfig,
                     force: bool = False) -> dict[str, Any]:
    """Train a LoRA adapter and save it (adapter + tokenizer + manifest) atomically in `out_dir`."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    base = Path(cfg.base_model or smollm2_path())
    if not (base / "config.json").exists():
        raise InputError(f"{base}: not a model folder (no config.json)")
    inputs = {"data": load_dataset(data_dir).fingerprint, "records": file_hash(records), "base": str(base)}
    if not force and is_up_to_date(out_dir, inputs, cfg.to_dict()):
        return read_json(Path(out_dir) / "manifest.json")["counts"]
    set_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    pairs = training_pairs(data_dir, records, cfg, base)
    rows = [tokenize_example(tok, p, a, cfg.max_length) for p, a in pairs]
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    n_val = max(1, int(round(len(rows) * cfg.val_fraction))) if len(rows) > 1 else 0
    val = Dataset.from_list([rows[i] for i in order[:n_val]]) if n_val else None
    train = Dataset.from_list([rows[i] for i in order[n_val:]])

    model = get_peft_model(load_causal_lm(base), LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=cfg.target_modules, task_type="CAUSAL_LM"))
    with atomic_dir(out_dir) as tmp:
        args = TrainingArguments(output_dir=str(tmp / "trainer"), num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
                                 per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
                                 gradient_accumulation_steps=cfg.grad_accum, eval_strategy="epoch" if val else "no",
                                 save_strategy="no", logging_steps=5, report_to=[], seed=cfg.seed,
                                 lr_scheduler_type="cosine", warmup_steps=0, use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                          data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE, padding=True))
        result = trainer.train()
        val_loss = trainer.evaluate()["eval_loss"] if val else None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        counts = {"train_examples": len(train), "val_examples": n_val, "train_loss": round(result.training_loss, 4),
                  "val_loss": None if val_loss is None else round(val_loss, 4),
                  "val_perplexity": None if val_loss is None else round(math.exp(val_loss), 2),
                  "answer_tokens": int(sum(sum(x != IGNORE for x in r["labels"]) for r in rows)),
                  "seconds": round(result.metrics["train_runtime"], 1),
                  "history": [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]}
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        write_json(tmp / "manifest.json", manifest("finetune-student", inputs=inputs, config=cfg.to_dict(),
                                                   seed=cfg.seed, counts=counts))
    return counts
