"""`certrotator local ...` and `certrotator jobs ...`: run and administer the local IoT Core.

Read-only commands read the SQLite registry directly (safe beside a running engine: WAL). Commands
that change live state go through the running engine's admin endpoint, or straight to the database
when no engine runs (the engine catches up when it starts)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from certrotator import crypto
from certrotator.backend.ports import CertificateStatus
from certrotator.local import admin, operations
from certrotator.local.ca import IssuerName, ensure_local_ca
from certrotator.local.db import Database
from certrotator.local.jobs import DEFAULT_MAX_IN_FLIGHT, DEFAULT_TEMPLATE, JobError, JobStore
from certrotator.local.provision import provision_thing
from certrotator.local.registry import RULES, LocalRegistry, RegistryError
from certrotator.protocol import (
    ACTIVE_EXECUTION_STATUSES,
    FAILURE_REASON_KEY,
    PENDING_ROLLOUT,
    UNSUCCESSFUL_EXECUTION_STATUSES,
    JobStatus,
)

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


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(2)


def _open(data_dir: Path) -> tuple[LocalRegistry, JobStore]:
    db = Database(data_dir)
    store = JobStore(db)
    store.ensure_default_template()  # jobs can be created before the engine ever ran here
    return LocalRegistry(db), store


def _admin(data_dir: Path, op: str, **args: Any) -> bool:
    try:
        live, _ = admin.call(data_dir, op, **args)
    except admin.AdminError as exc:
        raise _fail(str(exc)) from None
    return live


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _emit(rows: list[dict[str, Any]], as_json: bool, title: str) -> None:
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=title)
    for column in rows[0].keys() if rows else ["(none)"]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)


# -------------------------------------------------------------------------------------------- engine


@local_app.command()
def up(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Annotated[str, typer.Option(help="Listen address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="MQTT over TLS port; 0 = any free port.")] = 8883,
    issuer: Annotated[
        IssuerName, typer.Option(help="Which CA issues rotated certificates.")
    ] = IssuerName.IOT,
    ca_signing_algorithm: Annotated[
        str, typer.Option(help="Private CA signing algorithm.")
    ] = "SHA256WITHECDSA",
    ca_validity_days: Annotated[int, typer.Option(help="Private CA certificate validity.")] = 365,
    webhook_url: Annotated[str | None, typer.Option(help="POST notifications here as JSON.")] = None,
    max_in_flight: Annotated[
        int,
        typer.Option(
            help="Job executions in flight at once, engine-wide, whatever the rollout rate "
            "(0 = no limit, as AWS IoT Jobs).",
            min=0,
        ),
    ] = DEFAULT_MAX_IN_FLIGHT,
    reconcile_every: Annotated[
        float | None,
        typer.Option(
            help="Also run `certrotator reconcile` inside the engine every this many seconds "
            "(off by default; it acts only on settled evidence, see docs/reliability.md).",
            min=0.001,
        ),
    ] = None,
) -> None:
    """Run the local IoT Core in the foreground (Ctrl-C stops it cleanly)."""
    from certrotator.local.engine import EngineConfig, LocalIoTCore, serve  # the broker only here

    try:
        config = EngineConfig(
            data_dir,
            host,
            port,
            issuer,
            crypto.parse_ca_signing_algorithm(ca_signing_algorithm),
            ca_validity_days,
            webhook_url,
            max_in_flight or None,
        )
    except crypto.CryptoError as exc:
        raise _fail(str(exc)) from None
    if admin.running_engine(data_dir) is not None:
        raise _fail(f"an engine is already running on {data_dir}")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(engine: LocalIoTCore) -> None:
            if reconcile_every is not None:
                # ops/ builds on local/, not the other way: the engine is handed the task to run.
                from certrotator.ops.reconcile.local import EngineReconciler

                engine.add_periodic("reconcile", reconcile_every, EngineReconciler(engine).run)
            console.print(
                f"local IoT Core on [bold]{host}:{engine.port}[/bold] — data in {data_dir} — Ctrl-C stops"
            )

        await serve(config, stop, ready)

    try:
        asyncio.run(main())
    except (crypto.CryptoError, OSError) as exc:
        raise _fail(str(exc)) from None
    console.print("stopped")


@local_app.command()
def provision(
    thing: Annotated[str, typer.Argument(help="Thing name (also the MQTT client id).")],
    out: Annotated[Path, typer.Option("--out", help="Credentials directory to write.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    group: Annotated[str | None, typer.Option(help="Add the thing to this thing group.")] = None,
    key_algorithm: Annotated[str, typer.Option(help="Key algorithm of the first key.")] = "ECDSA-P256",
    signing_algorithm: Annotated[
        str | None, typer.Option(help="CSR signing algorithm for rotations.")
    ] = None,
    issuer: Annotated[IssuerName, typer.Option(help="Issuer of the first certificate.")] = IssuerName.IOT,
    port: Annotated[
        int | None,
        typer.Option(help="Broker port for device.toml (default: the running engine's, else 8883)."),
    ] = None,
) -> None:
    """Create a thing with a certificate and write device.pem.crt, private.pem.key, AmazonRootCA1.pem, device.toml."""
    try:
        keys = crypto.parse_key_algorithm(key_algorithm)
        signing = crypto.parse_signing_algorithm(signing_algorithm) if signing_algorithm else None
        running = admin.running_engine(data_dir)
        mqtt_port = port or (int(running["mqtt_port"]) if running else 8883)
        host = str(running["host"]) if running else "127.0.0.1"
        registry, _ = _open(data_dir)
        result = provision_thing(
            registry,
            ensure_local_ca(data_dir),
            thing,
            out,
            group=group,
            key_algorithm=keys,
            signing_algorithm=signing,
            issuer=issuer,
            host=host,
            port=mqtt_port,
        )
    except (crypto.CryptoError, RegistryError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"provisioned [bold]{thing}[/bold] (certificate {result.certificate_id}) in {out}")


@certificate_app.command("set-status")
def set_status(
    certificate_id: Annotated[str, typer.Argument(help="Certificate id (64 hex).")],
    status: Annotated[str, typer.Argument(help="ACTIVE, INACTIVE or REVOKED.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Change a certificate's status; leaving ACTIVE disconnects its live connections."""
    if status not in ("ACTIVE", "INACTIVE", "REVOKED"):
        raise _fail(f"status must be ACTIVE, INACTIVE or REVOKED, not {status!r}")
    if not _admin(data_dir, "set_certificate_status", certificate_id=certificate_id, status=status):
        try:
            _open(data_dir)[0].set_certificate_status(certificate_id, CertificateStatus(status))
        except RegistryError as exc:
            raise _fail(str(exc)) from None
    console.print(f"certificate {certificate_id} is {status}")


@certificate_app.command("detach")
def certificate_detach(
    certificate_id: Annotated[str, typer.Argument(help="Certificate id (64 hex).")],
    thing: Annotated[str, typer.Option("--thing", help="The thing it is attached to.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """End a certificate's exclusive attachment to a thing (status and policies stay; new connections
    with it are refused, live ones are not cut). For what `reconcile` leaves to an operator."""
    from certrotator.ops.reconcile.local import detach_certificate

    try:
        console.print(detach_certificate(data_dir, thing, certificate_id))
    except (ValueError, RegistryError) as exc:
        raise _fail(str(exc)) from None


@certificate_app.command("delete")
def certificate_delete(
    certificate_id: Annotated[str, typer.Argument(help="Certificate id (64 hex).")],
    force: Annotated[
        bool,
        typer.Option(help="Delete even an ACTIVE attached certificate, or one a device is connected with."),
    ] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Retire a certificate as the backend does: INACTIVE (its connections are cut), detached from its
    thing and policies, deleted. An ACTIVE certificate still attached may be the device's only working
    one: refused unless --force (detach it or set it INACTIVE first)."""
    from certrotator.ops.reconcile.local import delete_certificate

    if not force:
        registry, _ = _open(data_dir)
        cert = registry.certificate(certificate_id)
        registry.db.close()
        if cert is not None and cert.status is CertificateStatus.ACTIVE and cert.thing is not None:
            raise _fail(
                f"certificate {certificate_id} is ACTIVE and attached to {cert.thing!r}: it may be the only "
                "one the device can connect with. Detach it (`certrotator local certificate detach "
                f"{certificate_id} --thing {cert.thing}`) or set it INACTIVE first, or add --force"
            )
    try:
        console.print(delete_certificate(data_dir, certificate_id, force))
    except (ValueError, RegistryError, admin.AdminError) as exc:
        raise _fail(str(exc)) from None


def _set_rule(name: str, enabled: bool, data_dir: Path) -> None:
    if name not in RULES:
        raise _fail(f"unknown rule {name!r}; rules: {', '.join(RULES)}")
    if not _admin(data_dir, "set_rule", name=name, enabled=enabled):
        _open(data_dir)[0].set_rule_enabled(name, enabled)
    console.print(f"rule {name} {'enabled' if enabled else 'disabled'}")


@rule_app.command("enable")
def rule_enable(
    name: Annotated[str, typer.Argument(help="create, commit or terminal")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Enable a rule."""
    _set_rule(name, True, data_dir)


@rule_app.command("disable")
def rule_disable(
    name: Annotated[str, typer.Argument(help="create, commit or terminal")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Disable a rule: its messages are dropped, like a disabled IoT rule."""
    _set_rule(name, False, data_dir)


# ------------------------------------------------------------------------------------------ listings


@local_app.command()
def things(data_dir: DataDir = DEFAULT_DATA_DIR, as_json: JsonFlag = False) -> None:
    """Things with their groups and certificates."""
    registry, _ = _open(data_dir)
    rows = [
        {
            "thing": t,
            "groups": ",".join(registry.groups_of(t)),
            "certificates": ",".join(c[:12] for c in registry.thing_principals(t)),
        }
        for t in registry.things()
    ]
    _emit(rows, as_json, "Things")


@local_app.command()
def certificates(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    as_json: JsonFlag = False,
    expiring_within_days: Annotated[
        float | None,
        typer.Option(help="Only ACTIVE certificates attached to a thing that expire within this many days."),
    ] = None,
) -> None:
    """Certificates with status, issuer, validity and thing (an expiry report with --expiring-within-days;
    feed its things to `jobs create --thing`)."""
    registry, _ = _open(data_dir)
    listed = registry.certificates()
    if expiring_within_days is not None:
        horizon = time.time() + expiring_within_days * 86400
        listed = [
            c
            for c in listed
            if c.status is CertificateStatus.ACTIVE and c.thing is not None and c.not_after <= horizon
        ]
    rows = [
        {
            "certificateId": c.certificate_id,
            "status": c.status.value,
            "issuer": c.issuer,
            "notAfter": _when(c.not_after),
            "daysLeft": round((c.not_after - time.time()) / 86400, 1),
            "thing": c.thing or "-",
        }
        for c in sorted(listed, key=lambda c: c.not_after)
    ]
    _emit(rows, as_json, "Certificates")


@local_app.command("jobs")
def list_jobs(data_dir: DataDir = DEFAULT_DATA_DIR, as_json: JsonFlag = False) -> None:
    """Jobs with their execution status counts."""
    _, store = _open(data_dir)
    rows = [
        {
            "jobId": j["jobId"],
            "status": j["status"],
            "created": _when(j["created"]),
            "executions": json.dumps(store.status_counts(j["jobId"])),
        }
        for j in store.jobs()
    ]
    _emit(rows, as_json, "Jobs")


@local_app.command()
def notifications(data_dir: DataDir = DEFAULT_DATA_DIR, as_json: JsonFlag = False) -> None:
    """Notifications of failed, timed-out or contradictory rotations."""
    registry, _ = _open(data_dir)
    rows = [
        {
            "time": _when(n.get("created")),
            "thing": n.get("thingName"),
            "job": n.get("jobId"),
            "status": n.get("status"),
            "outcome": n.get("outcome"),
            "action": n.get("operatorAction"),
        }
        for n in registry.notifications()
    ]
    if as_json:
        console.print_json(json.dumps(registry.notifications()))
        return
    _emit(rows, False, "Notifications")


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
        raise _fail("give at least one --thing or --group")
    request = operations.JobRequest(
        job_id or f"rotate-{int(time.time())}",
        tuple(things_),
        tuple(groups_),
        template,
        max_per_minute,
        in_progress_timeout_minutes,
    )
    if not _admin(data_dir, "create_job", **request.to_json()):
        registry, store = _open(data_dir)
        try:
            operations.create_job(registry, store, request)
        except (JobError, RegistryError) as exc:
            raise _fail(str(exc)) from None
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
    if not _admin(data_dir, "cancel_job", job_id=job_id, force=force):
        raise _fail("cancelling needs the running engine (it notifies devices); start `certrotator local up`")
    console.print(f"canceled job {job_id}")


def _describe(store: JobStore, job_id: str) -> dict[str, Any]:
    job = store.job(job_id)
    if job is None:
        raise _fail(f"job {job_id!r} does not exist")
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
    return {
        "jobId": job_id,
        "status": job["status"],
        "targets": job["targets"],
        "config": asdict(job["config"]),
        "executions": store.status_counts(job_id),
        "failures": failures,
    }


@jobs_app.command("describe")
def jobs_describe(
    job_id: str,
    watch: Annotated[bool, typer.Option(help="Follow until the job completes.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    as_json: JsonFlag = False,
) -> None:
    """Show a job's execution status counts and failure reasons (--watch: a live progress bar)."""
    _, store = _open(data_dir)
    if not watch:
        info = _describe(store, job_id)
        if as_json:
            console.print_json(json.dumps(info))
            return
        console.print(f"job [bold]{job_id}[/bold]: {info['status']}  {json.dumps(info['executions'])}")
        if info["failures"]:
            _emit(info["failures"], False, "Failures")
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
    if info["failures"]:
        _emit(info["failures"], False, "Failures")
