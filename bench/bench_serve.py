"""`fusion serve` under load on 127.0.0.1: requests/s and p50/p99 latency per concurrency level, for
known users (`GET /users/{id}/recommendations`) and for new users' histories (`POST /recommendations`,
which includes the SLIM student writing the rationale, its encoding and the fusion).

The service runs as its own process (`fusion serve`); the SLIM student is the endpoint given with
--student-url or, by default, the run's adapter (`RUN/slim-student`) served for the bench by
`slim serve`'s engine (--student-backend: by default the one the hardware calls for, see slim.hardware);
--fake-student answers instantly instead (tests/slim_fake_openai.py), so new users measure the
service's own work (prompt, encoding, fusion, retrieval) without the generation. Each level sends at
most --requests requests (--new-requests for new users) and stops sending after --seconds
(--new-seconds; requests in flight then finish, each within the service's --student-timeout);
histories are the last --history items of randomly drawn users of the run. One request of each
kind warms up first.

The bench writes into the run what the service and the student's server write there: RUN/serving
(the model's item vectors in LanceDB) and, for a served adapter, RUN/slim-student-merged. Bench a
copy of a run you want left untouched.

  python bench/bench_serve.py --run runs/demo
  python bench/bench_serve.py --run runs/demo --student-url http://127.0.0.1:8000/v1 --concurrency 1,8,32
  python bench/bench_serve.py --run runs/demo --fake-student
  python bench/bench_serve.py --run runs/demo --no-new-users

Timings on a shared 2-core machine are noisy (client, service and student share the cores): the
load average at the start is printed with the figures.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
from rich.console import Console
from rich.table import Table

from eval.dataset import load_dataset
from slim.serve import Server, free_port


class Client:
    """One keep-alive connection per worker thread."""

    def __init__(self, port: int):
        self.local, self.port = threading.local(), port

    def __call__(self, method: str, path: str, body: dict | None = None) -> int:
        if not hasattr(self.local, "conn"):
            self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn = self.local.conn
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status


def level(call, jobs: list[tuple[str, str, dict | None]], concurrency: int, seconds: float) -> dict[str, float]:
    """Send the jobs from `concurrency` threads (no new ones after `seconds`); throughput, latencies and
    the status codes of the failed requests (0: no HTTP answer)."""
    latencies: list[float] = []
    failed: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()

    def one(job: tuple[str, str, dict | None]) -> None:
        if time.perf_counter() > deadline:
            return
        start = time.perf_counter()
        try:
            status = call(*job)
        except OSError:
            status = 0
        with lock:
            latencies.append(time.perf_counter() - start)
            if status != 200:
                failed[status] += 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "errors": sum(failed.values()), "failed": dict(failed), "req_s": len(ms) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def failures(failed: dict[int, int]) -> str:
    """'3 (2x 502, 1x no answer)' for the table; '0' when none failed."""
    if not failed:
        return "0"
    kinds = ", ".join(f"{n}x {status or 'no answer'}" for status, n in failed.items())
    return f"{sum(failed.values())} ({kinds})"


@contextlib.contextmanager
def service(run: str, model: str | None, student: str | None, student_model: str | None,
            student_timeout: float) -> Iterator[int]:
    """`fusion serve` on a free port, until the block ends; yields the port once /ready answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "fusion.cli", "serve", "--run", run, "--port", str(port),
           "--student-timeout", str(student_timeout)]
    cmd += ["--model", model] if model else []
    cmd += ["--student-url", student] if student else []
    cmd += ["--student-model", student_model] if student_model else []
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                sys.exit(f"fusion serve exited: {log.read()[-2000:]}")
            with contextlib.suppress(OSError):
                if Client(port)("GET", "/ready") == 200:
                    break
            time.sleep(0.5)
        yield port
    finally:
        proc.kill()  # not terminate: uvicorn would wait for the requests a timed-out level left in flight
        proc.wait()
        log.close()


def fake_student() -> contextlib.AbstractContextManager:
    """The tests' OpenAI-compatible server: instant well-formed answers, a real HTTP round trip."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.slim_fake_openai import FakeOpenAI

    return FakeOpenAI()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="A finished run (RUN/data and the model's folders).")
    ap.add_argument("--model", default=None, help="Model folder of the run (default: as `fusion serve`).")
    ap.add_argument("--student-url", default=None,
                    help="The SLIM student's endpoint (default: serve RUN/slim-student for the bench).")
    ap.add_argument("--student-model", default=None, help="Model name at --student-url (default: its one model).")
    ap.add_argument("--student-backend", default="auto", choices=["auto", "vllm", "transformers"],
                    help="Engine serving RUN/slim-student when no --student-url is given (slim serve --backend).")
    ap.add_argument("--student-timeout", type=float, default=120.0,
                    help="Seconds the service waits for one rationale (then 502; `fusion serve --student-timeout`).")
    ap.add_argument("--fake-student", action="store_true", help="Instant answers instead of the student's (see above).")
    ap.add_argument("--new-users", action=argparse.BooleanOptionalAction, default=True,
                    help="Also bench new users' histories (needs the student).")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=300, help="Most known-user requests per level.")
    ap.add_argument("--new-requests", type=int, default=32, help="Most new-user requests per level.")
    ap.add_argument("--seconds", type=float, default=60.0, help="No new request after this long (known users).")
    ap.add_argument("--new-seconds", type=float, default=120.0, help="No new request after this long (new users).")
    ap.add_argument("--history", type=int, default=20, help="Items in a new user's history.")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = ap.parse_args()

    ds = load_dataset(Path(args.run) / "data")
    rng = np.random.default_rng(args.seed)
    raw_users, raw_items = ds.users["raw_id"].to_numpy(), dict(zip(ds.items["item"], ds.items["raw_id"]))
    users = [f"/users/{raw_users[u]}/recommendations?k={args.k}" for u in rng.integers(0, ds.num_users, args.requests)]
    histories = [[raw_items[int(i)] for i in ds.sequences[u][-args.history:]]
                 for u in rng.integers(0, ds.num_users, args.new_requests)]
    levels = [int(c) for c in args.concurrency.split(",")]

    load = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        student, student_model = args.student_url, args.student_model
        what = f"student at {student}"
        if args.new_users and args.fake_student:
            student, what = stack.enter_context(fake_student()).base_url, "instant fake student"
        elif args.new_users and student is None:
            server = stack.enter_context(Server(adapter=Path(args.run) / "slim-student", backend=args.student_backend,
                                                quiet=True))
            student, student_model = server.base_url, server.model_name
            what = f"RUN/slim-student served by {server.backend}, ready in {server.startup_s:.0f} s"
        port = stack.enter_context(service(args.run, args.model, student if args.new_users else None, student_model,
                                           args.student_timeout))
        call = Client(port)
        call("GET", users[0])  # warm-up: first-touch costs are not part of any level
        if args.new_users:
            call("POST", "/recommendations", {"history": histories[0], "k": args.k})
        results = {}
        for c in levels:
            results[f"known users, c={c}"] = level(call, [("GET", p, None) for p in users], c, args.seconds)
        if args.new_users:
            for c in levels:
                jobs = [("POST", "/recommendations", {"history": h, "k": args.k}) for h in histories]
                results[f"new users, c={c}"] = level(call, jobs, c, args.new_seconds)

    title = (f"fusion serve on {args.run} (k={args.k}; new users: {args.history}-item histories, {what}; "
             f"load average {load:.1f} on {os.cpu_count()} cores at the start)")
    table = Table(title=title)
    for col in ("workload", "requests", "errors", "req/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for name, r in results.items():
        table.add_row(name, str(r["requests"]), failures(r["failed"]), f"{r['req_s']:.3g}", f"{r['p50_ms']:.0f}",
                      f"{r['p99_ms']:.0f}")
    Console(width=160).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "levels": results}, indent=2))


if __name__ == "__main__":
    main()
