"""The SLMRec LLM stages on several processes: the README's torchrun / accelerate launch lines run with 2
processes on CPU (gloo) against the 1-process run of the same global batch, and the paper preset's
schedules for 1 to 8 processes."""
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from eval.cli import settings_data
from eval.io import read_json
from eval.stage import run_stage
from slmrec.distill import DistillConfig
from slmrec.llm import LLMRecConfig
from slmrec.llm_train import (LLMTrainConfig, Schedule, SLMRecStudentConfig, SLMRecTeacherConfig, StudentStage,
                              TeacherStage, training_args)
from tests import test_distill
from tests.test_distill import TINY

run = test_distill.run  # the fixture: RUN/data and a hand-made RUN/sasrec holding the item embeddings
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
USERS = 40  # the synthetic data set: one training row per user
# the 2-process runs: teacher 4 rows x 2 processes, student 2 rows x 2 processes x 2 accumulated; the
# 1-process runs take the same global batch by accumulation
TEACHER = dict(batch_size=4, grad_accum=1)
STUDENT = dict(batch_size=2, grad_accum=2)
TRAIN = dict(epochs=1, max_len=8, evals_per_epoch=2)
OPTIONS = {
    "train-teacher": ["--set", "model.llama={%s}" % ",".join(f"{k}={v}" for k, v in TINY.items()),
                      "--model.layers", "4", "--model.lora-r", "4", "--model.lora-dropout", "0"],
    "distill": ["--student.layers", "2", "--student.lora-r", "4", "--student.lora-dropout", "0",
                "--distill.blocks", "2"]}
# what a process other than rank 0 opens for writing, creates, renames or deletes under the run
AUDIT = '''import os, sys
if os.environ.get("RANK", "0") != "0":
    root, log = os.environ["AUDIT_ROOT"], os.environ["AUDIT_LOG"]
    def hook(event, args):
        if event == "open" and isinstance(args[0], str):
            mode, flags = args[1] or "", args[2] or 0
            writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        else:
            writes = event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree")
        if writes and isinstance(args[0], (str, os.PathLike)) and os.path.abspath(args[0]).startswith(root):
            with open(log, "a") as f:
                f.write(f"{event} {os.fspath(args[0])}\\n")
    sys.addaudithook(hook)
'''


def readme_lines() -> list[str]:
    """The multi-process command lines of the README (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"### Several GPUs.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line and not line.startswith("#")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(line: str, run: Path, train: dict, swap: dict[str, str]) -> list[str]:
    """A README line for this machine: `swap` its process counts and endpoint, the tiny settings in
    place of the paper preset."""
    for old, new in {"$(which slmrec)": str(BIN / "slmrec"), "--run R": f"--run {run}",
                     "--preset paper": "", **swap}.items():
        assert old in line, f"the README line no longer has {old!r}: {line}"
        line = line.replace(old, new)
    args = shlex.split(line)
    args[0] = str(BIN / args[0])
    stage = next(c for c in OPTIONS if c in args)
    return args + OPTIONS[stage] + [f"--train.{k.replace('_', '-')}={v}" for k, v in {**TRAIN, **train}.items()]


def launch(*commands: list[str], run: Path, tmp: Path) -> None:
    """Start the commands together (the agents of one job) and wait for every one to succeed."""
    hook = tmp / "audit"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(AUDIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
           "AUDIT_ROOT": str(run), "AUDIT_LOG": str(tmp / "rank1_writes.log"), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def trained(folder: Path, world: int, batch_size: int, grad_accum: int) -> tuple[dict, dict]:
    """The run evaluated mid-run and kept its best checkpoint; its steps are the Trainer's. Its
    validation MRR by step and test metrics."""
    log = read_json(folder / "train_log.json")
    steps = math.ceil(USERS / (batch_size * world * grad_accum))
    assert log["steps"] == log["schedule"]["steps_per_epoch"] == steps and log["processes"] == world
    evals = {h["step"]: h["eval_MRR"] for h in log["history"] if "eval_MRR" in h}
    assert list(evals) == [2, 4, 5] and log["best_valid_MRR"] == max(evals.values())
    assert log["best_checkpoint"].endswith(f"checkpoint-{max(evals, key=evals.get)}")
    return evals, read_json(folder / "metrics.json")


def one_process(parts: dict) -> LLMTrainConfig:
    """The training settings of the 1-process run with the 2-process run's global batch."""
    return LLMTrainConfig(**TRAIN, batch_size=parts["batch_size"], grad_accum=2 * parts["grad_accum"])


def same_results(x: tuple[dict, dict], y: tuple[dict, dict]) -> None:
    """Validation (model selection) and test metrics equal up to 1e-6 but for the timing (measured:
    identical; the weights equal bit for bit, the student's within 3e-8)."""
    (valid_a, a), (valid_b, b) = x, y
    assert valid_a == pytest.approx(valid_b, abs=1e-6) and a.keys() == b.keys()
    for protocol in a:
        assert a[protocol].pop("users_per_s") and b[protocol].pop("users_per_s")
        assert a[protocol] == pytest.approx(b[protocol], abs=1e-6)


@pytest.mark.slow  # 57-90 s on 2 busy cores: three launches of 2 processes and the 1-process runs
def test_readme_lines_on_two_processes_match_one_process(run, tmp_path):
    accelerate, torchrun, nodes = readme_lines()
    two, nodes_run = tmp_path / "two", tmp_path / "nodes"
    shutil.copytree(run, two)
    teacher = LLMRecConfig(llama=TINY, layers=4, lora_r=4, lora_dropout=0.0)
    run_stage(TeacherStage(run, SLMRecTeacherConfig(model=teacher, train=one_process(TEACHER))))
    run_stage(StudentStage(run, SLMRecStudentConfig(student=LLMRecConfig(layers=2, lora_r=4, lora_dropout=0.0),
                                                    distill=DistillConfig(blocks=2), train=one_process(STUDENT))))

    launch(command(accelerate, two, TEACHER, {"--num_processes 4": f"--num_processes 2 --main_process_port "
                                                                    f"{free_port()}"}), run=two, tmp=tmp_path)
    shutil.copytree(two, nodes_run)  # the teacher the multi-node line distills from
    launch(command(torchrun, two, STUDENT, {"--nproc_per_node 4": "--nproc_per_node 2"}), run=two, tmp=tmp_path)
    port = free_port()
    agent = command(nodes, nodes_run, STUDENT, {"--nproc_per_node 4": "--nproc_per_node 1",
                                                "HOST:29500": f"127.0.0.1:{port}"})
    launch(agent, agent, run=nodes_run, tmp=tmp_path)

    log = tmp_path / "rank1_writes.log"
    writes = log.read_text().splitlines() if log.exists() else []
    # rank 1 wrote nothing under the runs but the Trainer's checkpoint folders (every process keeps its
    # RNG state there, for resuming), which go when the stage finishes; that it made them shows the audit was on
    assert writes and all(re.fullmatch(r"os.mkdir .*/\.slmrec-(teacher|student)\.work/checkpoint-\d+", w)
                          for w in writes), writes
    for name, parts in (("slmrec-teacher", TEACHER), ("slmrec-student", STUDENT)):
        one = trained(run / name, 1, parts["batch_size"], 2 * parts["grad_accum"])
        same_results(trained(two / name, 2, **parts), one)
    same_results(trained(nodes_run / "slmrec-student", 2, **STUDENT), trained(run / "slmrec-student", 1, 2, 4))
    assert files(two) == files(run) == files(nodes_run)  # one manifest each, no leftovers
    manifest = read_json(two / "slmrec-student" / "manifest.json")
    assert manifest["config"]["train"]["grad_accum"] == 2 and "--train.grad-accum=2" in manifest["argv"]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_paper_preset_schedules_evaluate_inside_the_run(world):
    """The paper preset's training settings on 1 to 8 processes: every evaluation and checkpoint of an
    epoch falls inside the run, and the Trainer accepts the schedule (save steps a multiple of eval steps)."""
    for table in ("slmrec-teacher", "slmrec-student"):
        cfg = LLMTrainConfig(**settings_data("paper", [], f"{table}.train"))
        for rows in (cfg.batch_size * world * cfg.evals_per_epoch, 22_363, 1_000_000):  # Amazon Beauty: 22,363 users
            s = Schedule.of(rows, cfg, world)
            assert s.steps_per_epoch == math.ceil(rows / (cfg.batch_size * world * cfg.grad_accum))
            assert s.eval_every * cfg.evals_per_epoch <= s.steps_per_epoch and s.warmup_steps < s.steps
            args = training_args(cfg, s, Path("unused"))
            assert args.eval_steps == args.save_steps == s.eval_every and args.warmup_steps == s.warmup_steps
