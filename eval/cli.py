"""What every command-line tool of the project shares: bad input is one clear line, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable

import typer
from rich.console import Console

from .errors import InputError

err = Console(stderr=True)


def guarded(app: typer.Typer) -> Callable[[], None]:
    """Entry point that runs a typer app and turns InputError into one line on stderr, exit 1."""
    def main() -> None:
        try:
            app()
        except InputError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            sys.exit(1)
    return main
