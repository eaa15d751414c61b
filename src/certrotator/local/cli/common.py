"""Shared pieces of the `certrotator local` and `certrotator jobs` commands: the Typer apps, the console,
options and small helpers."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from certrotator.compat import UTC
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

console = Console()
err = Console(stderr=True)

DataDir = Annotated[Path, typer.Option("--data-dir", help="The engine's data directory.")]
DEFAULT_DATA_DIR = Path(".certrotator")
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]


def fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(2)


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


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def emit(rows: list[dict[str, Any]], as_json: bool, title: str) -> None:
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=title)
    for column in rows[0].keys() if rows else ["(none)"]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
