"""`certrotator reconcile`: the command. Only typer, rich and the pure policy load with it; the local
registry or boto3 load when the command runs, for the backend it names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from certrotator.console import fail
from certrotator.ops.options import LocalDataDir, local_data_dir
from certrotator.ops.reconcile.policy import DEFAULT_SETTLE_S, Verdict
from certrotator.ops.reconcile.runner import Options, Outcome, needs_operator

console = Console()

DEFAULT_STACK = "AWSLabsCertificateRotator"


def reconcile_command(
    data_dir: LocalDataDir = None,
    aws: Annotated[bool, typer.Option("--aws", help="Reconcile the things in AWS IoT instead.")] = False,
    region: Annotated[str | None, typer.Option(help="AWS region (--aws; default: AWS_REGION).")] = None,
    profile: Annotated[str | None, typer.Option(help="Named AWS profile (--aws).")] = None,
    stack: Annotated[
        str, typer.Option(help="The stack whose outputs name the notification topic and state key (--aws).")
    ] = DEFAULT_STACK,
    topic_arn: Annotated[
        str | None, typer.Option(help="SNS topic for notifications (--aws; default: the stack's).")
    ] = None,
    state_key_secret_arn: Annotated[
        str | None,
        typer.Option(help="Secret with the rotation-state HMAC key (--aws; default: the stack's)."),
    ] = None,
    thing: Annotated[
        list[str] | None, typer.Option("--thing", help="Only this thing (repeatable; default: every thing).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Decide and report only: change nothing, notify nobody.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per thing.")] = False,
    settle_seconds: Annotated[
        float,
        typer.Option(
            min=0,
            help="How long a connection (or announcement) must have lasted to count as evidence: longer "
            "than a device's new credentials stay on trial (two state timeouts).",
        ),
    ] = DEFAULT_SETTLE_S,
    notify: Annotated[bool, typer.Option(help="Notify what was done and what needs an operator.")] = True,
    all_things: Annotated[bool, typer.Option("--all", help="Also list the things that are fine.")] = False,
) -> None:
    """Bring things back to exactly one certificate: find things with zero or several certificates
    attached, or rotation state left behind, while no rotation is in progress for them; retire
    (INACTIVE, detach, delete) the certificates the device is proven not to use, clear leftover
    state, and notify. Without evidence of which certificate a device uses nothing is deleted: the
    thing is reported as needing an operator. Locally the evidence is the running engine's live
    connections (no engine: report only); on AWS, the certificate the device last announced.

    Exit status: 0 when nothing needs an operator, 1 when something does, 2 on a usage or access error.
    """
    options = Options(dry_run=dry_run, settle_s=settle_seconds, notify=notify)
    local = local_data_dir(data_dir, aws)
    if local is None:
        outcomes = _run_aws(options, thing, region, profile, stack, topic_arn, state_key_secret_arn)
    else:
        outcomes = _run_local(options, thing, local)
    shown = outcomes if all_things else [o for o in outcomes if o.decision.verdict is not Verdict.OK]
    if as_json:
        console.print_json(json.dumps([o.to_dict() for o in shown]))
    else:
        _print_table(shown, len(outcomes), dry_run)
    raise typer.Exit(1 if needs_operator(outcomes) else 0)


def _run_local(options: Options, things: list[str] | None, data_dir: Path) -> list[Outcome]:
    from certrotator.local.registry import RegistryError
    from certrotator.ops.reconcile.local import reconcile_data_dir

    if not data_dir.is_dir():
        raise fail(f"{data_dir} is not a local IoT Core data directory")
    try:
        return reconcile_data_dir(data_dir, options, things)
    except (RegistryError, OSError) as exc:
        raise fail(str(exc)) from None


def _run_aws(
    options: Options,
    things: list[str] | None,
    region: str | None,
    profile: str | None,
    stack: str,
    topic_arn: str | None,
    state_key_secret_arn: str | None,
) -> list[Outcome]:
    from botocore.exceptions import BotoCoreError, ClientError

    from certrotator.ops.aws.clients import OperationError, error_message
    from certrotator.ops.reconcile.aws import AwsSettings, connect_backend
    from certrotator.ops.reconcile.runner import reconcile

    try:
        backend = connect_backend(region, profile, AwsSettings(stack, topic_arn, state_key_secret_arn))
        return reconcile(backend, options, things)
    except (OperationError, BotoCoreError, ClientError) as exc:
        message = error_message(exc)
        if message is None:
            raise
        raise fail(message) from None


def _print_table(outcomes: list[Outcome], checked: int, dry_run: bool) -> None:
    table = Table(title=f"Reconcile{' (dry run)' if dry_run else ''}: {checked} things checked")
    for column in ("thing", "finding", "decision", "reason"):
        table.add_column(column, overflow="fold")
    marks = {
        Verdict.OPERATOR: "red",
        Verdict.SKIP: "yellow",
        Verdict.RETIRE: "green",
        Verdict.CLEAR_STATE: "green",
    }
    for o in outcomes:
        d = o.decision
        verdict = d.verdict.value + (" (done)" if o.applied else "")
        color = marks.get(d.verdict)
        reason = d.reason + (f" [{o.note}]" if o.note else "")
        table.add_row(
            d.thing,
            ", ".join(f.value for f in d.findings) or "-",
            f"[{color}]{verdict}[/{color}]" if color else verdict,
            escape(reason),
        )
    console.print(table)
    if needs_operator(outcomes):
        console.print("[red]operator action needed[/red] for the things marked so; see the reasons")
