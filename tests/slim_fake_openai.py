"""SLIM test helpers: a real chat-completions HTTP server on 127.0.0.1 with scripted faults, and a run
with a prepared data set.

Faults are consumed one per request, in order: "429" (with a 10 ms Retry-After), "500",
"timeout" (answers only after `sleep_s`, past the client's timeout), "malformed" (an answer
without the three steps), "truncated" (a 200 whose JSON body ends halfway) and "empty" (a 200
with no choice). After the script runs out every request gets a well-formed answer.
`GET /v1/models` lists the one served model (`model`); those requests are counted in `model_lists`,
not in `requests` (the chat completions).
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SERVED_MODEL = "fake-served-model"


class FakeOpenAI:
    def __init__(self, faults: list[str] | None = None, delay_s: float = 0.0, sleep_s: float = 1.5,
                 model: str = SERVED_MODEL):
        self.faults, self.delay_s, self.sleep_s, self.model = list(faults or []), delay_s, sleep_s, model
        self.requests: list[dict] = []
        self.model_lists = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _json(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").split("?")[0] != "/v1/models":
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with fake.lock:
                    fake.model_lists += 1
                self._json(200, {"object": "list", "data": [{"id": fake.model, "object": "model", "created": 0,
                                                              "owned_by": "fake"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fault = fake.faults.pop(0) if fake.faults else None
                    fake.requests.append({"body": body, "auth": self.headers.get("Authorization"), "fault": fault})
                if fault in ("429", "500"):
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("retry-after-ms", "10")
                    self.end_headers()
                    self.wfile.write(json.dumps({"error": {"message": f"injected {fault}"}}).encode())
                    return
                time.sleep(fake.sleep_s if fault == "timeout" else fake.delay_s)
                prompt = body["messages"][-1]["content"]
                first = next((ln for ln in prompt.splitlines() if ln.startswith("- ")), "- nothing")[2:]
                text = "I cannot help with that." if fault == "malformed" else (
                    f"Step 1: The user likes {first}.\nStep 2: Drama, Comedy.\nStep 3: {first}; Movie 1; Movie 2.")
                out = {"id": "fake", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                                 "total_tokens": len(prompt.split()) + len(text.split())}}
                if fault == "empty":  # a 200 without any choice
                    out["choices"] = []
                data = json.dumps(out).encode()
                if fault == "truncated":  # the body ends mid-JSON
                    data = data[: len(data) // 2]
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_dataset(folder) -> Path:
    """A run folder whose data stage has prepared a 40-user x 30-item data set (RUN/data), for SLIM tests."""
    from eval.dataset import prepare_dataset
    from eval.preprocess import PrepareConfig
    from tests.conftest import write_atomic

    folder = Path(folder)
    rows = [(f"u{u}", f"i{(u + t) % 30}", 5, 1000 + t) for u in range(40) for t in range(8)]
    items = [(f"i{i}", f"Movie {i}", 1990 + i, "Drama") for i in range(30)]
    raw = write_atomic(folder / "raw", "syn", rows, items)
    prepare_dataset(PrepareConfig(source=str(raw), rating_gt=None, user_core=1, item_core=1, negatives=[5]),
                    folder)
    return folder


def run_with_data(source_run, run, *folders: str) -> Path:
    """A fresh run folder holding copies of `source_run`'s RUN/data and the given other stage folders
    (manifests included, so the copies keep their fingerprints)."""
    run = Path(run)
    for name in ("data", *folders):
        shutil.copytree(Path(source_run) / name, run / name)
    return run
