"""What every command-line tool of the project shares.

- Bad input is one clear line on stderr and exit code 1, never a traceback (`guarded`).
- A stage's command is generated from its config dataclass (`stage_command`): one option per
  setting, with the field's default and help, plus `--run`, `--preset`, `--set` and `--force`.
  Settings apply in this order: the dataclass default, the preset's table, `--set`, the options.
"""
from __future__ import annotations

import dataclasses
import inspect
import signal
import sys
import typing
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .config import Option, from_dict, options_of, parse_override, parse_value, set_dotted
from .errors import InputError, user_path
from .presets import expand, read_preset
from .stage import Stage, run_stage

err = Console(stderr=True)


class PathSetting(NamedTuple):
    kind: str          # as `user_path` takes it: "file", "folder" or "model"
    what: str
    must_exist: bool = True  # False: a value not on disk may be a Hub id, left to its reader


# The settings that name a file or folder of the user's, by the name of the config class holding them
# (its subclasses' configs are checked too). They are checked when a command starts: a file where a
# folder belongs otherwise fails deep inside a library, or in a server that exits, minutes later.
PATH_SETTINGS: dict[str, dict[str, PathSetting]] = {
    "PrepareConfig": {"meta": PathSetting("file", "a metadata file")},
    "GenerationConfig": {"tokenizer": PathSetting("folder", "a tokenizer folder", must_exist=False)},
    "ProfileConfig": {"tokenizer": PathSetting("folder", "a tokenizer folder", must_exist=False)},
    "RationaleConfig": {"serve": PathSetting("model", "a model folder to serve")},
    "StudentRationalesConfig": {"base_model": PathSetting("model", "a base model folder")},
    "SlimStudentConfig": {"base_model": PathSetting("model", "a base model folder")},
    "EncodeConfig": {"model": PathSetting("model", "a sentence-transformers folder")},
    "QualityConfig": {"encoder": PathSetting("model", "a sentence-transformers folder")},
    "LLMRecConfig": {"base": PathSetting("model", "a model folder or .gguf file")},
}
EMBEDDED = "embedded"  # RationaleConfig.serve's name of the embedded model: not a path


def _path_setting(cls: type, name: str) -> PathSetting | None:
    for c in cls.__mro__:
        if name in PATH_SETTINGS.get(c.__name__, {}):
            return PATH_SETTINGS[c.__name__][name]
    return None


def check_paths(cfg: Any, where: str, missing_ok: bool = False) -> None:
    """Every path setting of a config (nested ones too) names what it should: one line naming the
    setting and the path otherwise. `missing_ok`: only a path that is there is checked (the pipeline
    skips finished stages, which need their model folders no more)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_paths(value, f"{where}.{f.name}", missing_ok)
            continue
        spec = _path_setting(type(cfg), f.name)
        if spec is None or value in (None, EMBEDDED):
            continue
        kind = "file" if str(value).endswith(".gguf") else spec.kind  # a GGUF file stands for a model folder
        must_exist = (spec.must_exist and not missing_ok) or Path(value).exists()
        user_path(value, kind, f"{spec.what} ({where}.{f.name})", must_exist)


def run_folder(run: Path, must_exist: bool = False) -> Path:
    """A run directory: a folder, or (for a command that starts one) not there yet."""
    return user_path(run, "folder", "a run folder", must_exist)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def exit_on_signal(signum: int, frame: Any) -> None:
    """SIGTERM / SIGHUP unwind like Ctrl-C: context managers stop the servers and engines a command
    started, and append-only records stay whole (exit code 128 + the signal's number). A second
    signal while unwinding is ignored, so it cannot cut a server's stop short."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(128 + signum)


def guarded(app: typer.Typer) -> Callable[[], None]:
    """Entry point that runs a typer app, turns InputError into one line on stderr, exit 1, and lets
    SIGTERM and SIGHUP (a job scheduler, `timeout`, a closed terminal) stop it as cleanly as Ctrl-C."""
    def main() -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, exit_on_signal)
        try:
            app()
        except InputError as e:
            err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            sys.exit(1)
    return main


def _metavar(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return "LIST"
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(args[0], "VALUE")


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def _option_param(opt: Option) -> inspect.Parameter:
    flag = "--" + opt.path.replace("_", "-")
    shown = "none" if opt.default is None else ",".join(map(str, opt.default)) if isinstance(opt.default, list) \
        else str(opt.default).lower() if isinstance(opt.default, bool) else str(opt.default)
    if opt.hint is bool:
        return _param(opt.path.replace(".", "__"), Optional[bool],
                      typer.Option(None, f"{flag}/--no-{flag[2:]}", help=opt.help, show_default=shown))
    return _param(opt.path.replace(".", "__"), Optional[str],
                  typer.Option(None, flag, help=opt.help, show_default=shown, metavar=_metavar(opt.hint)))


def settings_data(preset: str | None, overrides: list[str] = (), table: str = "") -> dict[str, Any]:
    """The settings of a preset (or of one of its tables) with `--set key=value` overrides applied,
    ${VAR} not yet expanded."""
    if preset and (Path(preset).suffix == ".toml" or "/" in preset):  # a path, not a shipped preset's name
        user_path(preset, "file", "a preset file")
    data: Any = read_preset(preset) if preset else {}
    for part in filter(None, table.split(".")):
        data = data.get(part, {}) if isinstance(data, dict) else {}
    if not isinstance(data, dict):
        raise InputError(f"{preset}: '{table}' is a setting, not a table")
    for item in overrides:
        set_dotted(data, *parse_override(item))
    return data


def settings(config_class: type | Callable[[dict[str, Any], str], type], table: str, preset: str | None,
             overrides: list[str], options: dict[str, Any]) -> Any:
    """A stage's config from the preset's table, `--set key=value` (relative to the table) and options;
    `config_class` may be a function of the settings and the table that picks it (`Stage.config_class_of`)."""
    data = settings_data(preset, overrides, table)
    for path, value in options.items():
        if value is not None:
            set_dotted(data, path, value if isinstance(value, bool) else parse_value(value))
    data = expand(data, table)
    return from_dict(config_class if isinstance(config_class, type) else config_class(data, table), data, table)


def stage_command(app: typer.Typer, command: str, stage_class: type[Stage],
                  show: Callable[[Stage], None], named: bool = False) -> None:
    """Add `command` to `app`: run one stage of a run, with its config's settings as options.

    `named` stages (fusion models) take `--name`, their folder and preset table under the stage's."""
    opts: list[Option] = []
    for config_class in stage_class.config_classes():  # an option of several kinds' configs: the first's
        opts += [o for o in options_of(config_class) if o.path not in {p.path for p in opts}]
    params = [_param("run", Path, typer.Option(..., help="Run directory (every stage's folder lives in it).")),
              *([_param("name", str, typer.Option(..., help="Model name: its folder and preset table."))] if named
                else []),
              _param("preset", Optional[str], typer.Option(None, help="Take the settings of this preset's table "
                                                                       "(demo, study, paper or a .toml file).")),
              _param("set_", list[str], typer.Option([], "--set", help="Override a setting: key.path=value "
                                                                        "(repeatable).")),
              _param("force", bool, typer.Option(False, help="Rebuild even if the output is up to date.")),
              *(_option_param(o) for o in opts)]

    def run(**kw: Any) -> None:
        name = kw.pop("name", None)
        table = f"{stage_class.name}.{name}" if named else stage_class.name
        cfg = settings(stage_class.config_class_of, table, kw.pop("preset"), kw.pop("set_"),
                       {o.path: kw[o.path.replace(".", "__")] for o in opts})
        check_paths(cfg, table)
        stage = stage_class(run_folder(kw["run"]), cfg, folder=table.replace(".", "/") if named else None)
        result = run_stage(stage, force=kw["force"])
        typer.echo(f"{stage.out}: {result.status} ({result.seconds} s)")
        show(stage)

    run.__signature__ = inspect.Signature(params)  # typer reads the options from here
    run.__doc__ = inspect.getdoc(stage_class)
    app.command(command)(run)
