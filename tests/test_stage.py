"""The stage contract: a toy stage is a few lines, skipped when up to date, rebuilt when an input or
its config changes, written atomically; its command is generated from its config."""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from eval.cli import guarded, stage_command
from eval.config import check, from_dict, setting
from eval.errors import InputError
from eval.stage import Stage, run_stage


@dataclass(frozen=True)
class Inner:
    rate: float = setting(0.5, "A rate.")
    sizes: list[int] = setting(help="Sizes.", factory=lambda: [1, 2])


@dataclass(frozen=True)
class ToyConfig:
    times: int = setting(2, "How often to repeat the text.")
    label: str | None = setting(None, "An optional label.")
    loud: bool = setting(False, "Upper-case the text.")
    inner: Inner = setting(factory=Inner)


class Toy(Stage):
    """Repeat RUN/source.txt; writes RUN/toy."""
    name = "toy"
    config_class = ToyConfig

    def inputs(self) -> dict[str, Path]:
        return {"source": self.run / "source.txt"}

    def build(self, out: Path) -> dict:
        text = (self.run / "source.txt").read_text() * self.config.times
        (out / "out.txt").write_text(text.upper() if self.config.loud else text)
        (out / "train_log.json").write_text(json.dumps({"seconds": time.perf_counter()}))  # differs every build
        return {"chars": len(text)}


class Downstream(Stage):
    name = "down"
    config_class = ToyConfig

    def inputs(self) -> dict[str, Path]:
        return {"toy": self.run / Toy.name}

    def build(self, out: Path) -> dict:
        (out / "copy.txt").write_text((self.run / "toy" / "out.txt").read_text())
        return {}


def test_toy_stage_skipped_when_up_to_date_rebuilt_when_an_input_changes(tmp_path):
    (tmp_path / "source.txt").write_text("ab")
    first = run_stage(Toy(tmp_path))
    assert first.status == "ran" and first.counts == {"chars": 4}
    assert (tmp_path / "toy" / "out.txt").read_text() == "abab"
    assert run_stage(Toy(tmp_path)).status == "up to date"
    assert run_stage(Downstream(tmp_path)).status == "ran"

    (tmp_path / "source.txt").write_text("xy")            # an input's content changes
    assert run_stage(Toy(tmp_path)).status == "ran"
    assert run_stage(Downstream(tmp_path)).status == "ran"  # the change travels downstream by digest
    assert (tmp_path / "down" / "copy.txt").read_text() == "xyxy"

    assert run_stage(Toy(tmp_path, ToyConfig(times=3))).status == "ran"  # so does the config
    assert run_stage(Toy(tmp_path, ToyConfig(times=3)), force=True).status == "ran"
    manifest = json.loads((tmp_path / "toy" / "manifest.json").read_text())
    assert manifest["config"]["times"] == 3 and manifest["counts"] == {"chars": 6} and manifest["missing"] == 0


def test_a_rebuild_with_identical_output_changes_nothing_downstream(tmp_path):
    (tmp_path / "source.txt").write_text("ab")
    run_stage(Toy(tmp_path))
    run_stage(Downstream(tmp_path))
    assert run_stage(Toy(tmp_path), force=True).status == "ran"       # same artifact, another training log
    assert run_stage(Downstream(tmp_path)).status == "up to date"


def test_failed_build_leaves_the_previous_output(tmp_path):
    (tmp_path / "source.txt").write_text("ab")
    run_stage(Toy(tmp_path))
    (tmp_path / "source.txt").unlink()
    with pytest.raises(InputError, match="source.txt: not found"):
        run_stage(Toy(tmp_path))
    assert (tmp_path / "toy" / "out.txt").read_text() == "abab"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".toy")]  # no temporary folder left


def test_unreadable_manifest_means_rebuild(tmp_path):
    (tmp_path / "source.txt").write_text("ab")
    run_stage(Toy(tmp_path))
    (tmp_path / "toy" / "manifest.json").write_text("{not json")
    assert run_stage(Toy(tmp_path)).status == "ran"


class Flaky(Stage):
    """An append-only stage that finishes one unit of work per run."""
    name = "flaky"
    config_class = ToyConfig
    in_place = True

    def build(self, out: Path) -> dict:
        log = out / "units.txt"
        done = len(log.read_text().split()) if log.exists() else 0
        with open(log, "a") as f:
            f.write(f"{done} ")
        return {"units": self.config.times, "done": done + 1}

    def missing(self, counts: dict) -> int:
        return counts["units"] - counts["done"]


def test_unfinished_in_place_stage_is_an_error_and_resumes(tmp_path):
    with pytest.raises(InputError, match="flaky: 1 units of work unfinished"):
        run_stage(Flaky(tmp_path))
    assert run_stage(Flaky(tmp_path)).status == "ran"          # resumed: not up to date while unfinished
    assert (tmp_path / "flaky" / "units.txt").read_text() == "0 1 "
    assert run_stage(Flaky(tmp_path)).status == "up to date"


def test_settings_are_checked_against_their_types():
    assert from_dict(ToyConfig, {"times": "3", "inner": {"rate": 1, "sizes": "4, 5"}}) == \
        ToyConfig(times=3, inner=Inner(rate=1.0, sizes=[4, 5]))
    assert check("none", int | None, "x") is None
    for data, message in (({"times": "abc"}, "toy.times: expected an integer, got 'abc'"),
                          ({"times": True}, "toy.times: expected an integer"),
                          ({"inner": {"rate": "fast"}}, "toy.inner.rate: expected a number"),
                          ({"inner": {"sizes": "1,abc"}}, r"toy.inner.sizes\[1\]: expected an integer"),
                          ({"inner": {"rate": float("nan")}}, "toy.inner.rate: expected a number"),
                          ({"loud": "maybe"}, "toy.loud: expected true or false"),
                          ({"tims": 2}, "toy: unknown setting 'tims'")):
        with pytest.raises(InputError, match=message):
            from_dict(ToyConfig, data, "toy")


def test_command_options_come_from_the_config(tmp_path):
    app = typer.Typer()
    stage_command(app, "toy", Toy, lambda s: typer.echo(f"wrote {s.out}"))
    app.command("noop")(lambda: None)  # a second command keeps typer from collapsing the app
    (tmp_path / "source.txt").write_text("ab")
    preset = tmp_path / "p.toml"
    preset.write_text("[toy]\ntimes = 4\nlabel = 'from preset'\n[toy.inner]\nrate = 0.1\n")
    runner = CliRunner()

    help_text = runner.invoke(app, ["toy", "--help"], terminal_width=200).output
    for option in ("--times", "--label", "--loud", "--no-loud", "--inner.rate", "--inner.sizes", "--preset", "--set"):
        assert option in help_text
    assert "How often to repeat the text." in help_text

    result = runner.invoke(app, ["toy", "--run", str(tmp_path), "--preset", str(preset), "--set", "times=5",
                                 "--inner.sizes", "7,8", "--loud"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "toy" / "manifest.json").read_text())
    # default < preset table < --set < options
    assert manifest["config"] == {"times": 5, "label": "from preset", "loud": True,
                                  "inner": {"rate": 0.1, "sizes": [7, 8]}}
    assert (tmp_path / "toy" / "out.txt").read_text() == "AB" * 5
    assert "up to date" in runner.invoke(app, ["toy", "--run", str(tmp_path), "--preset", str(preset), "--set",
                                               "times=5", "--inner.sizes", "7,8", "--loud"]).output


def test_bad_option_value_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    app = typer.Typer()
    stage_command(app, "toy", Toy, lambda s: None)
    app.command("noop")(lambda: None)
    (tmp_path / "source.txt").write_text("ab")
    monkeypatch.setattr(sys, "argv", ["toy", "toy", "--run", str(tmp_path), "--times", "abc"])
    with pytest.raises(SystemExit) as exit_:
        guarded(app)()
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: toy.times: expected an integer, got 'abc'"
    assert not (tmp_path / "toy").exists()
