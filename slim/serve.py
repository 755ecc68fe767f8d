"""A local OpenAI-compatible server for a model folder (+ LoRA adapter), as a context manager.

vLLM where it imports and finds a device (`python -m vllm.entrypoints.openai.api_server` from this
interpreter: on a GPU the adapter is loaded with --enable-lora, on CPU its merged copy is served in
bf16 with vLLM's CPU settings; see slim.vllm_engine), otherwise `transformers serve` (the adapter
merged into a copy of the base first). One line on stderr says which and why. Either way the server
is ready only once it has answered a real chat completion.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from eval.errors import InputError

from .client import ChatClient, ClientConfig
from .lora import adapter_base, merged_dir
from .vllm_engine import announce, choose_engine, serve_command, vllm_status

LORA_NAME = "student"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pick_backend(backend: str = "auto") -> str:
    """vllm or transformers: auto picks vLLM where it imports and finds a device (slim.vllm_engine)."""
    return _pick(backend)[0]


def _pick(backend: str) -> tuple[str, str]:
    if backend not in ("auto", "vllm", "transformers"):
        raise InputError(f"unknown serving backend '{backend}' (choose auto, vllm or transformers)")
    return choose_engine(backend)


def _cli(name: str) -> str:
    """The console script `name` of this environment (the venv's, not whatever is first on PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise InputError(f"'{name}' is not installed")
    return found


class ServerExited(RuntimeError):
    """The server process ended before it answered; `cause` is the log's last error line."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


def _cause_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"(Error|Exception)\b", ln) and not ln.startswith("Traceback")]
    return ((errors or lines or ["no output"])[-1])[-300:]


class Server:
    """`with Server(model_path, adapter) as s:` -> requests go to `s.base_url` with model `s.model_name`."""

    def __init__(self, model_path: str | Path | None = None, adapter: str | Path | None = None,
                 port: int | None = None, host: str = "127.0.0.1", backend: str = "auto",
                 startup_timeout_s: float = 900.0, log_path: str | Path | None = None, *,
                 dtype: str | None = None, prefix_caching: bool = True, extra_args: tuple[str, ...] = (),
                 quiet: bool = False):
        """`dtype` (vLLM; default bf16 on CPU, vLLM's choice on a GPU), `prefix_caching` (vLLM; off for
        benchmarks that repeat prompts) and `extra_args` (appended to the server's command line)."""
        if model_path is None and adapter is None:
            raise InputError("serve needs a model path or an adapter")
        self.requested = backend
        self.backend, why = _pick(backend)
        self.adapter = Path(adapter) if adapter else None
        self.model_path = str(model_path or adapter_base(self.adapter))
        if not Path(self.model_path).exists():
            raise InputError(f"{self.model_path}: model folder not found")
        self.host, self.port = host, port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="slim-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.model_name = self.model_path
        self.dtype, self.prefix_caching, self.extra_args = dtype, prefix_caching, tuple(extra_args)
        self.env: dict[str, str] = dict(os.environ)
        self.startup_s: float | None = None
        if not quiet:
            detail = ""
            if self.backend == "vllm":
                status = vllm_status()
                detail = (f"CPU, {dtype or 'bfloat16'}, eager" + (", merged adapter" if self.adapter else "")
                          if status.cpu else "GPU" + (", adapter with --enable-lora" if self.adapter else ""))
            announce("slim serve engine", self.backend, why, detail)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        where = ["--host", self.host, "--port", str(self.port)]
        if self.backend == "vllm":
            status = vllm_status()
            served = self.model_path  # the name requests use (for a served copy too)
            if self.adapter and not status.cpu:
                self.model_name = LORA_NAME  # requests name the adapter; the base stays served as model_path
            elif self.adapter:  # CPU: a LoRA forces eager mode at half speed, the merged copy does not
                served = self.model_name = str(merged_dir(self.adapter, self.model_path))
            cmd, self.env = serve_command(status, self.model_path, self.adapter, self.host, self.port, served,
                                          dtype=self.dtype, prefix_caching=self.prefix_caching,
                                          extra_args=self.extra_args)
            return cmd
        if self.adapter:  # transformers serve cannot load an adapter: serve base + adapter merged
            self.model_name = str(merged_dir(self.adapter, self.model_path))
        return [_cli("transformers"), "serve", self.model_name, *where]

    def start(self) -> "Server":
        # `transformers serve` answers GET /v1/models with a 500 when the hub cache folder is missing
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
        hub.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            self._launch()
        except ServerExited as e:  # auto: a vLLM that cannot serve this model falls back to transformers
            if not (self.backend == "vllm" and self.requested == "auto"):
                raise
            announce("slim serve engine", "transformers", f"fallback: the vllm server exited ({e.cause}; "
                                                         f"log {self.log_path})")
            self.backend, self.model_name, self.env = "transformers", self.model_path, dict(os.environ)
            self._launch()
        self.startup_s = time.monotonic() - t0
        return self

    def _launch(self) -> None:
        cmd = self.command()  # sets self.env (vLLM's CPU settings)
        env = {**self.env, "HF_HUB_OFFLINE": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.wait_ready()

    def wait_ready(self) -> None:
        """Poll with a one-token chat completion until it succeeds, the process dies or time runs out."""
        client = ChatClient(ClientConfig(base_url=self.base_url, model=self.model_name, max_retries=0,
                                         timeout_s=120, max_tokens=1))
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                self.stop()  # its engine processes, if any are left
                log = self.log_path.read_text(errors="replace")
                raise ServerExited(f"{self.backend} server exited with code {self.proc.returncode}; "
                                   f"log {self.log_path}:\n{log[-2000:]}", _cause_line(log))
            try:
                client.complete("ping")
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.backend} server not ready after {self.startup_timeout_s:.0f}s "
                                       f"(log {self.log_path})") from None
                time.sleep(1.0)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is not None:  # it is gone; its process group (vLLM's engine) may not be
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def endpoint(client: ClientConfig, serve: str | Path | None = None, adapter: str | Path | None = None,
             log_path: str | Path | None = None, engine: str = "auto") -> Iterator[tuple[ChatClient, str]]:
    """(client, engine) for `client.base_url` (engine "endpoint"), or, given a model folder / adapter,
    for a local server run for the block (engine "vllm" or "transformers", what actually serves)."""
    if serve is None and adapter is None:
        yield ChatClient(client), "endpoint"
        return
    with Server(serve, adapter, log_path=log_path, backend=engine) as server:
        yield ChatClient(replace(client, base_url=server.base_url, model=client.model or server.model_name)), server.backend
