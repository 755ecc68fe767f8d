"""The ID trainers (`slmrec.trainer.fit`: SASRec, GRU4Rec, fused models) on several processes and resumed.

`fusion run --nproc 2` trains SASRec and a fused model on 2 processes on CPU (gloo), against the
1-process run of the same global batch; a training stage stopped mid-run resumes from its last
checkpoint and ends as the uninterrupted run; SIGTERM to `fusion run --nproc 2` stops every process
it started."""
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import slmrec.trainer
from eval.dataset import load_dataset
from eval.errors import InputError
from eval.io import read_json
from eval.stage import run_stage
from fusion.model import HybridConfig
from fusion.pipeline import build_stages, run_pipeline, stage_of
from fusion.train import FusionStage
from slmrec.pretrain import BackboneStage, PretrainConfig
from slmrec.trainer import CHECKPOINT, TrainConfig
from tests.conftest import write_atomic
from tests.test_batch_server import children_of
from tests.test_distributed import AUDIT, files
from tests.test_fusion import vectors, write_vectors

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
USERS = 41  # one training row per user
BATCH = 4   # per process: the 2-process runs' global batch is 8, the 1-process runs take 8
PRESET = """
[data]
source = "{source}"
rating_gt = 0.0
user_core = 1
item_core = 1
negatives = [10]

[sasrec]
hidden = 16
layers = 1
dropout = 0.0       # dropout draws differ between 1 and 2 processes (a stream per process)
[sasrec.train]
epochs = 4
max_len = 10
batch_size = {batch}

[fusion.h]          # a hybrid trained jointly with SASRec on the hand-made text vectors
mode = "hybrid"
[fusion.h.train]
epochs = 3
batch_size = {batch}
"""
FOLDERS = ("data", "sasrec", "fusion/h")
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture
def preset(tmp_path):
    """The tiny preset on 41 users walking a ring of 30 items, with 7 to 13 interactions: the processes'
    shares of a batch hold different numbers of positions, and the last batch (one row) leaves
    rank 1 none."""
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{(start + (1 + u % 2) * t) % 30}", 5, 1000 + t)
            for u, start in enumerate(rng.integers(0, 30, USERS)) for t in range(7 + u % 7)]
    data = write_atomic(tmp_path / "ring", "ring", rows, [(f"i{i}", f"Movie {i}", 1990 + i, "Drama") for i in range(30)])
    path = tmp_path / "tiny.toml"
    path.write_text(PRESET.format(source=data, batch=BATCH))
    return path


def readme_lines() -> dict[str, str]:
    """The README's lines for the ID trainers on several processes, by their first word."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"The ID trainers .*?```bash\n(.*?)```", text, re.S).group(1)
    return {line.split()[0]: line for line in block.splitlines() if line and not line.startswith("#")}


def command(line: str, run: Path, preset: Path, swap: dict[str, str]) -> list[str]:
    """A README line for this machine: this run and preset, `swap` its process count."""
    for old, new in {"--run R": f"--run {run}", "--preset paper": f"--preset {preset}", **swap}.items():
        assert old in line, f"the README line no longer has {old!r}: {line}"
        line = line.replace(old, new)
    args = shlex.split(line.replace("$(which fusion)", str(BIN / "fusion")))
    return [str(BIN / args[0]), *args[1:]]


def prepared(run: Path, preset: Path) -> Path:
    """RUN/data from the preset and hand-made RUN/vectors (what the fused model reads beside SASRec)."""
    run_stage(build_stages(run, str(preset))[0])
    ds = load_dataset(run / "data")
    write_vectors(run, vectors(ds, users=range(0, ds.num_users, 2), items=range(1, ds.num_items + 1, 3)))
    return run


def pipeline(run: Path, preset: Path, overrides: list[str] = (), nproc: int = 1) -> list[dict]:
    """data, sasrec and fusion/h of the preset through `run_pipeline` (as `fusion run` calls it)."""
    stages = [s for s in build_stages(run, str(preset), overrides) if s.folder in FOLDERS]
    return run_pipeline(run, stages, nproc=nproc, preset=str(preset), overrides=overrides)


def trained(folder: Path, world: int) -> tuple[dict, dict]:
    """The run validated every epoch, selected its best one, took ceil(N / (batch x processes)) steps an
    epoch; its log and test metrics."""
    log = read_json(folder / "train_log.json")
    assert log["processes"] == world and log["steps_per_epoch"] == math.ceil(USERS / (BATCH * 2))
    mrr = {e["epoch"]: e["valid_MRR"] for e in log["epochs"]}
    assert log["best_valid_MRR"] == max(mrr.values()) == mrr[log["best_epoch"]]
    return log, read_json(folder / "metrics.json")


@pytest.mark.slow  # 28-89 s on 2 shared cores: two launches of 2 processes (each imports torch and the project)
def test_fusion_run_on_two_processes_matches_one_process(preset, tmp_path, monkeypatch):
    """`fusion run --nproc 2` trains SASRec and a fused model (jointly with its backbone) on 2 processes:
    each validates every epoch and keeps its best, takes ceil(N / (batch x 2)) steps an epoch, rank 1
    writes nothing under the run, and the results are the 1-process run's with the same global batch."""
    audited = tmp_path / "audited"  # rank 1's writes here are logged: the 2-process run, its temporary files
    one, two, tmp = prepared(tmp_path / "one", preset), audited / "two", audited / "tmp"
    shutil.copytree(one, two)
    tmp.mkdir()
    pipeline(one, preset, [f"sasrec.train.batch_size={2 * BATCH}", f"fusion.h.train.batch_size={2 * BATCH}"])

    hook, audit = tmp_path / "audit", tmp_path / "rank1_writes.log"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT)
    for key, value in {"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "AUDIT_ROOT": str(audited),
                       "AUDIT_LOG": str(audit), "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    folders = {f"os.mkdir {p}" for p in two.rglob("*") if p.is_dir()}  # lancedb.connect "makes" its folder
    # SASRec by the README's torchrun line, then the fused model as `fusion run --nproc 2` launches it
    torchrun = command(readme_lines()["torchrun"], two, preset, {"--nproc_per_node 4": "--nproc_per_node 2"})
    done = subprocess.run(torchrun, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    log = pipeline(two, preset, nproc=2)
    assert [(s["stage"], s["status"], s.get("processes")) for s in log] == [
        ("data", "up to date", None), ("sasrec", "up to date", None), ("fusion/h", "ran", 2)]

    # rank 1 wrote its temporary copy of each stage (which shows the audit was on), nothing under the run
    writes = [w for w in audit.read_text().splitlines() if w not in folders]
    assert writes and not [w for w in writes if not w.split(" ", 1)[1].startswith(str(tmp))], writes
    assert files(two) == files(one)  # one manifest each, no checkpoints left
    for folder in ("sasrec", "fusion/h"):
        (log_1, test_1), (log_2, test_2) = trained(one / folder, 1), trained(two / folder, 2)
        # measured: the same validation MRR at every epoch and the same test metrics to the last bit,
        # epoch losses within 3e-7 (the shares' gradients summed across processes round differently;
        # weighting the shares by rows instead of positions moved losses by 1e-2 and HR@10 by 0.024)
        assert log_2["best_epoch"] == log_1["best_epoch"]
        for a, b in zip(log_1["epochs"], log_2["epochs"], strict=True):
            assert a["valid_MRR"] == pytest.approx(b["valid_MRR"], abs=1e-6)
            assert a.get("loss", 0) == pytest.approx(b.get("loss", 0), abs=1e-5)
        assert test_1.keys() == test_2.keys()
        for protocol in test_1:
            a, b = (without_timings(t[protocol]) for t in (test_1, test_2))
            assert a == pytest.approx(b, abs=1e-6)
    # a rerun launches nothing: the stages are up to date
    assert {s["status"] for s in pipeline(two, preset, nproc=2)[len(log):]} == {"up to date"}


class Stopped(Exception):
    """Raised in place of a validation: the training stage is stopped there."""


def stopped_at(calls: int, monkeypatch) -> None:
    """The `calls`-th validation of `fit` (counted from the first, epoch 0) stops the stage."""
    real, seen = slmrec.trainer.evaluate, []

    def evaluate(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise Stopped
        return real(*args, **kwargs)

    monkeypatch.setattr(slmrec.trainer, "evaluate", evaluate)


def without_timings(x):
    if isinstance(x, dict):
        return {k: without_timings(v) for k, v in x.items() if k not in ("seconds", "train_seconds", "users_per_s")}
    return [without_timings(v) for v in x] if isinstance(x, list) else x


def same_build(a: Path, b: Path) -> None:
    """The same files with the same bytes, but the timings of the logs and metrics (and the manifests)."""
    assert files(a) == files(b)
    for f in (p for p in a.rglob("*") if p.is_file() and p.name != "manifest.json"):
        g = b / f.relative_to(a)
        if f.suffix == ".json":
            assert without_timings(read_json(f)) == without_timings(read_json(g)), f
        else:
            assert f.read_bytes() == g.read_bytes(), f


@pytest.mark.parametrize("kind", ["sasrec", "fusion"])
def test_a_stopped_training_stage_resumes_from_its_checkpoint(kind, preset, tmp_path, monkeypatch):
    """Stopped at a validation, the stage reruns from the last validated epoch's checkpoint (the
    random draws of dropout, sampled negatives and id_dropout included, and where the learning-rate
    schedule was) to the uninterrupted result."""
    whole, cut = prepared(tmp_path / "whole", preset), tmp_path / "cut"
    shutil.copytree(whole, cut)
    if kind == "fusion":  # a frozen backbone (not in the checkpoint) and two seeds; stopped in the second
        run_stage(BackboneStage(whole, PretrainConfig(hidden=16, layers=1, train=TrainConfig(epochs=2, max_len=10))))
        shutil.copytree(whole / "sasrec", cut / "sasrec")
        cfg = HybridConfig(training="frozen", freeze_backbone=True, id_dropout=0.3, seeds=2,
                           train=TrainConfig(epochs=5, batch_size=8, patience=10))
        stage, stop_at = (lambda run: FusionStage(run, cfg, folder="fusion/f")), 6 + 3  # seed 2, epoch 2
    else:  # dropout and sampled negatives: random draws every step
        cfg = PretrainConfig(hidden=16, layers=1, dropout=0.3, train=TrainConfig(
            epochs=6, max_len=10, batch_size=8, loss="sampled", negatives=5, length_pools=2, patience=10,
            lr_schedule="cosine"))
        stage, stop_at = (lambda run: BackboneStage(run, cfg)), 4  # epoch 3's validation

    run_stage(stage(whole))
    with monkeypatch.context() as patch:
        stopped_at(stop_at, patch)
        with pytest.raises(Stopped):
            run_stage(stage(cut))
    work = stage(cut).work_dir
    saved = sorted(p.relative_to(work) for p in work.rglob(CHECKPOINT))
    state = torch.load(work / saved[-1], weights_only=True)
    assert state["epoch"] == (1 if kind == "fusion" else 2) and not state["stopped"]
    if kind == "fusion":  # a finished seed and the stopped one; only what training changes is kept
        assert saved == [Path("seed-42") / CHECKPOINT, Path("seed-43") / CHECKPOINT]
        assert state["model"] and not [k for k in state["model"] if k.startswith("backbone.") or "text" in k]
    calls = []
    real = slmrec.trainer.evaluate
    monkeypatch.setattr(slmrec.trainer, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_stage(stage(cut))
    assert len(calls) == (5 - 1 if kind == "fusion" else 6 - 2)  # only the epochs after the checkpoint
    assert not work.exists()
    same_build(stage(whole).out, stage(cut).out)


def test_sigterm_to_fusion_run_stops_its_processes(preset, tmp_path):
    """The README's `fusion run --nproc` line (2 processes), stopped with SIGTERM while SASRec trains:
    exit 143, none of the processes it started left, the stage unfinished with its checkpoint kept."""
    run = tmp_path / "run"
    cmd = command(readme_lines()["fusion"], run, preset, {"--nproc 4": "--nproc 2"}) + [
        "--until", "sasrec", "--set", "sasrec.train.epochs=100000", "--set", "sasrec.train.patience=100000"]
    proc = subprocess.Popen(cmd, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    checkpoint = run / ".sasrec.work" / CHECKPOINT
    deadline = time.time() + 300
    while not checkpoint.exists():  # training on 2 processes
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    kids = children_of(proc.pid)
    assert len(kids) >= 3  # torchrun and its 2 workers
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    time.sleep(0.5)
    assert [k for k in kids if Path(f"/proc/{k}").exists()
            and "zombie" not in Path(f"/proc/{k}/status").read_text().lower()] == []
    assert not (run / "sasrec").exists()  # the stage did not finish; its checkpoint stays for a rerun
    assert checkpoint.exists()


def test_nproc_and_stage_folders_are_checked(preset, tmp_path):
    stages = build_stages(tmp_path / "run", str(preset))
    with pytest.raises(InputError, match="--nproc must be at least 1"):
        run_pipeline(tmp_path / "run", stages, nproc=0, preset=str(preset))
    with pytest.raises(InputError, match=r"no stage 'fusion/x' \(stages: data, sasrec, .*fusion/h"):
        stage_of(stages, "fusion/x", str(preset))
    assert stage_of(stages, "fusion/h", str(preset)).config.train.batch_size == BATCH
