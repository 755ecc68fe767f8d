"""In-process batched generation: the CPU-speed alternative to a server, same Generator interface.

A `transformers serve` server on CPU decodes one request at a time; `model.generate` on a left-padded
batch decodes many users per forward pass, which is several times faster for a small student.
vLLM (slim.vllm_engine.VllmGenerator: continuous batching, bf16, its own CPU kernels) is faster
still where it runs: `make_generator` picks it there and this transformers path elsewhere.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .client import Completion
from .lora import load_causal_lm, load_merged
from .vllm_engine import VllmGenerator, announce, choose_engine, vllm_status


class LocalGenerator:
    """Greedy (temperature 0) or sampled batched generation with the chat template, length-sorted batches."""

    engine = "transformers"

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

    def stream(self, jobs: Iterable[tuple[Any, str]],
               attempt: int = 0) -> Iterator[tuple[Any, Completion | Exception]]:
        """Length-sorted batches; a retry (`attempt` > 0) samples on from the advanced RNG (greedy repeats)."""
        jobs = sorted(jobs, key=lambda kp: len(kp[1]))
        for i in range(0, len(jobs), self.batch_size):
            batch = jobs[i:i + self.batch_size]
            for (key, _), c in zip(batch, self.generate([p for _, p in batch])):
                yield key, c

    def close(self) -> None:
        """Nothing to stop (the vLLM generator has an engine process to stop)."""

    def __enter__(self) -> "LocalGenerator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_generator(model_path: str | Path | None = None, adapter: str | Path | None = None, batch_size: int = 16,
                   max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 42, engine: str = "auto",
                   **vllm_options: Any) -> LocalGenerator | VllmGenerator:
    """In-process generation with vLLM where it imports and starts, else `LocalGenerator`
    (transformers); one line on stderr says which and why. engine: auto | vllm | transformers
    (vllm where it cannot run is an error). `vllm_options` go to VllmGenerator (dtype, prefix_caching, ...)."""
    name, why = choose_engine(engine)
    if name == "vllm":
        status = vllm_status()
        try:
            gen = VllmGenerator(model_path, adapter, batch_size, max_new_tokens, temperature, seed, **vllm_options)
        except Exception as e:  # noqa: BLE001 - auto falls back, with the reason on its one line
            if engine == "vllm":
                raise
            last = (str(e).strip().splitlines() or [""])[-1][:200]
            why = f"fallback: vllm did not start ({type(e).__name__}: {last})"
        else:
            detail = f"{status.device}, {gen.dtype}" + (", merged adapter" if adapter and status.cpu else
                                                        ", LoRA adapter" if adapter else "")
            announce("slim generation engine", "vllm", f"{why}; started in {gen.startup_s:.0f} s", detail)
            return gen
    announce("slim generation engine", "transformers", why, f"batch {batch_size}")
    return LocalGenerator(model_path, adapter, batch_size, max_new_tokens, temperature, seed)
