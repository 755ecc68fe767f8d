"""In-process batched generation: the CPU-speed alternative to a server, same Generator interface.

A one-request-at-a-time server on CPU decodes one user per forward pass; `model.generate` on a
left-padded batch decodes many, which is several times faster for a small student. vLLM
(slim.vllm_offline.VllmGenerator: continuous batching, its own CPU kernels) is faster still where the
hardware suits it: `make_generator` asks `slim.hardware.choose` and picks one or the other.

Sampling draws each row from its own generator, seeded by the request's seed, so a sampled answer
does not depend on which other requests share its batch (as in vLLM); greedy rows take the argmax.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .client import Completion
from .engine import announce, engine_choice, vllm_status
from .hardware import TRANSFORMERS_DTYPE
from .lora import load_causal_lm, load_merged
from .vllm_offline import VllmGenerator


MIN_SHARED_PREFIX = 8  # a shorter common prefix is not worth a forward pass of its own


def shared_prefix(ids: list[list[int]]) -> int:
    """How many leading tokens every row shares, leaving each row at least one token of its own."""
    limit = min(len(i) for i in ids) - 1
    n = 0
    while n < limit and all(i[n] == ids[0][n] for i in ids):
        n += 1
    return n


class RowSampler:
    """A logits processor that samples each row with its own temperature and seeded generator, then
    leaves only the drawn token finite, so greedy decoding takes it; rows at temperature 0 are left
    as they are (argmax). A row without a seed gets a random one (as the OpenAI API does)."""

    def __init__(self, temperatures: Sequence[float], seeds: Sequence[int | None]):
        import torch

        self.temperatures = list(temperatures)
        self.generators = []
        for t, s in zip(temperatures, seeds):
            g = None
            if t > 0:
                g = torch.Generator()
                g.manual_seed(int(torch.randint(0, 2**62, ())) if s is None else int(s))
            self.generators.append(g)

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.clone()
        for i, (t, g) in enumerate(zip(self.temperatures, self.generators)):
            if g is None:
                continue
            probs = torch.softmax(scores[i].float() / t, dim=-1)
            tok = torch.multinomial(probs, 1, generator=g)
            scores[i].fill_(float("-inf"))
            scores[i, tok] = 0.0
        return scores


class LocalGenerator:
    """Greedy (temperature 0) or per-row seeded sampled batched generation with the chat template,
    length-sorted batches, in float32 (transformers has no fast bf16 on a CPU without native bf16)."""

    engine = "transformers"
    dtype = TRANSFORMERS_DTYPE

    def __init__(self, model_path: str | Path | None = None, adapter: str | Path | None = None,
                 batch_size: int = 16, max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 42,
                 prefix_reuse: bool = True):
        from transformers import AutoTokenizer

        if adapter:
            self.model, self.tok = load_merged(adapter, model_path)
        else:
            self.model, self.tok = load_causal_lm(model_path), AutoTokenizer.from_pretrained(model_path)
        self.model.eval()
        self.tok.padding_side = "left"
        self.tok.pad_token = self.tok.pad_token or self.tok.eos_token
        self.model_name = str(adapter or model_path)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.temperature, self.seed, self.prefix_reuse = temperature, seed, prefix_reuse

    def generate_chats(self, chats: list[list[dict[str, str]]], max_new_tokens: int,
                       temperatures: Sequence[float], seeds: Sequence[int | None]) -> list[Completion]:
        """One batch of conversations -> completions in order; row i samples at temperatures[i] with
        seeds[i] (0: greedy). `seconds` is the batch's time shared out over its rows.

        With `prefix_reuse`, the tokens every prompt of the batch starts with (system prompt and
        template head) are run once and their KV cache copied to every row; each row's own tokens
        follow, left-padded after the prefix (positions come from the attention mask, so a row sees
        the positions it would alone)."""
        import torch
        from transformers import LogitsProcessorList

        ids = [self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for c in chats]
        shared = shared_prefix(ids) if self.prefix_reuse and len(ids) > 1 else 0
        width = max(len(i) for i in ids) - shared
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([i[:shared] + [pad] * (width - len(i) + shared) + i[shared:] for i in ids])
        mask = torch.tensor([[1] * shared + [0] * (width - len(i) + shared) + [1] * (len(i) - shared) for i in ids])
        processors = LogitsProcessorList([RowSampler(temperatures, seeds)]) if any(t > 0 for t in temperatures) \
            else None
        t0 = time.perf_counter()
        with torch.inference_mode():
            extra: dict[str, Any] = {}
            if shared >= MIN_SHARED_PREFIX:
                cache = self.model(input_ids=input_ids[:1, :shared], use_cache=True,
                                   logits_to_keep=1).past_key_values  # only the cache is used
                cache.batch_repeat_interleave(len(ids))
                extra["past_key_values"] = cache
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, temperature=None, top_p=None, top_k=None,
                                      logits_processor=processors, pad_token_id=pad, **extra)
        seconds = (time.perf_counter() - t0) / len(chats)
        new = out[:, input_ids.shape[1]:]
        result = []
        for row, n_prompt in zip(new, (len(i) for i in ids)):
            ended = (row == self.tok.eos_token_id).nonzero()
            n = int(ended[0]) if len(ended) else len(row)
            result.append(Completion(text=self.tok.decode(row[:n], skip_special_tokens=True).strip(),
                                     prompt_tokens=n_prompt, completion_tokens=n, seconds=seconds,
                                     finish_reason="stop" if len(ended) else "length"))
        return result

    def generate(self, prompts: list[str], attempt: int = 0) -> list[Completion]:
        """Completions of user prompts at this generator's temperature, each sampled with seed + attempt."""
        return self.generate_chats([[{"role": "user", "content": p}] for p in prompts], self.max_new_tokens,
                                   [self.temperature] * len(prompts), [self.seed + attempt] * len(prompts))

    def stream(self, jobs: Iterable[tuple[Any, str]],
               attempt: int = 0) -> Iterator[tuple[Any, Completion | Exception]]:
        """Length-sorted batches; a retry (`attempt` > 0) samples with seed + attempt (greedy repeats)."""
        jobs = sorted(jobs, key=lambda kp: len(kp[1]))
        for i in range(0, len(jobs), self.batch_size):
            batch = jobs[i:i + self.batch_size]
            for (key, _), c in zip(batch, self.generate([p for _, p in batch], attempt)):
                yield key, c

    def close(self) -> None:
        """Nothing to stop (the vLLM generator has an engine process to stop)."""

    def __enter__(self) -> "LocalGenerator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_generator(model_path: str | Path | None = None, adapter: str | Path | None = None, batch_size: int = 16,
                   max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 42, engine: str = "auto",
                   prompts: int | None = None, **vllm_options: Any) -> LocalGenerator | VllmGenerator:
    """In-process generation with the engine `slim.hardware.choose` picks here for `prompts` prompts
    (vLLM where it is the faster engine for that job and starts, else `LocalGenerator`); one line on
    stderr says which, in which dtype and why. engine: auto | vllm | transformers (vllm where it cannot
    run is an error). `vllm_options` go to VllmGenerator (prefix_caching, ...)."""
    choice = engine_choice(engine, None if prompts is None else prompts * max_new_tokens)
    why = choice.reason
    if choice.engine == "vllm":
        status = vllm_status()
        try:
            gen = VllmGenerator(model_path, adapter, batch_size, max_new_tokens, temperature, seed,
                                **{"dtype": choice.dtype, **vllm_options})
        except Exception as e:  # noqa: BLE001 - auto falls back, with the reason on its one line
            if engine == "vllm":
                raise
            last = (str(e).strip().splitlines() or [""])[-1][:200]
            why = f"fallback: vllm did not start ({type(e).__name__}: {last})"
        else:
            detail = f"{gen.dtype}, {status.device}" + (", merged adapter" if adapter and status.cpu else
                                                        ", LoRA adapter" if adapter else "")
            announce("slim generation engine", "vllm", f"{why}; started in {gen.startup_s:.0f} s", detail)
            return gen
    announce("slim generation engine", "transformers", why, f"{LocalGenerator.dtype}, batch {batch_size}")
    return LocalGenerator(model_path, adapter, batch_size, max_new_tokens, temperature, seed)
