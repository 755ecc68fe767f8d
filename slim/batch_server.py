"""A batching OpenAI-compatible server over transformers: the serving engine where vLLM is not the faster one.

`transformers serve` decodes one request at a time (~12 tokens/s for SmolLM2-135M on 2 cores). This
server queues concurrent chat completions and decodes them together with `LocalGenerator`'s batched
path: a worker takes the oldest request and every queued one with the same token budget (up to
`max_batch`), waiting `gather_s` for stragglers, so a client with 32 requests in flight is answered
32 at a time. Greedy answers are the text one request alone gets; a sampled answer draws from its own
generator seeded by the request's `seed`, so it does not depend on which requests share its batch.

    python -m slim.batch_server --model PATH [--adapter A] --port 8000
"""
from __future__ import annotations

import argparse
import asyncio
import math
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest

from .client import Completion
from .local import LocalGenerator

DEFAULT_MAX_TOKENS = 256


@dataclass
class Request:
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    seed: int | None
    done: Future = field(default_factory=Future)

    @property
    def key(self) -> int:
        """Requests decoded together share their token budget (a batch decodes to its longest budget)."""
        return self.max_tokens


class Batcher:
    """The queue and the one worker thread that decodes what is queued, batch after batch."""

    def __init__(self, gen: LocalGenerator, max_batch: int = 32, gather_s: float = 0.05):
        self.gen, self.max_batch, self.gather_s = gen, max_batch, gather_s
        self.queue: queue.Queue[Request] = queue.Queue()
        self.held: list[Request] = []  # taken from the queue but waiting for a batch of their budget
        self.batches = 0
        self.thread = threading.Thread(target=self._work, daemon=True, name="batcher")
        self.thread.start()

    def submit(self, req: Request) -> Future:
        self.queue.put(req)
        return req.done

    def _next_batch(self) -> list[Request]:
        first = self.held.pop(0) if self.held else self.queue.get()
        batch = [first]
        keep = []
        for r in self.held:
            (batch if r.key == first.key and len(batch) < self.max_batch else keep).append(r)
        self.held = keep
        deadline = time.monotonic() + self.gather_s
        while len(batch) < self.max_batch:
            try:
                r = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            (batch if r.key == first.key else self.held).append(r)
        return batch

    def _work(self) -> None:
        while True:
            # a request whose client went away (its future cancelled) is not decoded
            batch = [r for r in self._next_batch() if r.done.set_running_or_notify_cancel()]
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Request]) -> None:
        """Answer a batch; if it fails, each request alone, so one bad request fails only itself."""
        try:
            outs = self.gen.generate_chats([r.messages for r in batch], batch[0].max_tokens,
                                           [r.temperature for r in batch], [r.seed for r in batch])
        except Exception as e:  # noqa: BLE001 - the request's error becomes its 500
            if len(batch) > 1:
                for r in batch:
                    self._decode([r])
            else:
                batch[0].done.set_exception(e)
            return
        self.batches += 1
        for r, c in zip(batch, outs):
            r.done.set_result(c)


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def parse_request(body: Any) -> Request | str:
    """The request, or the one-line reason it is refused (a 400)."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
            for m in messages):
        return "messages: a non-empty list of {role, content} objects with string content"
    if body.get("stream"):
        return "stream: streamed answers are not supported by this server"
    if body.get("n", 1) != 1:
        return "n: one answer per request"
    max_tokens = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None),
                      DEFAULT_MAX_TOKENS)
    temperature = 1.0 if body.get("temperature") is None else body["temperature"]
    seed = body.get("seed")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: a positive integer"
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        return "temperature: a finite number >= 0"
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        return "seed: an integer from 0 to 2**63 - 1"
    if body.get("frequency_penalty") not in (None, 0, 0.0):
        return "frequency_penalty: not supported by this server"
    return Request([{"role": m["role"], "content": m["content"]} for m in messages], max_tokens, float(temperature),
                   seed)


def create_app(gen: LocalGenerator, served: str, max_batch: int = 32, gather_s: float = 0.05):
    """The FastAPI app: GET /v1/models, POST /v1/chat/completions, GET /health."""
    app = FastAPI(title="rationale-rec batch server")
    batcher = Batcher(gen, max_batch, gather_s)

    @app.get("/health")
    def health():
        if not batcher.thread.is_alive():
            return _error(503, "the generation worker has stopped", "server_error")
        return {"status": "ok", "batches": batcher.batches}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served, "object": "model", "owned_by": "rationale-rec"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not valid JSON")
        req = parse_request(body)
        if isinstance(req, str):
            return _error(400, req)
        if body.get("model") not in (None, "", served):
            return _error(404, f"model '{body.get('model')}' is not served here (serving '{served}')",
                          "not_found_error")
        try:
            c: Completion = await asyncio.wrap_future(batcher.submit(req))
        except Exception as e:  # noqa: BLE001 - the model failed on this batch
            return _error(500, f"generation failed: {type(e).__name__}", "server_error")
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": served,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason}],
                "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                          "total_tokens": c.prompt_tokens + c.completion_tokens}}

    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Model folder (default: the adapter's base).")
    ap.add_argument("--adapter", default=None, help="LoRA adapter, merged into the model in memory.")
    ap.add_argument("--served-model-name", default=None, help="The name requests use (default: the model path).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=32, help="Most requests decoded together.")
    ap.add_argument("--gather-s", type=float, default=0.05, help="How long a batch waits for more requests.")
    args = ap.parse_args(argv)
    if not args.model and not args.adapter:
        ap.error("give --model or --adapter")
    import uvicorn

    gen = LocalGenerator(args.model, args.adapter, batch_size=args.max_batch)
    served = args.served_model_name or args.model or args.adapter
    uvicorn.run(create_app(gen, served, args.max_batch, args.gather_s), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
