"""A local OpenAI-compatible server for a model folder (+ LoRA adapter), as a context manager.

vLLM where it runs and is the faster engine here (`python -m vllm.entrypoints.openai.api_server` from
this interpreter: on a GPU the adapter is loaded with --enable-lora, on CPU its merged copy is served
with vLLM's CPU settings, bf16 only where native; see slim.vllm_setup and slim.hardware), otherwise
the project's batching server over transformers (`slim.batch_server`: concurrent requests decoded
together, the adapter merged in memory). One line on stderr says which, in which dtype and why.
Either way the server is ready only once it has answered a real chat completion.

`data_parallel_size` / `tensor_parallel_size` above 1 go to vLLM's server (`--data-parallel-size`,
`--tensor-parallel-size`): they ask for vLLM (engine auto), never fall back to transformers, and a
server that vLLM refuses to start is one line naming the setting and the log's cause.
"""
from __future__ import annotations

import contextlib
import os
import re
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
from .engine import LORA_NAME, announce, engine_choice, parallel_engine, parallel_names, vllm_status
from .hardware import TRANSFORMERS_DTYPE
from .lora import adapter_base, merged_dir
from .vllm_setup import serve_command


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
                 max_batch: int = 32, quiet: bool = False, data_parallel_size: int = 1, tensor_parallel_size: int = 1):
        """`dtype` (vLLM; default: bf16 where native, else float32 - `slim.hardware`), `prefix_caching`
        (vLLM; off for benchmarks that repeat prompts), `extra_args` (appended to the vLLM server's
        command line), `max_batch` (the transformers batching server: requests decoded together) and
        `data_parallel_size` / `tensor_parallel_size` (vLLM's: engines, and ranks per engine)."""
        if model_path is None and adapter is None:
            raise InputError("serve needs a model path or an adapter")
        self.data_parallel_size, self.tensor_parallel_size = data_parallel_size, tensor_parallel_size
        self.parallel = data_parallel_size * tensor_parallel_size > 1
        self.requested = backend
        choice = engine_choice(parallel_engine(backend, data_parallel_size, tensor_parallel_size))
        self.backend = choice.engine
        self.adapter = Path(adapter) if adapter else None
        self.model_path = str(model_path or adapter_base(self.adapter))
        if not Path(self.model_path).exists():
            raise InputError(f"{self.model_path}: model folder not found")
        self.host, self.port = host, port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="slim-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.model_name = self.model_path
        self.dtype = TRANSFORMERS_DTYPE if self.backend == "transformers" else dtype or choice.dtype
        self.prefix_caching, self.extra_args, self.max_batch = prefix_caching, tuple(extra_args), max_batch
        self.env: dict[str, str] = dict(os.environ)
        self.startup_s: float | None = None
        if not quiet:
            announce("slim serve engine", self.backend, choice.reason, self._detail())

    def _detail(self) -> str:
        if self.backend == "transformers":
            return f"{self.dtype}, batching server, up to {self.max_batch} requests a batch" + \
                (", adapter merged" if self.adapter else "")
        ranks = (f", {self.data_parallel_size} data-parallel engines" if self.data_parallel_size > 1 else "") + \
            (f", {self.tensor_parallel_size} tensor-parallel ranks each" if self.tensor_parallel_size > 1 else "")
        if vllm_status().cpu:
            return f"{self.dtype}, CPU, eager" + (", merged adapter" if self.adapter else "") + ranks
        return f"{self.dtype}, GPU" + (", adapter with --enable-lora" if self.adapter else "") + ranks

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        if self.backend == "vllm":
            status = vllm_status()
            served = self.model_path  # the name requests use (for a served copy too)
            if self.adapter and not status.cpu:
                self.model_name = LORA_NAME  # requests name the adapter; the base stays served as model_path
            elif self.adapter:  # CPU: a LoRA forces eager mode at half speed, the merged copy does not
                served = self.model_name = str(merged_dir(self.adapter, self.model_path))
            cmd, self.env = serve_command(status, self.model_path, self.adapter, self.host, self.port, served,
                                          dtype=self.dtype, prefix_caching=self.prefix_caching,
                                          extra_args=self.extra_args, data_parallel_size=self.data_parallel_size,
                                          tensor_parallel_size=self.tensor_parallel_size)
            return cmd
        self.model_name = str(self.adapter or self.model_path)
        return [sys.executable, "-m", "slim.batch_server", "--model", self.model_path,
                *(["--adapter", str(self.adapter)] if self.adapter else []), "--served-model-name", self.model_name,
                "--host", self.host, "--port", str(self.port), "--max-batch", str(self.max_batch)]

    def start(self) -> "Server":
        t0 = time.monotonic()
        try:
            try:
                self._launch()
            except ServerExited as e:  # auto: a vLLM that cannot serve this model falls back to transformers
                if self.parallel:  # asked for vLLM's parallelism: no fallback, one line naming the setting
                    raise InputError(f"{parallel_names(self.data_parallel_size, self.tensor_parallel_size)}: the "
                                     f"vLLM server exited ({e.cause}; log {self.log_path})") from None
                if not (self.backend == "vllm" and self.requested == "auto"):
                    raise
                self.backend, self.dtype, self.env = "transformers", TRANSFORMERS_DTYPE, dict(os.environ)
                announce("slim serve engine", "transformers", f"fallback: the vllm server exited ({e.cause}; "
                                                             f"log {self.log_path})", self._detail())
                self._launch()
        except BaseException:  # stopped while it starts (Ctrl-C, SIGTERM): __exit__ will not run, stop it here
            self.stop()
            raise
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
             log_path: str | Path | None = None, engine: str = "auto", data_parallel_size: int = 1,
             tensor_parallel_size: int = 1) -> Iterator[tuple[ChatClient, str]]:
    """(client, engine) for `client.base_url` (engine "endpoint"), or, given a model folder / adapter,
    for a local server run for the block (engine "vllm" or "transformers", what actually serves),
    with vLLM's data / tensor parallelism where asked for."""
    if serve is None and adapter is None:
        yield ChatClient(client), "endpoint"
        return
    with Server(serve, adapter, log_path=log_path, backend=engine, data_parallel_size=data_parallel_size,
                tensor_parallel_size=tensor_parallel_size) as server:
        yield ChatClient(replace(client, base_url=server.base_url, model=client.model or server.model_name)), server.backend
