"""A local OpenAI-compatible server for a model folder (+ LoRA adapter), as a context manager.

`vllm serve` where vllm is importable (GPU; the adapter is loaded with --enable-lora), otherwise
`transformers serve` (CPU; the adapter is merged into a copy of the base first). Either way the
server is ready only once it has answered a real chat completion.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
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
from eval.io import read_json

from .client import ChatClient, ClientConfig
from .lora import adapter_base, merged_dir

LORA_NAME = "student"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pick_backend(backend: str = "auto") -> str:
    if backend == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    if backend not in ("vllm", "transformers"):
        raise InputError(f"unknown serving backend '{backend}' (choose auto, vllm or transformers)")
    return backend


def _cli(name: str) -> str:
    """The console script `name` of this environment (the venv's, not whatever is first on PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise InputError(f"'{name}' is not installed")
    return found


class Server:
    """`with Server(model_path, adapter) as s:` -> requests go to `s.base_url` with model `s.model_name`."""

    def __init__(self, model_path: str | Path | None = None, adapter: str | Path | None = None,
                 port: int | None = None, host: str = "127.0.0.1", backend: str = "auto",
                 startup_timeout_s: float = 900.0, log_path: str | Path | None = None):
        if model_path is None and adapter is None:
            raise InputError("serve needs a model path or an adapter")
        self.backend = pick_backend(backend)
        self.adapter = Path(adapter) if adapter else None
        self.model_path = str(model_path or adapter_base(self.adapter))
        if not Path(self.model_path).exists():
            raise InputError(f"{self.model_path}: model folder not found")
        self.host, self.port = host, port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="slim-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.model_name = self.model_path

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        where = ["--host", self.host, "--port", str(self.port)]
        if self.backend == "vllm":
            cmd = [_cli("vllm"), "serve", self.model_path, *where]
            if self.adapter:
                rank = read_json(self.adapter / "adapter_config.json")["r"]
                cmd += ["--enable-lora", "--lora-modules", f"{LORA_NAME}={self.adapter}",
                        "--max-lora-rank", str(max(8, rank))]
                self.model_name = LORA_NAME
            return cmd
        if self.adapter:  # transformers serve cannot load an adapter: serve base + adapter merged
            self.model_name = str(merged_dir(self.adapter, self.model_path))
        return [_cli("transformers"), "serve", self.model_name, *where]

    def start(self) -> "Server":
        # `transformers serve` answers GET /v1/models with a 500 when the hub cache folder is missing
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
        hub.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Poll with a one-token chat completion until it succeeds, the process dies or time runs out."""
        client = ChatClient(ClientConfig(base_url=self.base_url, model=self.model_name, max_retries=0,
                                         timeout_s=120, max_tokens=1))
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.backend} server exited with code {self.proc.returncode}; "
                                   f"log {self.log_path}:\n{self.log_path.read_text()[-2000:]}")
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
        if self.proc is None or self.proc.poll() is not None:
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
             log_path: str | Path | None = None) -> Iterator[ChatClient]:
    """A client for `client.base_url`, or, given a model folder / adapter, for a local server run for the block."""
    if serve is None and adapter is None:
        yield ChatClient(client)
        return
    with Server(serve, adapter, log_path=log_path) as server:
        yield ChatClient(replace(client, base_url=server.base_url, model=client.model or server.model_name))
