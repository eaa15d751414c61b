"""`certrotator jobs create|cancel|describe`: rotation jobs on the local IoT Core."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn

from certrotator.console import fail
from certrotator.local import operations
from certrotator.local.jobs import DEFAULT_TEMPLATE, JobError, JobStore
from certrotator.local.registry import RegistryError
from certrotator.local_cli.common import (
    DEFAULT_DATA_DIR,
    DataDir,
    JsonFlag,
    admin_call,
    console,
    emit,
    iso,
    jobs_app,
    open_stores,
)
from certrotator.protocol import (
    ACTIVE_EXECUTION_STATUSES,
    FAILURE_REASON_KEY,
    PENDING_ROLLOUT,
    UNSUCCESSFUL_EXECUTION_STATUSES,
    JobStatus,
)

# ---------------------------------------------------------------------------------------------- jobs


@jobs_app.command("create")
def jobs_create(
    thing: Annotated[list[str] | None, typer.Option("--thing", help="Target thing (repeatable).")] = None,
    group: Annotated[
        list[str] | None, typer.Option("--group", help="Target thing group (repeatable).")
    ] = None,
    job_id: Annotated[str | None, typer.Option(help="Job id (default: rotate-<timestamp>).")] = None,
    template: Annotated[str, typer.Option(help="Job template.")] = DEFAULT_TEMPLATE,
    max_per_minute: Annotated[int | None, typer.Option(help="Flat rollout rate (1-1000/min).")] = None,
    in_progress_timeout_minutes: Annotated[float | None, typer.Option(help="In-progress timeout.")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create a rotation job from the template for things and/or thing groups."""
    things_, groups_ = thing or [], group or []
    if not things_ and not groups_:
        raise fail("give at least one --thing or --group")
    request = operations.JobRequest(
        job_id or f"rotate-{int(time.time())}",
        tuple(things_),
        tuple(groups_),
        template,
        max_per_minute,
        in_progress_timeout_minutes,
    )
    if not admin_call(data_dir, "create_job", **request.to_json()):
        registry, store = open_stores(data_dir)
        try:
            operations.create_job(registry, store, request)
        except (JobError, RegistryError) as exc:
            raise fail(str(exc)) from None
        console.print(
            "[yellow]no engine running: the job rolls out when `certrotator local up` starts[/yellow]"
        )
    console.print(f"created job [bold]{request.job_id}[/bold]")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str,
    force: Annotated[bool, typer.Option(help="Also cancel IN_PROGRESS.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Cancel a job (QUEUED executions; IN_PROGRESS ones too with --force)."""
    if not admin_call(data_dir, "cancel_job", job_id=job_id, force=force):
        raise fail("cancelling needs the running engine (it notifies devices); start `certrotator local up`")
    console.print(f"canceled job {job_id}")


def _describe(store: JobStore, job_id: str) -> dict[str, Any]:
    job = store.job(job_id)
    if job is None:
        raise fail(f"job {job_id!r} does not exist")
    executions = store.executions(job_id)
    failures = [
        {
            "thing": e.thing,
            "status": e.status.value,
            "reason": e.status_details.get(FAILURE_REASON_KEY, ""),
        }
        for e in executions
        if e.status in UNSUCCESSFUL_EXECUTION_STATUSES
    ]
    status_of = {e.thing: e.status.value for e in executions}
    # A device update the Jobs API refused leaves the execution where it was (often QUEUED): say why.
    rejections = [
        {
            "thing": r.thing,
            "status": status_of.get(r.thing, ""),
            "requestedStatus": r.requested_status,
            "code": r.code,
            "reason": r.message,
            "rejectedAt": iso(r.at),
        }
        for r in store.rejections(job_id)
    ]
    return {
        "jobId": job_id,
        "status": job["status"],
        "targets": job["targets"],
        "config": asdict(job["config"]),
        "executions": store.status_counts(job_id),
        "failures": failures,
        "rejections": rejections,
    }


def _print_problems(info: dict[str, Any]) -> None:
    if info["failures"]:
        emit(info["failures"], False, "Failures")
    if info["rejections"]:
        rows = [
            {
                "thing": r["thing"],
                "status": r["status"],
                "requested": r["requestedStatus"],
                "code": r["code"],
                "reason": r["reason"],
                "time (UTC)": r["rejectedAt"].replace("T", " ").rstrip("Z"),
            }
            for r in info["rejections"]
        ]
        emit(rows, False, "Rejected device updates (the last one of each execution)")


@jobs_app.command("describe")
def jobs_describe(
    job_id: str,
    watch: Annotated[bool, typer.Option(help="Follow until the job completes.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    as_json: JsonFlag = False,
) -> None:
    """Show a job's execution status counts and failure reasons (--watch: a live progress bar)."""
    _, store = open_stores(data_dir)
    if not watch:
        info = _describe(store, job_id)
        if as_json:
            console.print_json(json.dumps(info))
            return
        console.print(f"job [bold]{job_id}[/bold]: {info['status']}  {json.dumps(info['executions'])}")
        _print_problems(info)
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[counts]}"),
    )
    with Live(progress, console=console, refresh_per_second=4):
        task = progress.add_task(job_id, total=1, counts="")
        while True:
            info = _describe(store, job_id)
            counts: dict[str, int] = info["executions"]
            total = sum(counts.values())
            done = sum(n for s, n in counts.items() if s not in {*ACTIVE_EXECUTION_STATUSES, PENDING_ROLLOUT})
            progress.update(task, total=max(total, 1), completed=done, counts=json.dumps(counts))
            if info["status"] != JobStatus.IN_PROGRESS:
                break
            time.sleep(0.5)  # a human watching; refresh twice a second
    _print_problems(info)
