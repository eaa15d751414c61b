"""Run a batch of fault-matrix cells (sim.matrix) with real agent processes against
`certrotator local up --faults plan.toml`, and check every cell's invariants (DESIGN.md §4):

- the execution is terminal (a cell that must time out does so within the short in-progress timeout);
- the device ends on a working pair: connected with the certificate on its disk, no credential change
  pending (no journal, no backup), certificate and key belonging together (file store);
- the registry attaches exactly that certificate to the thing, or two where the terminal table keeps
  both (TIMED_OUT after a commit, and a disabled terminal rule), which `reconcile` must bring to one;
- no certificate of the thing is left in the registry unattached (an orphan);
- notifications exactly where the table says: none for SUCCEEDED, one for any other end;
- the fault did fire (the engine's faults.log, or the agent's crash exit).

`python -m certrotator.sim.matrix_run --cells CELLS.json --work DIR --out RESULTS.json` runs one
batch in its own process (bench/fault_matrix.py runs batches side by side that way).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certrotator import crypto
from certrotator.local.faults import load_plan
from certrotator.local.handles.process import EngineGone, EngineProcess, RemoteEngine
from certrotator.local.jobs import Execution
from certrotator.local.operations import JobRequest
from certrotator.ops.reconcile.local import reconcile_data_dir
from certrotator.ops.reconcile.runner import Options
from certrotator.protocol import (
    ACTIVE_EXECUTION_STATUSES,
    PENDING_ROLLOUT,
    JobExecutionStatus,
    RotationProgress,
)
from certrotator.sim.faults import FaultDriver
from certrotator.sim.fleet import AGENT_SUBSCRIBED_LOG, KeyStoreKind, SimulatedDevice, SimulatedFleet
from certrotator.sim.matrix import STEP_RULES, Cell, CellResult, Fault, plan_for, thing_name, to_toml

log = logging.getLogger("certrotator.sim")

GROUP = "cell"
JOB = "matrix"
OPEN = {*(s.value for s in ACTIVE_EXECUTION_STATUSES), PENDING_ROLLOUT}


@dataclass(frozen=True)
class Settings:
    state_timeout_s: float = 4.0  # the agents' per-state timeout: a lost reply costs this much
    resync_s: float | None = 3.0  # idle re-synchronisation (sim.agent_process); None = as shipped
    in_progress_timeout_min: float = 0.5  # the backstop for an execution nobody finishes
    settle_s: float = 45.0  # how long devices get to come back on a working pair after the job
    seed: int = 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_log(device: SimulatedDevice) -> str:
    path = device.directory / "agent.log"
    return path.read_text(errors="replace") if path.exists() else ""


def run_batch(
    cells: list[Cell], work: Path, settings: Settings = Settings(), plan: dict[str, Any] | None = None
) -> list[CellResult]:
    """One engine, one device per cell, one rotation job; every cell checked. `plan` (a plan document
    acting on thing_name(GROUP, i) for cell i) replaces the cells' own, for Fault.PLANNED cells."""
    store: KeyStoreKind = "pkcs11" if cells[0].store == "pkcs11" else "file"
    assert all(c.store == store for c in cells), "a batch is of one key store"
    work.mkdir(parents=True, exist_ok=True)
    plan_path = work / "plan.toml"
    plan_path.write_text(to_toml(plan if plan is not None else plan_for(cells, GROUP, settings.seed)))
    faults = load_plan(plan_path)
    data = work / "engine"
    engine = EngineProcess(
        data, ["--port", str(free_port()), "--max-in-flight", "0", "--faults", str(plan_path)]
    )
    engine.start()
    remote = engine.open_handle()
    try:
        with SimulatedFleet(remote, work, threads=1, resync_s=settings.resync_s) as fleet:
            devices = fleet.provision(
                len(cells), GROUP, state_timeout_s=settings.state_timeout_s, keystore=store
            )
            assert [d.thing for d in devices] == [thing_name(GROUP, i) for i in range(len(cells))]
            with FaultDriver(fleet, faults, engine) as driver:
                driver.start_agents(devices)
                subscribed = remote.wait_for(
                    lambda: all(AGENT_SUBSCRIBED_LOG in agent_log(d) for d in devices), 60, 0.1
                )
                if not subscribed:
                    raise TimeoutError(f"agents did not subscribe; see the agent.log files under {work}")
                request = JobRequest(
                    JOB,
                    groups=(GROUP,),
                    unlimited_rollout=True,
                    in_progress_timeout_minutes=settings.in_progress_timeout_min,
                )
                created = time.time()
                try:
                    remote.create_job(request)
                except EngineGone:  # an engine restart at step 1 dies in the job's first notify-next
                    if not remote.wait_for(lambda: remote.job_created_at(JOB) is not None, 60, 0.1):
                        raise
                limit = settings.in_progress_timeout_min * 60 + 90
                remote.wait_for(lambda: not OPEN & set(remote.status_counts(JOB)), limit, 0.1)
                remote.wait_for(lambda: all(_settled(remote, d) for d in devices), settings.settle_s, 0.1)
                return [
                    _check(cell, device, remote, driver, created, data)
                    for cell, device in zip(cells, devices, strict=True)
                ]
    finally:
        remote.close()
        engine.stop()


def _settled(remote: RemoteEngine, device: SimulatedDevice) -> bool:
    """On a working pair: connected with the certificate on its disk, nothing pending, and that
    certificate attached to the thing."""
    try:
        certificate = device.certificate_id()
        live = {(c.thing, c.principal) for c in remote.connections()}
    except (OSError, ValueError, EngineGone):  # a file being replaced; an engine being restarted
        return False
    backup = device.config.certificate.with_name(device.config.certificate.name + ".bak")
    return (
        (device.thing, certificate) in live
        and not device.config.journal.exists()
        and not backup.exists()
        and certificate in remote.attached_certificates([device.thing])[device.thing]
    )


def _fired(cell: Cell, device: SimulatedDevice, driver: FaultDriver, status: str, attached: int) -> bool:
    if cell.fault is Fault.POWER_CUT:
        return any(e.what == "crashed" for e in driver.events_of(device.thing))
    if cell.fault is Fault.RULE_DISABLED:
        # A disabled rule fires by having nothing to say: what it would have done did not happen.
        if STEP_RULES.get(cell.step) == "terminal":  # type: ignore[call-overload]
            return attached == 2
        return status != JobExecutionStatus.SUCCEEDED.value
    return bool(driver.fired(device.thing) or driver.events_of(device.thing))


def _check(
    cell: Cell, device: SimulatedDevice, remote: RemoteEngine, driver: FaultDriver, created: float, data: Path
) -> CellResult:
    thing = device.thing
    problems: list[str] = []
    execution: Execution | None = next((e for e in remote.executions(JOB) if e.thing == thing), None)
    status = execution.status.value if execution is not None else ""
    non_terminal = status in OPEN or not status
    if non_terminal:
        problems.append(f"execution not terminal: {status or 'never released'}")
    settled = _settled(remote, device)
    bricked = not settled or (device.config.store == "file" and not device.pair_matches())
    if bricked:
        problems.append(
            "the device is not on a working pair (connected with its certificate, nothing pending)"
        )
    attached = remote.attached_certificates([thing])[thing]
    notes = [n for n in remote.notifications(JOB) if n.get("thingName") == thing]
    succeeded = status == JobExecutionStatus.SUCCEEDED.value
    if not non_terminal and len(notes) != (0 if succeeded else 1):
        problems.append(
            f"{len(notes)} notification(s) for a {status} execution, the table says {0 if succeeded else 1}"
        )
    terminal_rule_off = cell.fault is Fault.RULE_DISABLED and STEP_RULES.get(cell.step) == "terminal"  # type: ignore[call-overload]
    reconciled = False
    if len(attached) == 2:
        # The table keeps both after a commit whatever ended the execution but SUCCEEDED (TIMED_OUT in
        # DESIGN.md; FAILED too: the device may have rolled back or not), and notifies with the progress.
        after_commit = any(
            n.get("details", {}).get("progress") == RotationProgress.COMMITTED.value for n in notes
        )
        kept_by_table = (not succeeded and after_commit) or (terminal_rule_off and succeeded)
        if not kept_by_table:
            problems.append("two certificates attached where the terminal table keeps one")
        reconcile_data_dir(data, Options(settle_s=1.0), [thing])
        reconciled = True
        attached = remote.attached_certificates([thing])[thing]
    elif len(attached) != 1:
        problems.append(f"{len(attached)} certificates attached")
    if settled and attached != [device.certificate_id()]:
        problems.append(
            "the registry does not attach exactly the device's certificate"
            + (" after reconcile" if reconciled else "")
        )
    orphans = _orphans(remote, thing)
    if orphans:
        problems.append(f"{orphans} certificate(s) of the thing left unattached in the registry")
    fired = _fired(cell, device, driver, status, len(attached) + (1 if reconciled else 0))
    if not fired:
        problems.append("the fault never fired")
    outcome = status or "none"
    if notes:
        outcome += ": " + str(notes[0].get("outcome", "")).split(";")[0]
    if reconciled:
        outcome += "; reconcile retired one"
    seconds = (execution.updated_at - created) if execution is not None else 0.0
    return CellResult(
        cell,
        thing,
        status,
        outcome,
        fired,
        len(notes),
        len(remote.attached_certificates([thing])[thing]) if not reconciled else 2,
        reconciled,
        bricked,
        orphans,
        non_terminal,
        problems,
        round(seconds, 2),
    )


def _orphans(remote: RemoteEngine, thing: str) -> int:
    """Certificates issued for `thing` (their subject names it) that no thing has attached."""
    names = (
        crypto.load_certificate(pem.encode()).subject for pem in remote.unattached_certificates().values()
    )
    return sum(1 for n in names if f"CN={thing}" in n.rfc4514_string().split(","))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="certrotator.sim.matrix_run")
    parser.add_argument("--cells", required=True, type=Path, help="JSON list of cells (Cell.to_json)")
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--no-resync", action="store_true", help="agents as shipped: no idle resync")
    parser.add_argument("--state-timeout", type=float, default=Settings.state_timeout_s)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cells = [Cell.from_json(c) for c in json.loads(args.cells.read_text())]
    settings = Settings(
        state_timeout_s=args.state_timeout, resync_s=None if args.no_resync else Settings.resync_s
    )
    results = run_batch(cells, args.work, settings)
    args.out.write_text(json.dumps([r.to_json() for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

