"""`certrotator schedule`: the command. Only typer, rich and the pure policy load with it; the local
registry or boto3 load when the command runs, for the backend it names."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from certrotator.console import fail
from certrotator.ops.options import LocalDataDir, local_data_dir
from certrotator.ops.schedule.policy import Verdict
from certrotator.ops.schedule.runner import RunResult
from certrotator.ops.schedule.settings import DEFAULT_MAX_PER_JOB, Settings, format_duration, parse_duration

console = Console()

DEFAULT_TEMPLATE = "AWSLabsCertificateRotator"


def settings_from_options(
    renew_before: str | None,
    renew_at_fraction: float | None,
    group: str | None,
    max_per_job: int,
    jitter: str | None,
) -> Settings:
    """The options as Settings; typer.Exit(2) with the reason when they do not make one."""
    try:
        return Settings(
            renew_before_s=parse_duration(renew_before) if renew_before is not None else None,
            renew_at_fraction=renew_at_fraction,
            jitter_s=parse_duration(jitter) if jitter is not None else None,
            max_per_job=max_per_job,
            group=group,
        )
    except ValueError as exc:
        raise fail(f"{exc} (--renew-before 30d or --renew-at-fraction 0.66)") from None


def schedule_command(
    data_dir: LocalDataDir = None,
    aws: Annotated[bool, typer.Option("--aws", help="Schedule the things in AWS IoT instead.")] = False,
    renew_before: Annotated[
        str | None,
        typer.Option(help="Rotate when the certificate expires within this (e.g. 30d, 12h)."),
    ] = None,
    renew_at_fraction: Annotated[
        float | None,
        typer.Option(help="Rotate at this fraction of the certificate's lifetime (e.g. 0.66, as step-ca)."),
    ] = None,
    group: Annotated[str | None, typer.Option(help="Only this thing group's direct members.")] = None,
    max_per_job: Annotated[
        int, typer.Option(help="At most this many things per job.", min=1)
    ] = DEFAULT_MAX_PER_JOB,
    jitter: Annotated[
        str | None,
        typer.Option(help="Spread due times over this span (default: 10% of the window, at most 7d)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Decide and report only: create no job.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: every thing's decision, the jobs.")
    ] = False,
    all_things: Annotated[bool, typer.Option("--all", help="Also list the things that only wait.")] = False,
    region: Annotated[str | None, typer.Option(help="AWS region (--aws; default: AWS_REGION).")] = None,
    profile: Annotated[str | None, typer.Option(help="Named AWS profile (--aws).")] = None,
    template: Annotated[str, typer.Option(help="Job template (--aws).")] = DEFAULT_TEMPLATE,
) -> None:
    """Create rotation jobs for the things whose certificates are due: --renew-before a time before they
    expire, or --renew-at-fraction of their lifetime, each thing a little earlier by a jitter fixed by
    its name. Things with a rotation in progress are skipped, and after a failed rotation a thing waits
    (1 h, doubling, at most 32 h) before the next. Jobs hold at most --max-per-job things, soonest expiry
    first, and are created as `jobs create` (local) or `aws create-job` (--aws) creates them.

    Exit status: 0 when every due thing is in a job, 1 when something needs an operator (blocked
    things, a job not created), 2 on a usage or access error.
    """
    settings = settings_from_options(renew_before, renew_at_fraction, group, max_per_job, jitter)
    local = local_data_dir(data_dir, aws)
    if local is None:
        result, note = _run_aws(settings, dry_run, region, profile, template), ""
    else:
        result, note = _run_local(settings, dry_run, local)
    if as_json:
        body = {
            "settings": settings.describe(),
            **result.summary(),
            "decisions": [d.to_dict() for d in result.decisions],
        }
        console.print_json(json.dumps(body))
    else:
        _print(result, settings, all_things)
        if note:
            console.print(note)
    raise typer.Exit(1 if result.needs_attention else 0)


def _run_local(settings: Settings, dry_run: bool, data_dir: Path) -> tuple[RunResult, str]:
    from certrotator.local.jobs import JobError
    from certrotator.local.registry import RegistryError
    from certrotator.ops.schedule.local import schedule_data_dir

    if not data_dir.is_dir():
        raise fail(f"{data_dir} is not a local IoT Core data directory")
    try:
        result, running = schedule_data_dir(data_dir, settings, dry_run=dry_run)
    except (RegistryError, JobError, OSError) as exc:
        raise fail(str(exc)) from None
    note = ""
    if result.created and not running:
        note = "[yellow]no engine running: the jobs roll out when `certrotator local up` starts[/yellow]"
    return result, note


def _run_aws(
    settings: Settings, dry_run: bool, region: str | None, profile: str | None, template: str
) -> RunResult:
    from botocore.exceptions import BotoCoreError, ClientError

    from certrotator.ops.aws.clients import AwsClients, OperationError, error_message
    from certrotator.ops.schedule.aws import AwsBackend
    from certrotator.ops.schedule.runner import run

    try:
        backend = AwsBackend(AwsClients.from_session(region, profile), template=template)
        return run(backend, settings, time.time(), dry_run=dry_run)
    except (OperationError, BotoCoreError, ClientError) as exc:
        message = error_message(exc)
        if message is None:
            raise
        raise fail(message) from None


_COLORS = {
    Verdict.ROTATE: "green",
    Verdict.BLOCKED: "red",
    Verdict.BACKOFF: "yellow",
    Verdict.IN_PROGRESS: "cyan",
}


def _print(result: RunResult, settings: Settings, all_things: bool) -> None:
    shown = [
        d for d in result.decisions if all_things or d.verdict not in (Verdict.WAIT, Verdict.OUT_OF_SCOPE)
    ]
    title = f"Schedule ({settings.describe()}){' — dry run' if result.dry_run else ''}"
    table = Table(title=title)
    for column in ("thing", "decision", "job", "reason"):
        table.add_column(column, overflow="fold")
    for d in shown:
        color = _COLORS.get(d.verdict)
        verdict = f"[{color}]{d.verdict.value}[/{color}]" if color else d.verdict.value
        table.add_row(d.thing, verdict, d.job_id or "-", escape(d.reason))
    console.print(table)
    counts = ", ".join(f"{v.value} {result.count(v)}" for v in Verdict if result.count(v))
    console.print(f"{len(result.decisions)} things: {counts or 'none'}")
    waiting = [d.next_at for d in result.decisions if d.verdict is Verdict.WAIT and d.next_at is not None]
    if waiting:
        console.print(f"next due in {format_duration(min(waiting) - time.time())}")
    for job_id in result.created:
        console.print(f"created job [bold]{job_id}[/bold]")
    for job_id, why in result.failed.items():
        console.print(f"[red]job {job_id} not created:[/red] {escape(why)}")
    if result.dry_run and result.jobs:
        console.print(f"dry run: {len(result.jobs)} job(s) would be created")
