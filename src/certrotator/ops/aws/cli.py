"""`certrotator aws ...`: operate a fleet on AWS IoT with the stack in infra/ deployed.

Credentials and region come from boto3's usual chain (environment, profile, SSO, instance role), or
--profile and --region. boto3 is imported only when a command runs (the logic lives in
aws_operations, aws_greengrass and aws_checks), so `certrotator --help` and the device agent never
load it. Errors an operator can fix print one line and exit 2."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from certrotator.console import err, fail
from certrotator.protocol import JobExecutionStatus

if TYPE_CHECKING:
    from certrotator.ops.aws.clients import AwsClients
    from certrotator.ops.aws.jobs import JobReport

aws_app = typer.Typer(
    help="Operate a fleet on AWS IoT: rotation jobs, the Greengrass component, readiness checks.",
    no_args_is_help=True,
)
component_app = typer.Typer(help="The Greengrass component in AWS.", no_args_is_help=True)
aws_app.add_typer(component_app, name="component")

console = Console()

# Kept in step with the defaults in aws_operations / aws_greengrass / aws_checks (not imported: boto3).
DEFAULT_TEMPLATE = "AWSLabsCertificateRotator"
DEFAULT_STACK = "AWSLabsCertificateRotator"
DEFAULT_COMPONENT = "aws.greengrass.labs.CertificateRotator"

Region = Annotated[
    str | None, typer.Option("--region", help="AWS region (default: AWS_REGION or the profile's).")
]
Profile = Annotated[str | None, typer.Option("--profile", help="Named AWS profile (default: AWS_PROFILE).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]

# How --watch waits and tells time (tests replace these).
poll_sleep = time.sleep
poll_clock = time.monotonic

STATUS_MARKS = {"pass": "[green]✓[/green]", "fail": "[red]✗[/red]", "warn": "[yellow]![/yellow]", "skip": "–"}


def connect(region: str | None, profile: str | None) -> AwsClients:
    """The clients every command uses (tests replace this function)."""
    from certrotator.ops.aws.clients import AwsClients

    return AwsClients.from_session(region, profile)


@contextmanager
def _aws_errors() -> Iterator[None]:
    """Operator-fixable errors (credentials, region, permissions, missing resources) as one line."""
    from botocore.exceptions import BotoCoreError, ClientError

    from certrotator.ops.aws.clients import OperationError, error_message

    try:
        yield
    except (OperationError, BotoCoreError, ClientError) as exc:
        message = error_message(exc)
        if message is None:
            raise
        raise fail(message) from None


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


# ------------------------------------------------------------------------------------------------ jobs


@aws_app.command("create-job")
def create_job(
    thing: Annotated[list[str] | None, typer.Option("--thing", help="Target thing (repeatable).")] = None,
    group: Annotated[
        list[str] | None, typer.Option("--group", help="Target thing group (repeatable).")
    ] = None,
    job_id: Annotated[str | None, typer.Option(help="Job id (default: rotate-<unix time>).")] = None,
    template: Annotated[str, typer.Option(help="Job template id.")] = DEFAULT_TEMPLATE,
    max_per_minute: Annotated[
        int | None, typer.Option(help="Rollout: at most this many notifications a minute (1-1000).")
    ] = None,
    base_rate: Annotated[
        int | None, typer.Option(help="Exponential rollout: starting rate a minute (1-1000).")
    ] = None,
    increment_factor: Annotated[
        float | None, typer.Option(help="Exponential rollout: rate multiplier (1.1-5, one decimal).")
    ] = None,
    succeeded_per_increase: Annotated[
        int | None, typer.Option(help="Exponential rollout: successes between increases.")
    ] = None,
    in_progress_timeout_minutes: Annotated[
        int | None, typer.Option(help="Time a device has to finish once IN_PROGRESS (1-10080).")
    ] = None,
    retry_failed: Annotated[int | None, typer.Option(help="Retries of FAILED executions (0-10).")] = None,
    retry_timed_out: Annotated[
        int | None, typer.Option(help="Retries of TIMED_OUT executions (0-10).")
    ] = None,
    abort_failure_percent: Annotated[
        float | None, typer.Option(help="Cancel the job once this % of executions failed (0-100].")
    ] = None,
    abort_min_executed: Annotated[
        int | None, typer.Option(help="...but only after this many executions finished (>= 1).")
    ] = None,
    region: Region = None,
    profile: Profile = None,
) -> None:
    """Create a rotation job from the template for things and/or thing groups, with optional overrides."""
    from certrotator.ops.aws.job_overrides import JobOverrides
    from certrotator.ops.aws.jobs import create_job as create

    overrides = JobOverrides(
        max_per_minute=max_per_minute,
        base_rate=base_rate,
        increment_factor=increment_factor,
        succeeded_per_increase=succeeded_per_increase,
        in_progress_timeout_minutes=in_progress_timeout_minutes,
        retry_failed=retry_failed,
        retry_timed_out=retry_timed_out,
        abort_failure_percent=abort_failure_percent,
        abort_min_executed=abort_min_executed,
    )
    with _aws_errors():
        overrides.to_api()  # range errors before credentials are even looked at
        created = create(
            connect(region, profile),
            things=thing or [],
            groups=group or [],
            job_id=job_id,
            template=template,
            overrides=overrides,
        )
    console.print(f"created job [bold]{created.job_id}[/bold] from {created.template_arn}", soft_wrap=True)
    console.print(f"  {created.job_arn}, {len(created.targets)} target(s)", soft_wrap=True)
    console.print(f"  follow it: certrotator aws describe-job {created.job_id} --watch", soft_wrap=True)


def _print_report(report: JobReport) -> None:
    counts = {status: n for status, n in report.counts.items() if n}
    console.print(f"job [bold]{report.job_id}[/bold]: {report.status}  {json.dumps(counts)}")
    if report.comment:
        console.print(f"  comment: {escape(report.comment)}")
    if report.failures:
        rows = [[f.thing, f.status, f.reason or "-"] for f in report.failures]
        console.print(_table("Failures", ["thing", "status", "reason"], rows))
    if report.failures_truncated:
        console.print(f"  (only the first {len(report.failures)} failures are shown: --max-failures)")


@aws_app.command("describe-job")
def describe_job(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    watch: Annotated[bool, typer.Option(help="Follow with a progress bar until the job completes.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between polls when watching.", min=1.0)] = 5.0,
    timeout: Annotated[float, typer.Option(help="Stop watching after this many seconds.", min=1.0)] = 3600.0,
    max_failures: Annotated[
        int, typer.Option(help="Failed executions to look up (one API call each).", min=0)
    ] = 50,
    as_json: JsonFlag = False,
    region: Region = None,
    profile: Profile = None,
) -> None:
    """Show a job's execution counts and the devices' failure reasons (--watch: a live progress bar)."""
    from certrotator.ops.aws import jobs as ops

    with _aws_errors():
        clients = connect(region, profile)
        if watch:
            # with --json, stdout carries only the JSON: the progress goes to stderr
            last = _watch(clients, job_id, interval, timeout, err if as_json else console)
            if not last.finished:
                err.print(f"job {job_id} is still {last.status} after {timeout:g} s (it carries on in AWS)")
                raise typer.Exit(1)
        report = ops.describe_job(clients, job_id, max_failures)
    if as_json:
        console.print_json(json.dumps(report.to_json()))
    else:
        _print_report(report)


def _watch(clients: AwsClients, job_id: str, interval: float, timeout: float, out: Console) -> JobReport:
    from certrotator.ops.aws.jobs import watch_job

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=out,
    )
    last = None
    with Live(progress, console=out, refresh_per_second=4):
        task = progress.add_task(job_id, total=1, counts="")
        for report in watch_job(
            clients, job_id, interval=interval, timeout=timeout, sleep=poll_sleep, clock=poll_clock
        ):
            counts = {status: n for status, n in report.counts.items() if n}
            progress.update(
                task,
                total=max(report.total, 1),
                completed=report.done,
                counts=f"{report.status} {json.dumps(counts)}",
            )
            last = report
    if not out.is_terminal:
        out.line()  # a terminal's Live ends its line itself; a pipe's does not
    assert last is not None  # watch_job yields at least once
    return last


@aws_app.command("cancel-job")
def cancel_job(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    force: Annotated[
        bool, typer.Option(help="Also cancel IN_PROGRESS executions (those devices roll back).")
    ] = False,
    comment: Annotated[str | None, typer.Option(help="Why (kept with the job).")] = None,
    region: Region = None,
    profile: Profile = None,
) -> None:
    """Cancel a rotation job: QUEUED executions are canceled, IN_PROGRESS ones too with --force."""
    from certrotator.ops.aws.jobs import cancel_job as cancel

    with _aws_errors():
        report = cancel(connect(region, profile), job_id, force=force, comment=comment)
    console.print(f"job [bold]{job_id}[/bold] is {report.status}")
    in_progress = report.counts.get(JobExecutionStatus.IN_PROGRESS, 0)
    if in_progress and not force:
        console.print(
            f"  {in_progress} execution(s) still IN_PROGRESS finish on their own (--force cancels them)"
        )


# ------------------------------------------------------------------------------------------ greengrass


@aws_app.command("deploy-component")
def deploy_component(
    version: Annotated[str, typer.Argument(help="Component version, e.g. 1.2.0.")],
    thing_group: Annotated[str, typer.Argument(help="Thing group of Greengrass core devices.")],
    component: Annotated[str, typer.Option(help="Component name.")] = DEFAULT_COMPONENT,
    region: Region = None,
    profile: Profile = None,
) -> None:
    """Deploy a component version to a thing group, keeping every other component of its latest deployment."""
    from certrotator.ops.aws.greengrass import deploy_component as deploy

    with _aws_errors():
        result = deploy(connect(region, profile), version, thing_group, component)
    change = f"{result.previous_version} → {version}" if result.previous_version else f"added at {version}"
    console.print(f"deployment {result.deployment_id}")
    console.print(f"  {result.deployment_name!r} to {result.group_arn}: {component} {change}", soft_wrap=True)
    if result.kept:
        console.print(f"  kept: {', '.join(result.kept)}", soft_wrap=True)


@component_app.command("publish")
def publish(
    build_dir: Annotated[Path, typer.Option(help="Output of `certrotator component build`.")] = Path(
        "greengrass-build"
    ),
    bucket: Annotated[
        str | None,
        typer.Option(help="S3 bucket for the artifact when the recipe leaves {BUCKET_NAME} (must exist)."),
    ] = None,
    region: Region = None,
    profile: Profile = None,
) -> None:
    """Upload the built artifact to S3 where its recipe says, then create the component version."""
    from certrotator.ops.aws.greengrass import publish_component

    with _aws_errors():
        result = publish_component(connect(region, profile), build_dir, bucket)
    for uri in result.uploaded:
        console.print(f"uploaded {uri}", soft_wrap=True)
    console.print(f"component {result.name} {result.version}: {result.state}")
    console.print(f"  {result.arn}", soft_wrap=True)


# ------------------------------------------------------------------------------------------------ check


@aws_app.command()
def check(
    stack: Annotated[str, typer.Option(help="CloudFormation stack of the backend.")] = DEFAULT_STACK,
    thing_group: Annotated[
        str | None, typer.Option(help="Also check this group's core devices and deployment.")
    ] = None,
    max_devices: Annotated[int, typer.Option(help="Core devices to inspect at most.", min=1)] = 50,
    as_json: JsonFlag = False,
    region: Region = None,
    profile: Profile = None,
) -> None:
    """Check the account is ready to rotate; exits 1 and says what to fix if not."""
    from certrotator.ops.aws.checks import run_checks
    from certrotator.ops.aws.checks_model import failed

    with _aws_errors():
        checks = run_checks(connect(region, profile), stack, thing_group, max_devices)
    if as_json:
        console.print_json(json.dumps([c.to_json() for c in checks]))
    else:
        rows = [[STATUS_MARKS[c.status.value], escape(c.name), escape(c.detail)] for c in checks]
        console.print(_table("Readiness", ["", "check", "detail"], rows))
        # Fixes on their own lines, unwrapped, so the commands in them can be copied.
        fixes = [c for c in checks if c.fix and c.status.value in ("fail", "warn")]
        if fixes:
            console.print("To fix:")
        for c in fixes:
            console.print(
                f"  {STATUS_MARKS[c.status.value]} {escape(c.name)}: {escape(c.fix)}", soft_wrap=True
            )
    if failed(checks):
        raise typer.Exit(1)
