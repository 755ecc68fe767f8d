"""The one OpenAI-compatible chat client: OpenAI, vLLM's server and the project's batching server alike.

Retries with exponential backoff on 429, 5xx, timeouts and dropped connections are the `openai`
package's own (it also honours `Retry-After`); this wrapper retries what it does not (a 200 whose
body is cut off or has no answer) and adds the concurrency limit, token accounting and the cost
estimate. The API key is read from an environment variable and handed to
the client only: it is never logged, printed or written.

Several base URLs (vLLM's external data parallelism: one server per GPU or node, the same model on
each) share the requests: each goes to the URL with the fewest requests in flight (ties in turn),
and a request that meets a retryable error (429, 5xx, a timeout, a refused or dropped connection)
is retried at once on another URL while the failing one rests (0.5 s, doubling with each failure in
a row, at most 30 s; one success clears it); when every URL rests, the retry waits for the first
to come back. `max_retries` counts retries over all URLs. Each request still yields one result, so
a generation run's records stay one per key.
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
    base_url: str | list[str] = setting("http://127.0.0.1:8000/v1", "OpenAI-compatible endpoint, e.g. "
                                        "https://api.openai.com/v1; or several serving the same model (a list, or "
                                        "comma-separated: one vLLM server per GPU or node), requests spread over "
                                        "them and a failing one's retries sent to the others.")
    model: str = setting("", "Model name in requests (empty: the one model the endpoint serves).")
    api_key_env: str = setting("OPENAI_API_KEY", "Name of the environment variable holding the API key "
                                                 "(the key itself is never written).")
    temperature: float = setting(0.7, "Sampling temperature (0: greedy).")
    max_tokens: int = setting(200, "Most completion tokens per answer.")
    frequency_penalty: float | None = setting(None, "Repetition penalty, OpenAI semantics (OpenAI and vLLM; the "
                                                    "project's batching server refuses it).")
    concurrency: int = setting(4, "Requests in flight (over all base URLs together).")
    timeout_s: float = setting(120.0, "Per-request timeout (s).")
    max_retries: int = setting(5, "Retries on 429, 5xx, timeouts and dropped connections (exponential backoff).")
    price_prompt_per_1m: float = setting(0.0, "USD per million prompt tokens (cost estimate only).")
    price_completion_per_1m: float = setting(0.0, "USD per million completion tokens (cost estimate only).")
    seed: int | None = setting(42, "Sampling seed sent with each request.")

    @property
    def urls(self) -> list[str]:
        """The base URLs, in order, each once (a text may list several, comma-separated)."""
        raw = self.base_url if isinstance(self.base_url, list) else str(self.base_url).split(",")
        return list(dict.fromkeys(u.strip() for u in raw if u and u.strip()))


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


def retryable(e: Exception) -> bool:
    """What the `openai` package itself retries: a timeout, a refused or dropped connection, 408, 409,
    429 and 5xx."""
    import openai

    if isinstance(e, openai.APIConnectionError):  # APITimeoutError too
        return True
    return isinstance(e, openai.APIStatusError) and (e.status_code in (408, 409, 429) or e.status_code >= 500)


class Endpoint:
    """One base URL of a client: its `openai` client, requests in flight and how it has been failing."""

    REST_S, MAX_REST_S = 0.5, 30.0

    def __init__(self, url: str, client: Any):
        self.url, self.client = url, client
        self.in_flight = self.answered = self.failed = self.failing = 0
        self.rest_until = 0.0

    def fail(self, now: float, rest: bool) -> None:
        """A retryable failure; `rest` (several endpoints): no new request for a while."""
        self.failed += 1
        self.failing += 1
        if rest:
            self.rest_until = now + min(self.MAX_REST_S, self.REST_S * 2 ** (self.failing - 1))

    def succeed(self) -> None:
        self.answered += 1
        self.failing, self.rest_until = 0, 0.0


class ChatClient:
    """Chat completions against one model at one or several endpoints, `concurrency` requests in flight."""

    def __init__(self, cfg: ClientConfig):
        from openai import OpenAI

        self.cfg = cfg
        urls = cfg.urls
        if not urls:
            raise InputError("client.base_url: no endpoint given")
        key = os.environ.get(cfg.api_key_env) or LOCAL_KEY
        # one URL: the `openai` package retries (honouring Retry-After); several: this client retries on another
        retries = cfg.max_retries if len(urls) == 1 else 0
        self.endpoints = [Endpoint(u, OpenAI(base_url=u, api_key=key, timeout=cfg.timeout_s, max_retries=retries))
                          for u in urls]
        self._client = self.endpoints[0].client
        self._lock = threading.Lock()
        self._turn = 0
        self.model_name = cfg.model or self.served_model()

    def models(self) -> list[str]:
        """The model names the (first) endpoint lists (`GET /models`)."""
        return [m.id for m in self._client.models.list()]

    def served_model(self) -> str:
        """The endpoints' one served model (`GET /models`), for a client configured without a model name:
        every endpoint that answers must list the same one."""
        listed: dict[str, list[str]] = {}
        why = ""
        for ep in self.endpoints:
            try:
                listed[ep.url] = [m.id for m in ep.client.models.list()]
            except Exception as e:  # noqa: BLE001 - any failure here is one line for the user
                why = why or type(e).__name__
        if not listed:
            raise InputError(f"{', '.join(e.url for e in self.endpoints)}: cannot list the served models to "
                             f"pick one ({why}); set client.model")
        url, names = next(iter(listed.items()))
        if len(names) != 1:
            raise InputError(f"{url} serves {len(names)} models ({', '.join(names[:5])}); "
                             f"set client.model to one of them")
        other = next(((u, n) for u, n in listed.items() if n != names), None)
        if other is not None:
            raise InputError(f"client.base_url: {url} serves {names[0]} but {other[0]} serves "
                             f"{', '.join(other[1][:5]) or 'nothing'}; give URLs of one model or set client.model")
        return names[0]

    def endpoint_counts(self) -> dict[str, dict[str, int]]:
        """Per base URL: answers received and failed attempts (retried elsewhere or given up)."""
        with self._lock:
            return {e.url: {"answered": e.answered, "failed": e.failed} for e in self.endpoints}

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

    def _pick(self, tried: set[int]) -> Endpoint:
        """The endpoint for a request's next try: of those not resting (none resting: the first back), the
        ones not yet tried for it, then the fewest in flight, ties in turn; counted in flight."""
        with self._lock:
            now = time.monotonic()
            n = len(self.endpoints)
            order = [(self._turn + k) % n for k in range(n)]
            awake = [i for i in order if self.endpoints[i].rest_until <= now]
            if not awake:  # every endpoint failed lately: wait for the first one back
                first = min(order, key=lambda i: self.endpoints[i].rest_until)
                wait, awake = self.endpoints[first].rest_until - now, [first]
            else:
                wait = 0.0
            fresh = [i for i in awake if i not in tried] or awake
            best = min(fresh, key=lambda i: self.endpoints[i].in_flight)
            self._turn = (best + 1) % n
            ep = self.endpoints[best]
            ep.in_flight += 1
        if wait > 0:
            time.sleep(wait)
        tried.add(best)
        return ep

    def _complete(self, prompt: str, max_tokens: int | None, attempt: int) -> Completion:
        tried: set[int] = set()
        retries = 0 if len(self.endpoints) == 1 else self.cfg.max_retries  # one URL: openai's own retries
        for retry in range(retries + 1):
            ep = self._pick(tried)
            try:
                c = self._ask(ep.client, prompt, max_tokens, attempt)
            except Exception as e:
                with self._lock:
                    ep.in_flight -= 1
                    if retryable(e):
                        ep.fail(time.monotonic(), rest=len(self.endpoints) > 1)
                if not retryable(e) or retry == retries:
                    raise
                continue
            with self._lock:
                ep.in_flight -= 1
                ep.succeed()
            return c
        raise AssertionError("unreachable")

    def _ask(self, client: Any, prompt: str, max_tokens: int | None, attempt: int) -> Completion:
        t0 = time.perf_counter()
        seed = None if self.cfg.seed is None else self.cfg.seed + attempt
        try:
            r = client.chat.completions.create(
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
