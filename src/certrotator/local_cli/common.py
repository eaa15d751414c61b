"""Shared pieces of the `certrotator local` and `certrotator jobs` commands: the Typer apps, the console,
options and small helpers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from certrotator.compat import UTC
from certrotator.console import fail
from certrotator.local import admin
from certrotator.local.db import Database
from certrotator.local.jobs import JobStore
from certrotator.local.registry import LocalRegistry

local_app = typer.Typer(help="Run and administer the embedded local IoT Core.", no_args_is_help=True)
certificate_app = typer.Typer(help="Certificates in the local registry.", no_args_is_help=True)
rule_app = typer.Typer(help="Enable or disable the rotation rules.", no_args_is_help=True)
jobs_app = typer.Typer(help="Rotation jobs on the local IoT Core.", no_args_is_help=True)
local_app.add_typer(certificate_app, name="certificate")
local_app.add_typer(rule_app, name="rule")

# soft_wrap: a message is never broken mid-line where the output is not a terminal (a pipe, a log, a
# test) and is left to the terminal to wrap where it is; tables still fit the width.
console = Console(soft_wrap=True)

DataDir = Annotated[Path, typer.Option("--data-dir", help="The engine's data directory.")]
DEFAULT_DATA_DIR = Path(".certrotator")
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]


def open_stores(data_dir: Path) -> tuple[LocalRegistry, JobStore]:
    db = Database(data_dir)
    store = JobStore(db)
    store.ensure_default_template()  # jobs can be created before the engine ever ran here
    return LocalRegistry(db), store


def admin_call(data_dir: Path, op: str, **args: Any) -> bool:
    try:
        live, _ = admin.call(data_dir, op, **args)
    except admin.AdminError as exc:
        raise fail(str(exc)) from None
    return live


def iso(ts: float) -> str:
    """A time for machines: ISO 8601 in UTC, to the second."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def emit(rows: list[dict[str, Any]], as_json: bool, title: str, columns: Sequence[str] | None = None) -> None:
    """Rows as JSON, or as a table titled `title` with `columns` (default: the first row's keys); an
    empty table keeps its title and headings and says "none"."""
    if as_json:
        console.print_json(json.dumps(rows))
        return
    names = list(columns) if columns is not None else list(rows[0]) if rows else []
    table = Table(title=title, caption=None if rows else "none")
    for column in names or ["-"]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in names))
    print_table(table)


def print_table(table: Table) -> None:
    """A terminal gets the table fitted to its width; anything else gets it as wide as its content,
    cells unbroken (an 80-column default would fold ids, codes and reasons mid-word)."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update_width(100_000), table).maximum
    # print(width=...) cannot go beyond the console's own width: a console of the table's width.
    Console(file=console.file, width=max(console.width, natural)).print(table)
