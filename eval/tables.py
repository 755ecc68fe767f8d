"""Reports: metrics.json and a Markdown table, printed to the terminal as well."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .io import METRICS_FILE, REPORT, atomic_file, write_json
from .metrics import METRICS


def markdown_table(rows: dict[str, dict[str, float]], columns: list[str] | None = None,
                   floor: dict[str, float] | None = None) -> str:
    """One row per model (plus the random-ranker floor when given); columns default to every metric."""
    columns = list(METRICS) if columns is None else columns
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in columns) + " |")
    if floor:
        lines.append("| *random* | " + " | ".join(_fmt(floor.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"  # metrics in [0, 1]; seconds, users/s, popularity
    return str(v)


def floor_of(metrics: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("random_"): v for k, v in metrics.items() if k.startswith("random_")}


def print_table(title: str, rows: dict[str, dict[str, float]], columns: list[str] | None = None,
                floor: dict[str, float] | None = None) -> None:
    columns = list(METRICS) if columns is None else columns
    table = Table(title=title)
    table.add_column("model")
    for c in columns:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(name, *(_fmt(m.get(c)) for c in columns))
    if floor:
        table.add_row("random", *(_fmt(floor.get(c)) for c in columns), style="dim")
    Console(width=160).print(table)


def write_metrics_report(out_dir: str | Path, results: dict[str, dict[str, dict[str, float]]],
                         title: str) -> str:
    """results: protocol -> model -> metrics. Writes metrics.json and report.md; returns the Markdown."""
    out_dir = Path(out_dir)
    write_json(out_dir / METRICS_FILE, results)
    parts = [f"# {title}"]
    for protocol, rows in results.items():
        floor = floor_of(next(iter(rows.values())))
        parts += ["", f"## {protocol}", "", markdown_table(rows, floor=floor)]
        print_table(f"{title}: {protocol}", rows, floor=floor)
    md = "\n".join(parts) + "\n"
    with atomic_file(out_dir / REPORT) as f:
        f.write(md)
    return md
