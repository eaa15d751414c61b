"""`certrotator local up` and `certrotator local provision`: run the engine, provision devices."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer

from certrotator import crypto
from certrotator.console import fail
from certrotator.local import admin
from certrotator.local.ca import IssuerName, load_local_ca
from certrotator.local.faults import FaultPlanError, load_plan
from certrotator.local.jobs import DEFAULT_MAX_IN_FLIGHT
from certrotator.local.provision import provision_thing
from certrotator.local.registry import RegistryError
from certrotator.local_cli.common import DEFAULT_DATA_DIR, DataDir, console, local_app, open_stores

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
    schedule: Annotated[
        str | None,
        typer.Option(
            help="Also run `certrotator schedule` inside the engine: e.g. 'renew-before=30d' or "
            "'renew-at-fraction=0.66', plus ',group=G', ',max-per-job=N', ',jitter=1d', ',every=1h' "
            "(how often; default hourly, the first run one period after start).",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics (0 = any free port).", min=0
        ),
    ] = None,
    faults: Annotated[
        Path | None,
        typer.Option(
            help="A fault plan (TOML): drop or delay messages, act at protocol steps, slow ports "
            "(docs/reliability.md, 'Fault plans'). For testing only.",
        ),
    ] = None,
) -> None:
    """Run the local IoT Core in the foreground (Ctrl-C stops it cleanly)."""
    from certrotator.local.engine import EngineConfig, LocalIoTCore  # the broker only here
    from certrotator.local.serve import serve

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
            faults=None if faults is None else load_plan(faults),
        )
    except (crypto.CryptoError, FaultPlanError) as exc:
        raise fail(str(exc)) from None
    if admin.running_engine(data_dir) is not None:
        raise fail(f"an engine is already running on {data_dir}")
    renewal = None
    if schedule is not None:
        from certrotator.ops.schedule.settings import (
            parse_spec,  # ops/ is handed in, never imported by local/
        )

        try:
            renewal = parse_spec(schedule, allow_every=True)
        except ValueError as exc:
            raise fail(str(exc)) from None
    servers = []

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
            if renewal is not None and renewal.every_s is not None:
                from certrotator.ops.schedule.local import EngineScheduler, log_run

                scheduler = EngineScheduler(engine, renewal.settings, on_run=log_run)
                engine.add_periodic("schedule", renewal.every_s, scheduler.run)
                console.print(f"renewal schedule: {renewal.settings.describe()}, every {renewal.every_s:g} s")
            if metrics_port is not None:
                from certrotator.local.metrics import attach

                servers.append(attach(engine, loop, metrics_port))
                console.print(f"metrics on http://127.0.0.1:{servers[-1].port}/metrics")
            console.print(
                f"local IoT Core on [bold]{host}:{engine.port}[/bold] — data in {data_dir} — Ctrl-C stops"
            )

        await serve(config, stop, ready)

    try:
        asyncio.run(main())
    except (crypto.CryptoError, OSError) as exc:
        raise fail(str(exc)) from None
    finally:
        for server in servers:
            server.close()
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
    validity_days: Annotated[
        int | None,
        typer.Option(help="Validity of the first certificate in days (default: the issuer's).", min=1),
    ] = None,
) -> None:
    """Create a thing with a certificate and write device.pem.crt, private.pem.key, AmazonRootCA1.pem, device.toml."""
    try:
        keys = crypto.parse_key_algorithm(key_algorithm)
        signing = crypto.parse_signing_algorithm(signing_algorithm) if signing_algorithm else None
        running = admin.running_engine(data_dir)
        mqtt_port = port or (int(running["mqtt_port"]) if running else 8883)
        host = str(running["host"]) if running else "127.0.0.1"
        registry, _ = open_stores(data_dir)
        result = provision_thing(
            registry,
            load_local_ca(data_dir),  # as the engine made it (an RSA private CA too)
            thing,
            out,
            group=group,
            key_algorithm=keys,
            signing_algorithm=signing,
            issuer=issuer,
            validity_days=validity_days,
            host=host,
            port=mqtt_port,
        )
    except (crypto.CryptoError, RegistryError, ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    console.print(f"provisioned [bold]{thing}[/bold] (certificate {result.certificate_id}) in {out}")
