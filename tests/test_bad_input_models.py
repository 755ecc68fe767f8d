"""Broken checkpoints and settings: one line naming the file (or setting), exit code 1, nothing partial."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from eval.dataset import prepare_dataset
from eval.errors import InputError
from eval.io import WEIGHTS
from eval.preprocess import PrepareConfig
from eval.registry import load_model
from eval.stage import run_stage
from slmrec.pretrain import BackboneStage, PretrainConfig
from slmrec.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_module):
    run = tmp_path_factory.mktemp("bad-models")
    prepare_dataset(PrepareConfig(source=str(synthetic_module), rating_gt=None, user_core=1, item_core=1,
                                  negatives=[10]), run)
    for model in ("sasrec", "gru4rec"):
        run_stage(BackboneStage(run, PretrainConfig(model=model, hidden=8, layers=1,
                                                    train=TrainConfig(epochs=1, max_len=8))))
    return run


@pytest.fixture(scope="module")
def synthetic_module(tmp_path_factory):
    from tests.conftest import write_atomic

    rows = [(f"u{u}", f"i{(u + t) % 20}", 5, 1000 + t) for u in range(20) for t in range(6)]
    return write_atomic(tmp_path_factory.mktemp("raw") / "syn", "syn", rows,
                        [(f"i{i}", f"Movie {i}", 1990, "Drama") for i in range(20)])


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fusion.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def broken_copy(run: Path, tmp_path: Path, model: str, damage) -> Path:
    """A run folder whose `model` checkpoint is damaged by `damage(folder)`."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damage(copy / model)
    return copy


def truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def empty(folder: Path) -> None:
    (folder / WEIGHTS).write_bytes(b"")


def remove(folder: Path) -> None:
    (folder / WEIGHTS).unlink()


def wrong_shape(folder: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(folder / WEIGHTS)
    state["item_emb.weight"] = state["item_emb.weight"][:-1].contiguous()
    save_file(state, folder / WEIGHTS)


def unknown_key(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "hiden": 3}))


def not_json(folder: Path) -> None:
    (folder / "config.json").write_text("{model_type: sasrec")


def config_value(key: str, value: object):
    """Damage: one config.json value replaced."""
    def damage(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
    return damage


CASES = {
    "truncated": (truncate, r"model.safetensors: not a readable safetensors file"),
    "empty": (empty, r"model.safetensors: not a readable safetensors file"),
    "missing": (remove, r"model.safetensors: weights file not found"),
    "shape": (wrong_shape, r"model.safetensors: tensor 'item_emb.weight' has shape \[20, 8\], expected \[21, 8\]"),
    "unknown key": (unknown_key, r"config.json: .*unexpected keyword argument 'hiden'"),
    "not json": (not_json, r"config.json: not valid JSON"),
    "wrong type": (config_value("hidden", "eight"), r"config.json: hidden: expected an integer, got 'eight'$"),
    "unbuildable": (config_value("dropout", 2.0), r"config.json: cannot build a \w+ model from it \(dropout "),
    "model_type a list": (config_value("model_type", ["sasrec"]), r"config.json: unknown model_type \['sasrec'\]"),
    "folder as config.json": (lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()),
                              r"no config.json, so not a model folder$"),
}


@pytest.mark.parametrize("model", ["sasrec", "gru4rec"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_checkpoint_is_one_line(run, tmp_path, model, case):
    damage, message = CASES[case]
    broken = broken_copy(run, tmp_path, model, damage)
    with pytest.raises(InputError, match=message):
        load_model(broken / model)


@pytest.mark.parametrize("case", ["truncated", "shape", "not json"])
def test_report_on_a_broken_model_exits_1_with_one_line(run, tmp_path, case):
    damage, message = CASES[case]
    broken = broken_copy(run, tmp_path, "sasrec", damage)
    result = cli("evaluate", "--run", str(broken))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(broken / "sasrec") in lines[0], result.stderr
    assert not (broken / "report").exists()


@pytest.mark.parametrize("model, problem", [("nope", "not found (expected a model folder)"),
                                            ("data", "no config.json, so not a model folder"),
                                            ("gru4rec/config.json", "is a file, expected a model folder")])
def test_recommend_names_the_model_folder_asked_for_not_another_broken_one(run, tmp_path, monkeypatch, capsys, model,
                                                                           problem):
    from tests.test_recommend import cli as in_process

    broken = broken_copy(run, tmp_path, "sasrec", not_json)  # the run's other model folder is broken
    code, _, err = in_process(monkeypatch, capsys, "recommend", "--run", str(broken), "--user", "u1", "--model", model)
    assert (code, err.strip()) == (1, f"error: {broken / model}: {problem}")
    if model == "nope":  # and once as a real command
        result = cli("recommend", "--run", str(broken), "--user", "u1", "--model", model)
        assert (result.returncode, result.stderr.strip()) == (1, f"error: {broken / model}: {problem}")


@pytest.mark.parametrize("args, message", [
    (["--set", 'rating_gt="abc"'], "data.rating_gt: expected a number or none, got 'abc'"),
    (["--negatives", "100,abc"], "data.negatives[1]: expected an integer, got 'abc'"),
    (["--user-core", "2.5"], "data.user_core: expected an integer, got 2.5"),
    (["--negatives", "0"], "negatives: sizes must be positive"),
])
def test_bad_setting_is_one_line_and_writes_nothing(synthetic_module, tmp_path, args, message):
    result = cli("prepare", "--run", str(tmp_path / "r"), "--source", str(synthetic_module), *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "r").exists()


def test_bad_pipeline_override_is_one_line_and_writes_nothing(tmp_path):
    result = cli("run", "--run", str(tmp_path / "r"), "--set", 'data.rating_gt="abc"')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: data.rating_gt: expected a number or none, got 'abc'"]
    assert not (tmp_path / "r").exists()


def test_artifacts_follow_the_umask(run):
    for path in (run / "sasrec").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
