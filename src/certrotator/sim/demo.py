"""`certrotator demo`: rotate a real fleet on the embedded local IoT Core and verify every invariant."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from certrotator import crypto
from certrotator.device.settings import validate_algorithms
from certrotator.local.ca import IssuerName
from certrotator.local.engine import EngineConfig
from certrotator.local.handles.base import EngineHandle
from certrotator.local.handles.process import EngineProcess, RemoteEngine
from certrotator.local.handles.thread import EngineThread
from certrotator.local.jobs import DEFAULT_MAX_IN_FLIGHT
from certrotator.protocol import TERMINAL_EXECUTION_STATUSES, JobExecutionStatus
from certrotator.sim.fleet import SimulatedFleet
from certrotator.sim.report import JobReport
from certrotator.sim.softhsm import softhsm_available


@dataclass(frozen=True, slots=True)
class DemoOptions:
    devices: int = 10
    key_algorithm: str = "ECDSA-P256"
    signing_algorithm: str | None = None
    issuer: IssuerName = IssuerName.IOT
    ca_signing_algorithm: str = "SHA256WITHECDSA"
    ca_validity_days: int = 365
    keystore: str = "file"
    data_dir: Path | None = None
    as_json: bool = False
    in_process: bool = True  # engine on a thread of this process (False: its own process, both cores)
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT  # the engine's admission limit; 0 = no limit


def run_demo(options: DemoOptions, console: Console) -> int:
    """Returns the process exit code: 0 only if every device rotated and verified."""
    if options.devices < 1:
        raise ValueError("--devices must be at least 1")
    if options.max_in_flight < 0:
        raise ValueError("--max-in-flight must be 0 (no limit) or more")
    if options.keystore not in ("file", "pkcs11"):
        raise ValueError(f"--keystore must be file or pkcs11, not {options.keystore!r}")
    if options.keystore == "pkcs11" and (missing := softhsm_available()) is not None:
        raise ValueError(f"--keystore pkcs11 needs SoftHSM2: {missing}")
    signing = options.signing_algorithm or (
        "ECDSA-WITH-SHA256" if options.key_algorithm.startswith("ECDSA") else "SHA256WITHRSA"
    )
    key_algorithm, signing_algorithm = validate_algorithms(options.key_algorithm, signing, options.keystore)
    ca_signing = crypto.parse_ca_signing_algorithm(options.ca_signing_algorithm)
    logging.getLogger("certrotator").setLevel(logging.ERROR)  # the summary tells the story

    with tempfile.TemporaryDirectory(prefix="certrotator-demo-") as tmp:
        root = options.data_dir or Path(tmp)
        with _engine(options, root, ca_signing) as engine, SimulatedFleet(engine, root) as fleet:

            def say(message: str) -> None:
                if not options.as_json:
                    console.print(message)

            say(
                f"local IoT Core on 127.0.0.1:{engine.port}; provisioning {options.devices} devices "
                f"({key_algorithm.value}, CSRs signed {signing_algorithm.value}, issuer {options.issuer.value})"
            )
            pkcs11 = options.keystore == "pkcs11"
            devices = fleet.provision(
                options.devices,
                "demo-fleet",
                key_algorithm,
                signing_algorithm,
                keystore="pkcs11" if pkcs11 else "file",
            )
            if pkcs11:
                # Each device has its own SoftHSM2 token directory holding its key; agents run as
                # processes, one PKCS#11 application each, as on real devices (the fleet ends them).
                fleet.start_agent_processes(devices)
            else:
                fleet.start_agents()
            say(f"{options.devices} agents connected over mutual TLS; creating the rotation job")
            report = _rotate(fleet, options, console)
            fleet.verify(report)
    summary = report.summary()
    if options.as_json:
        console.print_json(json.dumps(summary))
    else:
        _print_summary(report, summary, console)
    ok = summary["succeeded"] == summary["verified"] == options.devices and not report.problems
    return 0 if ok else 1


@contextmanager
def _engine(
    options: DemoOptions, root: Path, ca_signing: crypto.CaSigningAlgorithm
) -> Iterator[EngineHandle]:
    """The local IoT Core on a thread of this process (the default), or in its own process
    (`certrotator local up`), as the benchmarks run it: on a thread, broker and fleet share one GIL,
    and past a few hundred devices the broker can answer too late (CONNACK after the AWS CRT's 3 s)."""
    data_dir = root / "engine"
    if options.in_process:
        config = EngineConfig(
            data_dir,
            port=0,
            issuer=options.issuer,
            private_ca_signing_algorithm=ca_signing,
            private_ca_validity_days=options.ca_validity_days,
            max_in_flight=options.max_in_flight or None,
        )
        with EngineThread(config) as thread:
            yield thread
        return
    args = ["--issuer", options.issuer.value, "--ca-signing-algorithm", ca_signing.value]
    args += ["--ca-validity-days", str(options.ca_validity_days)]
    args += ["--max-in-flight", str(options.max_in_flight)]
    with EngineProcess(data_dir, args, log=root / "engine.log"):
        remote = RemoteEngine(data_dir)
        try:
            yield remote
        finally:
            remote.close()


def _rotate(fleet: SimulatedFleet[EngineHandle], options: DemoOptions, console: Console) -> JobReport:
    if options.as_json:
        return fleet.run_job("demo-rotation", "demo-fleet", unlimited_rollout=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("rotating", total=options.devices, detail="")

        def show(counts: dict[str, int], elapsed: float) -> None:
            done = sum(counts.get(s, 0) for s in TERMINAL_EXECUTION_STATUSES)
            rate = counts.get(JobExecutionStatus.SUCCEEDED, 0) / elapsed if elapsed > 0 else 0.0
            detail = " ".join(f"{s}={n}" for s, n in sorted(counts.items())) + f"  {rate:.1f} rotations/s"
            bar.update(task, completed=done, detail=detail)

        return fleet.run_job("demo-rotation", "demo-fleet", progress=show, unlimited_rollout=True)


def _print_summary(report: JobReport, summary: dict[str, object], console: Console) -> None:
    table = Table(title="Rotation summary")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key in (
        "devices",
        "succeeded",
        "failed",
        "timed_out",
        "other",
        "verified",
        "duration_s",
        "rotations_per_s",
        "p50_s",
        "p99_s",
    ):
        table.add_row(key, str(summary[key]))
    console.print(table)
    if report.problems:
        problems = Table(title="Problems")
        problems.add_column("thing")
        problems.add_column("what went wrong")
        for p in report.problems:
            problems.add_row(p.thing, p.what)
        console.print(problems)
    else:
        console.print(
            f"[green]all {report.devices} devices rotated their key and certificate; "
            "every invariant verified[/green]"
        )
