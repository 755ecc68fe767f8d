"""The one OpenAI-compatible chat client: OpenAI, vLLM's server and the project's batching server alike.

Retries with exponential backoff on 429, 5xx, timeouts and dropped connections are the `openai`
package's own (it also honours `Retry-After`); this wrapper retries what it does not (a 200 whose
body is cut off or has no answer) and adds the concurrency limit, token accounting and the cost
estimate. The API key is read from an environment variable and handed to
the client only: it is never logged, printed or written.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

from eval.config import setting
from eval.errors import InputError

LOCAL_KEY = "EMPTY"  # local servers accept any key


@dataclass(frozen=True)
class ClientConfig:
    base_url: str = setting("http://127.0.0.1:8000/v1", "OpenAI-compatible endpoint, e.g. https://api.openai.com/v1.")
    model: str = setting("", "Model name in requests (empty: the one model the endpoint serves).")
    api_key_env: str = setting("OPENAI_API_KEY", "Name of the environment variable holding the API key "
                                                 "(the key itself is never written).")
    temperature: float = setting(0.7, "Sampling temperature (0: greedy).")
    max_tokens: int = setting(200, "Most completion tokens per answer.")
    frequency_penalty: float | None = setting(None, "Repetition penalty, OpenAI semantics (OpenAI and vLLM; the "
                                                    "project's batching server refuses it).")
    concurrency: int = setting(4, "Requests in flight.")
    timeout_s: float = setting(120.0, "Per-request timeout (s).")
    max_retries: int = setting(5, "Retries on 429, 5xx, timeouts and dropped connections (exponential backoff).")
    price_prompt_per_1m: float = setting(0.0, "USD per million prompt tokens (cost estimate only).")
    price_completion_per_1m: float = setting(0.0, "USD per million completion tokens (cost estimate only).")
    seed: int | None = setting(42, "Sampling seed sent with each request.")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str | None = None


@dataclass
class Usage:
    """Running totals of one generation run (thread-safe)."""
    requests: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, c: Completion | None) -> None:
        with self._lock:
            if c is None:
                self.failures += 1
                return
            self.requests += 1
            self.prompt_tokens += c.prompt_tokens
            self.completion_tokens += c.completion_tokens

    def cost(self, price_prompt_per_1m: float, price_completion_per_1m: float) -> float:
        return (self.prompt_tokens * price_prompt_per_1m + self.completion_tokens * price_completion_per_1m) / 1e6

    def to_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "failures": self.failures, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}


class Generator(Protocol):
    """What a generation run needs: completions for (key, prompt) jobs, yielded as they finish.

    `attempt` > 0 asks again for answers that came back off-format: a sampling generator draws
    with another seed."""
    model_name: str

    def stream(self, jobs: Iterable[tuple[Any, str]],
               attempt: int = 0) -> Iterator[tuple[Any, Completion | Exception]]: ...


class MalformedResponse(Exception):
    """A 200 answer the client cannot use: a cut-off or invalid body, or no choice."""


class ChatClient:
    """Chat completions against one endpoint and model, `concurrency` requests in flight."""

    def __init__(self, cfg: ClientConfig):
        from openai import OpenAI

        self.cfg = cfg
        self._client = OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or LOCAL_KEY,
                              timeout=cfg.timeout_s, max_retries=cfg.max_retries)
        self.model_name = cfg.model or self.served_model()

    def models(self) -> list[str]:
        """The model names the endpoint lists (`GET /models`)."""
        return [m.id for m in self._client.models.list()]

    def served_model(self) -> str:
        """The endpoint's one served model (`GET /models`), for a client configured without a model name."""
        try:
            names = self.models()
        except Exception as e:  # noqa: BLE001 - any failure here is one line for the user
            raise InputError(f"{self.cfg.base_url}: cannot list the served models to pick one "
                             f"({type(e).__name__}); set client.model") from None
        if len(names) != 1:
            raise InputError(f"{self.cfg.base_url} serves {len(names)} models ({', '.join(names[:5])}); "
                             f"set client.model to one of them")
        return names[0]

    def complete(self, prompt: str, max_tokens: int | None = None, attempt: int = 0) -> Completion:
        """One answer; a malformed 200 is asked again up to `max_retries` times, with backoff."""
        for retry in range(self.cfg.max_retries + 1):
            try:
                return self._complete(prompt, max_tokens, attempt)
            except MalformedResponse:
                if retry == self.cfg.max_retries:
                    raise
                time.sleep(min(8.0, 0.5 * 2 ** retry))
        raise AssertionError("unreachable")

    def _complete(self, prompt: str, max_tokens: int | None, attempt: int) -> Completion:
        t0 = time.perf_counter()
        seed = None if self.cfg.seed is None else self.cfg.seed + attempt
        try:
            r = self._client.chat.completions.create(
                model=self.model_name, messages=[{"role": "user", "content": prompt}],
                temperature=self.cfg.temperature, max_tokens=max_tokens or self.cfg.max_tokens, seed=seed,
                frequency_penalty=self.cfg.frequency_penalty)
        except ValueError as e:  # json.JSONDecodeError and pydantic's ValidationError: a cut-off or odd body
            raise MalformedResponse(f"unreadable response body ({type(e).__name__})") from None
        if not r.choices or r.choices[0].message is None:
            raise MalformedResponse("response without an answer")
        choice = r.choices[0]
        usage = r.usage
        return Completion(text=choice.message.content or "", finish_reason=choice.finish_reason,
                          prompt_tokens=usage.prompt_tokens if usage else 0,
                          completion_tokens=usage.completion_tokens if usage else 0,
                          seconds=time.perf_counter() - t0)

    def stream(self, jobs: Iterable[tuple[Any, str]],
               attempt: int = 0) -> Iterator[tuple[Any, Completion | Exception]]:
        pool = ThreadPoolExecutor(self.cfg.concurrency)
        try:
            futures = {pool.submit(self.complete, prompt, None, attempt): key for key, prompt in jobs}
            for fut in as_completed(futures):
                err = fut.exception()
                yield futures[fut], err if err is not None else fut.result()
        finally:  # on interruption do not wait for requests in flight (their server may be going away)
            pool.shutdown(wait=False, cancel_futures=True)
