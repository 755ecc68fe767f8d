"""In-process batched generation: the CPU-speed alternative to a server, same Generator interface.

A server on CPU decodes one request at a time; `model.generate` on a left-padded batch decodes many
users per forward pass, which is several times faster for a small student.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .client import Completion
from .lora import load_causal_lm, load_merged


class LocalGenerator:
    """Greedy (temperature 0) or sampled batched generation with the chat template, length-sorted batches."""

    def __init__(self, model_path: str | Path | None = None, adapter: str | Path | None = None,
                 batch_size: int = 16, max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 42):
        import torch
        from transformers import AutoTokenizer

        torch.manual_seed(seed)
        if adapter:
            self.model, self.tok = load_merged(adapter, model_path)
        else:
            self.model, self.tok = load_causal_lm(model_path), AutoTokenizer.from_pretrained(model_path)
        self.model.eval()
        self.tok.padding_side = "left"
        self.tok.pad_token = self.tok.pad_token or self.tok.eos_token
        self.model_name = str(adapter or model_path)
        self.batch_size, self.max_new_tokens, self.temperature = batch_size, max_new_tokens, temperature

    def generate(self, prompts: list[str]) -> list[Completion]:
        import torch

        chats = [[{"role": "user", "content": p}] for p in prompts]
        enc = self.tok.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                           return_dict=True)
        sample = self.temperature > 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=sample,
                                      temperature=self.temperature if sample else None, top_p=None, top_k=None,
                                      pad_token_id=self.tok.pad_token_id)
        seconds = (time.perf_counter() - t0) / len(prompts)
        new = out[:, enc["input_ids"].shape[1]:]
        result = []
        for row, mask in zip(new, enc["attention_mask"]):
            ended = (row == self.tok.eos_token_id).nonzero()
            n = int(ended[0]) if len(ended) else len(row)
            result.append(Completion(text=self.tok.decode(row[:n], skip_special_tokens=True).strip(),
                                     prompt_tokens=int(mask.sum()), completion_tokens=n, seconds=seconds,
                                     finish_reason="stop" if len(ended) else "length"))
        return result

    def stream(self, jobs: Iterable[tuple[Any, str]]) -> Iterator[tuple[Any, Completion | Exception]]:
        jobs = sorted(jobs, key=lambda kp: len(kp[1]))
        for i in range(0, len(jobs), self.batch_size):
            batch = jobs[i:i + self.batch_size]
            for (key, _), c in zip(batch, self.generate([p for _, p in batch])):
                yield key, c
