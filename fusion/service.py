"""`fusion serve`: a run's recommendations over HTTP, and the page that shows them.

The model, the item index and the encoder are loaded once, before the server accepts requests.
Known users are answered from what the run wrote (their sequence, rationale record and vectors). A
new user (`POST /recommendations`, a history of raw item ids) gets a rationale written on the spot
by the SLIM student through its OpenAI-compatible endpoint, from the prompt every user of the run
was given, embedded by the run's sentence encoder and fused with the history by the model.

Errors are JSON `{"error": "..."}`: 401 without the bearer token (when one is set), 404 for unknown
ids, 422 for bad input, 502 when the student's endpoint fails, 503 for new users without one.

The token is read from the Authorization header only. One sent in the address (`?token=...`, easily
confused with the page's `#token=`) is refused, and the access log shows it as [redacted], as it does
every query parameter named like a credential.
"""
from __future__ import annotations

import functools
import hmac
import logging
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote_plus

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from eval.assets import minilm_path, smollm2_path
from eval.config import from_dict
from eval.errors import InputError, valid_text
from eval.io import MANIFEST, read_json
from slim.client import ChatClient
from slim.finetune import SlimStudentStage
from slim.prompts import PromptBuilder, instruction_words
from slim.records import parse_steps, rationale_text
from slim.student import StudentRationalesConfig, StudentRationalesStage

from .recommend import MAX_K, Recommender, UnknownId

WEB = Path(__file__).parent / "web"
MAX_HISTORY = 1000  # most item ids a new user's history may have (the model and the prompt keep the latest)
# query parameter names that look like a credential: never written to a log
SECRET_PARAM = re.compile(r"token|key|secret|passw|pwd|auth|credential|signature|session", re.I)
REDACTED = "[redacted]"


def is_secret(param: str) -> bool:
    """Whether a query parameter (`name=value`) is named like a credential."""
    return SECRET_PARAM.search(unquote_plus(param.partition("=")[0])) is not None


def redact_query(target: str) -> str:
    """A request target (path and query) with the value of every credential-like parameter redacted."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = [f"{p.partition('=')[0]}={REDACTED}" if is_secret(p) else p for p in query.split("&")]
    return f"{path}?{'&'.join(parts)}"


class RedactSecrets(logging.Filter):
    """Redacts credential-like query parameters in uvicorn's access log lines, whose arguments are
    (client, method, target, HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


ACCESS_FILTER = RedactSecrets()


def student_settings(run: Path) -> StudentRationalesConfig:
    """The settings the run's student rationales were written with (template, history budget, client),
    so a new user's prompt is rendered as every other user's was. A run without them (not written
    yet): the prompt the student was fine-tuned on, the other settings' defaults."""
    manifest = run / StudentRationalesStage.name / MANIFEST
    if not manifest.exists():
        trained = run / SlimStudentStage.name / MANIFEST
        cfg = read_json(trained).get("config", {}) if trained.exists() else {}
        return from_dict(StudentRationalesConfig, {k: cfg[k] for k in ("template", "history_tokens") if k in cfg},
                         str(trained))
    known = {f.name for f in fields(StudentRationalesConfig)}  # older manifests hold settings since renamed
    cfg = {k: v for k, v in read_json(manifest).get("config", {}).items() if k in known}
    return from_dict(StudentRationalesConfig, cfg, str(manifest))


class GenerationFailed(Exception):
    """The student's endpoint gave no answer (after the client's retries)."""


class StudentWriter:
    """A new user's rationale, written by the SLIM student through its endpoint and embedded as the
    vectors stage embedded every other user's (the same encoder, the same canonical text)."""

    def __init__(self, rec: Recommender, base_url: str, model: str | None = None, timeout_s: float = 120.0):
        from sentence_transformers import SentenceTransformer

        if rec.rationale_stage != StudentRationalesStage.name:  # the model was fused with another source's vectors
            raise InputError(f"{rec.run}: its vectors encode {rec.rationale_stage}, not the SLIM student's "
                             f"rationales; new users cannot be given one the model knows how to read")
        self.cfg = student_settings(rec.run)
        # a person is waiting: one retry at most and a bounded wait, not the batch run's patience
        self.chat = ChatClient(replace(self.cfg.client, base_url=base_url, model=model or self.cfg.client.model,
                                       timeout_s=timeout_s, max_retries=1))
        self.prompt = PromptBuilder(rec.ds.items, self.cfg.template, self.cfg.history_tokens,
                                    self.cfg.tokenizer or smollm2_path(), rec.ds.domain)
        self.instructions = instruction_words(self.prompt.template.version, rec.ds.domain)
        encode = rec.vectors_config()
        self.encoder = SentenceTransformer(str(encode.get("model") or minilm_path()), device=encode.get("device"))
        dim = self.encoder.get_embedding_dimension()
        if rec.user_text is not None and rec.user_text[0].shape[1] != dim:
            raise InputError(f"{rec.run}: the encoder writes {dim}-dim vectors, the run's vectors have "
                             f"{rec.user_text[0].shape[1]}")

    def reachable(self) -> bool:
        """Whether the endpoint answers `GET /models` (what it lists does not matter: the model is chosen)."""
        try:
            self.chat.models()
            return True
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    def __call__(self, items: list[int]) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The record (steps, raw text, error) and its vector (None for an empty answer). An off-format
        answer is used as it is, as the vectors stage uses such records, rather than asked again."""
        try:
            text = valid_text(self.chat.complete(self.prompt(items)).text)  # a lone surrogate cannot be sent back
        except Exception as e:  # noqa: BLE001 - any client failure is one line for the caller
            raise GenerationFailed(f"the SLIM student's endpoint gave no answer ({type(e).__name__})") from None
        steps, error = parse_steps(text, self.instructions)
        rec = {**steps, "text": text, "error": error, "model": self.chat.model_name}
        canonical = rationale_text(rec)
        if not canonical:
            return rec, None
        vec = self.encoder.encode([canonical], normalize_embeddings=True, convert_to_numpy=True)[0]
        return rec, torch.from_numpy(np.asarray(vec, dtype=np.float32))


class NewUser(BaseModel):
    history: list[str | int] = Field(min_length=1, max_length=MAX_HISTORY,
                                     description="Raw item ids of the data set, oldest first.")
    k: int = Field(10, ge=1, le=MAX_K)


def one_torch_thread(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Run a handler with one intra-op torch thread. Requests already run side by side in the server's
    thread pool, and torch's own threads on top of them oversubscribe the cores (on a busy 2-core machine
    one SASRec user took 200 ms instead of 1 ms). The setting is per thread (OpenMP), hence per call."""
    @functools.wraps(handler)
    def run(*args: Any, **kwargs: Any) -> Any:
        torch.set_num_threads(1)
        return handler(*args, **kwargs)
    return run


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def bearer(token: str | None):
    """A dependency that lets a request through only with `Authorization: Bearer <token>` (when set)."""
    def check(request: Request) -> None:
        if token is None:
            return
        # never read there: a token in the address lands in logs, browser history and bookmarks
        if any(is_secret(p) for p in request.url.query.split("&")):
            raise HTTPException(401, "a credential in the address is not accepted: send the token in the "
                                     "Authorization header (the page reads it from #token=, never sent)",
                                headers={"WWW-Authenticate": "Bearer"})
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
    return check


def create_app(rec: Recommender, writer: StudentWriter | None = None, token: str | None = None) -> FastAPI:
    """The service over a loaded recommender (and, for new users, the student's writer)."""
    logging.getLogger("uvicorn.access").addFilter(ACCESS_FILTER)  # once: addFilter skips a filter it has
    app = FastAPI(title="rationale-rec", summary=f"Recommendations of {rec.run / rec.name}")

    @app.exception_handler(HTTPException)
    def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        where = lambda loc: ".".join(str(p) for p in loc if p not in ("body", "query", "path")) or "body"  # noqa: E731
        return _error(422, "; ".join(f"{where(x['loc'])}: {x['msg']}" for x in e.errors()))

    @app.exception_handler(InputError)
    def bad_input(request: Request, e: InputError) -> JSONResponse:
        return _error(404 if isinstance(e, UnknownId) else 422, str(e))

    @app.exception_handler(GenerationFailed)
    def no_answer(request: Request, e: GenerationFailed) -> JSONResponse:
        return _error(502, str(e))

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> JSONResponse:
        body = {"ready": True, "model": rec.name, "users": rec.ds.num_users, "items": rec.ds.num_items,
                "index": "ivf_pq" if rec.index.ann else "exact", "new_users": writer is not None}
        if writer is not None and not writer.reachable():
            return JSONResponse({**body, "ready": False, "error": "the SLIM student's endpoint does not answer"}, 503)
        return JSONResponse(body)

    api = APIRouter(dependencies=[Depends(bearer(token))])

    @api.get("/users")
    def users(prefix: str = "", limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        """Raw user ids (for the page's picker), those starting with `prefix`."""
        ids = [u for u in rec.users if u.startswith(prefix)]
        return {"users": ids[:limit], "total": len(ids)}

    @api.get("/users/{user_id}/recommendations")
    @one_torch_thread
    def for_user(user_id: str, k: int = Query(10, ge=1, le=MAX_K)) -> dict[str, Any]:
        return rec.for_user(user_id, k)

    @api.post("/recommendations")
    @one_torch_thread
    def for_history(body: NewUser) -> dict[str, Any]:
        items = rec.items_of([str(i) for i in body.history])
        if writer is None:
            raise HTTPException(503, "new users need the SLIM student's endpoint: start the service with "
                                     "--student-url (e.g. the base_url `slim serve --adapter RUN/slim-student` prints)")
        rationale, text = writer(items)
        return rec.for_history(items, body.k, rationale, text)

    @api.get("/items/{item_id}")
    def item(item_id: str) -> dict[str, Any]:
        return rec.item_details(item_id)

    app.include_router(api)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    return app
