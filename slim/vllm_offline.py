"""vLLM in-process: offline generation with the `Generator` interface of `slim.local.LocalGenerator`
(`stream(jobs)` -> (key, Completion) as each request finishes), so a generation run can use either.

`tensor_parallel_size` goes to `vllm.LLM` as it is. `data_parallel_size` > 1 does not: vLLM 0.32's
`LLM` refuses it ("not supported for single-process usage"; its environment-variable route refuses
dense models), so those engines run under vLLM's `AsyncLLM`, the engine behind its server's
`--data-parallel-size`: one engine process per rank, its coordinator spreading the requests (a dense
model's ranks run independently), driven here from an event loop in a thread.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import Future, as_completed
from pathlib import Path
from typing import Any, Iterable, Iterator

from eval.errors import InputError

from .client import Completion
from .engine import LORA_NAME, VllmStatus, parallel_names, vllm_status
from .hardware import detect, generation_dtype
from .vllm_setup import apply_cpu_env, base_of, check_parallel, cpu_scheduler_args, lora_rank, model_to_load


class DataParallelEngine:
    """vLLM's own data parallelism in this process: an `AsyncLLM` of `data_parallel_size` engines on an
    event loop in a daemon thread; `submit` gives a future of a request's final output."""

    def __init__(self, engine_args: dict[str, Any]):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-data-parallel", daemon=True)
        self.thread.start()

        async def start() -> Any:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))

        try:
            self.engine = asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        except BaseException:
            self._stop_loop()
            raise
        self.model_config = self.engine.model_config

    def submit(self, prompt_ids: list[int], params: Any, request_id: str, lora_request: Any = None) -> Future:
        async def generate() -> Any:
            last = None
            async for out in self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id,
                                                  lora_request=lora_request):
                last = out
            return last

        return asyncio.run_coroutine_threadsafe(generate(), self.loop)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)

    def shutdown(self) -> None:
        self.engine.shutdown()
        self._stop_loop()


class VllmGenerator:
    """In-process vLLM generation, the `Generator` of `slim.local.LocalGenerator`: greedy
    (temperature 0) or sampled with a per-request seed, the tokenizer's chat template applied as
    transformers does it (the same prompt tokens), completions yielded as they finish.

    vLLM batches continuously (every job is queued, up to `max_num_seqs` decode together), so
    `batch_size` is accepted for the interface and unused. `dtype` None: bfloat16 where native, else
    float32 (`slim.hardware.generation_dtype`); "float32" matches transformers' greedy output.
    `prefix_caching` False for fair benchmarks; `engine_args` go to `vllm.LLM` as they are.
    `data_parallel_size` engines (vLLM's `AsyncLLM`), each over `tensor_parallel_size` ranks; on CPU
    each rank gets its group of cores; what vLLM would refuse is one line naming the setting."""

    engine = "vllm"

    def __init__(self, model_path: str | Path | None = None, adapter: str | Path | None = None,
                 batch_size: int = 16, max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 42,
                 dtype: str | None = None, prefix_caching: bool = True, enforce_eager: bool | None = None,
                 max_num_seqs: int | None = None, status: VllmStatus | None = None, data_parallel_size: int = 1,
                 tensor_parallel_size: int = 1, **engine_args: Any):
        if model_path is None and adapter is None:
            raise InputError("generation needs a model path or an adapter")
        self.status = status or vllm_status()
        if not self.status.ok:
            raise InputError(f"vLLM cannot run here: {self.status.reason}")
        check_parallel(self.status, base_of(model_path, adapter), data_parallel_size, tensor_parallel_size)
        model, lora = model_to_load(self.status, model_path, adapter)
        if self.status.cpu:  # read by the engine processes vLLM starts below
            apply_cpu_env(data_parallel_size, tensor_parallel_size)
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engine's INFO lines would bury the progress bar
        from transformers import AutoTokenizer
        from vllm import LLM

        self.model_name = str(adapter or model_path)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.temperature, self.seed = temperature, seed
        self.dtype = dtype or generation_dtype(detect())
        self.tok = AutoTokenizer.from_pretrained(model)
        kwargs: dict[str, Any] = dict(model=str(model), dtype=self.dtype, seed=seed,
                                      enable_prefix_caching=prefix_caching, generation_config="vllm",
                                      enforce_eager=self.status.cpu if enforce_eager is None else enforce_eager)
        if self.status.cpu:
            kwargs.update(cpu_scheduler_args(model))
        if max_num_seqs:
            kwargs["max_num_seqs"] = max_num_seqs
        if tensor_parallel_size > 1:
            kwargs["tensor_parallel_size"] = tensor_parallel_size
        self.data_parallel_size, self.tensor_parallel_size = data_parallel_size, tensor_parallel_size
        kwargs.update(engine_args)  # anything else vllm.LLM takes (max_model_len, ...)
        self.lora_request = None
        if lora is not None:
            from vllm.lora.request import LoRARequest

            kwargs.update(enable_lora=True, max_lora_rank=lora_rank(lora))
            self.lora_request = LoRARequest(LORA_NAME, 1, str(lora))
        t0 = time.perf_counter()
        self.llm = self.dp = None
        try:
            if data_parallel_size > 1:
                self.dp = DataParallelEngine({**kwargs, "data_parallel_size": data_parallel_size})
            else:
                self.llm = LLM(**kwargs)
        except Exception as e:
            if data_parallel_size * tensor_parallel_size == 1:
                raise
            why = next((ln for ln in reversed(str(e).strip().splitlines()) if ln.strip()), type(e).__name__)
            raise InputError(f"{parallel_names(data_parallel_size, tensor_parallel_size)}: vLLM did not start "
                             f"({type(e).__name__}: {why.strip()[:300]})") from None
        self.startup_s = time.perf_counter() - t0
        config = (self.dp.model_config if self.dp else self.llm.llm_engine.model_config).hf_config
        eos = getattr(config, "eos_token_id", None)
        self.eos_ids = {self.tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}

    def sampling_params(self, attempt: int = 0):
        """Greedy, or sampled with seed + attempt (a request's own generator: the same draws in any batch)."""
        from vllm import SamplingParams

        if self.temperature > 0:
            return SamplingParams(temperature=self.temperature, top_p=1.0, top_k=0, max_tokens=self.max_new_tokens,
                                  seed=self.seed + attempt)
        return SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens with the chat template, exactly as `LocalGenerator` builds them."""
        ids = self.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
        return list(ids)

    def completion(self, output, seconds: float) -> Completion:
        o = output.outputs[0]
        ids = list(o.token_ids)
        n = len(ids) - (1 if ids and o.finish_reason == "stop" and ids[-1] in self.eos_ids else 0)
        return Completion(text=o.text.strip(), prompt_tokens=len(output.prompt_token_ids or ()),
                          completion_tokens=n, seconds=seconds, finish_reason=o.finish_reason)

    def generate(self, prompts: list[str]) -> list[Completion]:
        """Completions in prompt order (all at once)."""
        done = dict(self.stream(enumerate(prompts)))
        return [done[i] for i in range(len(prompts))]

    def stream(self, jobs: Iterable[tuple[Any, str]],
               attempt: int = 0) -> Iterator[tuple[Any, Completion | Exception]]:
        """Queue every job, step the engine, yield each (key, Completion) as it finishes; `seconds` is
        the time since the previous completion (amortised, so they add up to the wall time). Closing
        the iterator early aborts what is still queued. `attempt` > 0 (asking again for off-format
        answers) samples with seed + attempt, as the endpoint client does; greedy repeats itself."""
        jobs = list(jobs)
        if not jobs:
            return
        if self.dp is not None:
            yield from self._stream_data_parallel(jobs, attempt)
            return
        engine = self.llm.llm_engine
        prompts = [{"prompt_token_ids": self.prompt_ids(p)} for _, p in jobs]
        ids = self.llm.enqueue(prompts, self.sampling_params(attempt), lora_request=self.lora_request, use_tqdm=False)
        # enqueue returns vLLM's internal ids ("<external>-<random>"); outputs carry the external one
        pending = {rid.split("-", 1)[0]: (key, rid) for rid, (key, _) in zip(ids, jobs)}
        last = time.perf_counter()
        try:
            while pending and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        key, _ = pending.pop(out.request_id)
                        now = time.perf_counter()
                        yield key, self.completion(out, now - last)
                        last = now
            for key, _ in pending.values():  # the engine dropped them: say so instead of losing them silently
                yield key, RuntimeError("vLLM finished without an output for this request")
            pending = {}
        finally:
            if pending:
                engine.abort_request([rid for _, rid in pending.values()], internal=True)

    def _stream_data_parallel(self, jobs: list[tuple[Any, str]],
                              attempt: int) -> Iterator[tuple[Any, Completion | Exception]]:
        """`stream` over the data-parallel engines: every job submitted, each yielded as it finishes;
        closing early cancels the rest (AsyncLLM aborts a cancelled request)."""
        params = self.sampling_params(attempt)
        tag = f"{time.monotonic_ns()}-{attempt}"
        futures = {self.dp.submit(self.prompt_ids(p), params, f"{tag}-{i}", self.lora_request): key
                   for i, (key, p) in enumerate(jobs)}
        last = time.perf_counter()
        try:
            for fut in as_completed(futures):
                err = fut.exception()
                if err is None and fut.result() is None:
                    err = RuntimeError("vLLM finished without an output for this request")
                now = time.perf_counter()
                yield futures[fut], err if err is not None else self.completion(fut.result(), now - last)
                last = now
        finally:
            for fut in futures:
                fut.cancel()

    def close(self) -> None:
        """Stop the engine process (also done at interpreter exit)."""
        dp = getattr(self, "dp", None)
        if dp is not None:
            dp.shutdown()
            self.dp = None
        llm = getattr(self, "llm", None)
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None

    def __enter__(self) -> "VllmGenerator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
