"""`certrotator report`: the fleet certificate report. typer, rich and the pure model load with it; the
registry or boto3 load for the backend named, matplotlib only for --png."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from certrotator.console import fail
from certrotator.ops.options import LocalDataDir, local_data_dir
from certrotator.ops.report.model import Report, build_report
from certrotator.ops.schedule.cli import settings_from_options
from certrotator.ops.schedule.policy import ThingFacts
from certrotator.ops.schedule.settings import DEFAULT_MAX_PER_JOB, Settings

console = Console()

DEFAULT_FRACTION = 2 / 3  # step-ca's default: the policy a report assumes unless told


def report_command(
    data_dir: LocalDataDir = None,
    aws: Annotated[bool, typer.Option("--aws", help="Report on the things in AWS IoT instead.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole report as one JSON object.")
    ] = False,
    png: Annotated[
        Path | None, typer.Option("--png", help="Also write a chart: expiry distribution, rotations per day.")
    ] = None,
    renew_before: Annotated[
        str | None, typer.Option(help="The policy for 'next rotation': renew this long before expiry.")
    ] = None,
    renew_at_fraction: Annotated[
        float | None, typer.Option(help="... or at this fraction of the lifetime (default 2/3, as step-ca).")
    ] = None,
    group: Annotated[str | None, typer.Option(help="Only this thing group's direct members.")] = None,
    limit: Annotated[
        int, typer.Option(help="Rows in the terminal table (soonest expiry first).", min=1)
    ] = 50,
    region: Annotated[str | None, typer.Option(help="AWS region (--aws).")] = None,
    profile: Annotated[str | None, typer.Option(help="Named AWS profile (--aws).")] = None,
) -> None:
    """Per thing: its certificate (id, issuer, key algorithm, not-after, days left), the last rotation and
    its outcome, and the next rotation the renewal policy would schedule; then a histogram of days to
    expiry. --png writes a chart of the expiry distribution and of the rotations per day."""
    if renew_before is None and renew_at_fraction is None:
        renew_at_fraction = DEFAULT_FRACTION
    settings = settings_from_options(renew_before, renew_at_fraction, group, DEFAULT_MAX_PER_JOB, None)
    now = time.time()
    local = local_data_dir(data_dir, aws)
    fleet = _aws_fleet(settings, region, profile) if local is None else _local_fleet(settings, local)
    report = build_report(fleet, now, settings)
    if png is not None:
        _write_png(report, png)
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    else:
        from certrotator.ops.report.render import print_report

        print_report(report, console, limit)
        if png is not None:
            console.print(f"chart written to {png}")


def _write_png(report: Report, path: Path) -> None:
    from certrotator.ops.report.chart import ChartUnavailable, write_png

    try:
        write_png(report, path)
    except ChartUnavailable as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"{path}: {exc}") from None


def _local_fleet(settings: Settings, data_dir: Path) -> list[ThingFacts]:
    from certrotator.local.db import Database
    from certrotator.local.registry import RegistryError
    from certrotator.ops.schedule.local import read_fleet

    if not data_dir.is_dir():
        raise fail(f"{data_dir} is not a local IoT Core data directory")
    db = Database(data_dir)
    try:
        return read_fleet(db, settings.group, details=True)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    finally:
        db.close()


def _aws_fleet(settings: Settings, region: str | None, profile: str | None) -> list[ThingFacts]:
    from botocore.exceptions import BotoCoreError, ClientError

    from certrotator.ops.aws.clients import AwsClients, OperationError, error_message
    from certrotator.ops.schedule.aws import AwsBackend

    try:
        return list(AwsBackend(AwsClients.from_session(region, profile), details=True).fleet(settings.group))
    except (OperationError, BotoCoreError, ClientError) as exc:
        message = error_message(exc)
        if message is None:
            raise
        raise fail(message) from None
