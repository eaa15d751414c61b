"""Soak: a fleet rotated while the engine loses and delays messages at random, in both directions.

N simulated devices (real agents on the fleet's reactor threads, real file key stores, the AWS CRT over
mutual TLS) are rotated by one job on `certrotator local up --faults plan.toml`, whose plan drops each
message between the devices and the engine with probability `--loss` and holds back a further
`--delay-probability` of them for a random 0.05 s to `--delay-max` s (seeded: the same seed loses the
same messages of each device). Engine and fleet run in separate processes, so both cores work.

After the job: every execution must be terminal within the in-progress timeout (non_terminal = 0),
every device back on a working pair (connected with the certificate on its disk, nothing pending,
that certificate attached: bricked = 0), two certificates only where the terminal table keeps both
(then `reconcile` brings them to one), and no certificate left unattached (orphan_certificates = 0).
Notifications must be where the table says: none for SUCCEEDED, one for any other end.

Run:
    .venv/bin/python bench/soak.py                     # 1,000 devices, 2 % loss
    .venv/bin/python bench/soak.py --devices 20        # small (the smoke test)

Ends with `bricked=0 orphan_certificates=0 non_terminal=0 ...`; exit 0 only if those are zero and
every device checked out.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from certrotator.local.fault_hooks import FAULT_LOG
from certrotator.local.handles.process import EngineProcess, RemoteEngine
from certrotator.local.operations import JobRequest
from certrotator.local.serve import relax_gc
from certrotator.ops.reconcile.local import reconcile_data_dir
from certrotator.ops.reconcile.runner import Options
from certrotator.protocol import (
    ACTIVE_EXECUTION_STATUSES,
    PENDING_ROLLOUT,
    JobExecutionStatus,
    RotationProgress,
)
from certrotator.sim.fleet import SimulatedDevice, SimulatedFleet
from certrotator.sim.matrix import to_toml

GROUP = "soak"
JOB = "soak"
OPEN = {*(s.value for s in ACTIVE_EXECUTION_STATUSES), PENDING_ROLLOUT}
# Every topic of the protocol ("#" does not match topics that start with "$", MQTT-4.7.2-1).
TOPICS = ("$aws/things/#", "awslabs/things/#")


def plan(args: argparse.Namespace) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    for topic in TOPICS:
        messages.append({"topic": topic, "direction": "both", "action": "drop", "probability": args.loss})
        messages.append(
            {
                "topic": topic,
                "direction": "both",
                "action": "delay",
                "probability": args.delay_probability,
                "delay_s": [0.05, args.delay_max],
            }
        )
    return {"seed": args.seed, "message": messages}


def raise_open_files_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def settled(live: set[tuple[str, str]], attached: dict[str, list[str]], device: SimulatedDevice) -> bool:
    try:
        certificate = device.certificate_id()
    except (OSError, ValueError):
        return False
    backup = device.config.certificate.with_name(device.config.certificate.name + ".bak")
    return (
        (device.thing, certificate) in live
        and certificate in attached[device.thing]
        and not device.config.journal.exists()
        and not backup.exists()
    )


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    plan_path = work / "plan.toml"
    plan_path.write_text(to_toml(plan(args)))
    data = work / "engine"
    started = time.monotonic()
    with EngineProcess(data, ["--max-in-flight", str(args.max_in_flight), "--faults", str(plan_path)]):
        remote = RemoteEngine(data)
        try:
            with SimulatedFleet(remote, work, threads=args.threads, resync_s=args.resync) as fleet:
                devices = fleet.provision(args.devices, GROUP, state_timeout_s=args.state_timeout)
                fleet.start_agents(timeout_s=args.timeout)
                things = [d.thing for d in devices]
                print(
                    f"{len(devices)} devices provisioned and connected in {time.monotonic() - started:.1f} s"
                )
                job_started = time.monotonic()
                remote.create_job(
                    JobRequest(
                        JOB,
                        groups=(GROUP,),
                        unlimited_rollout=True,
                        in_progress_timeout_minutes=args.in_progress_timeout,
                    )
                )
                limit = args.in_progress_timeout * 60 + args.timeout
                remote.wait_for(lambda: not OPEN & set(remote.status_counts(JOB)), limit, 1.0)
                job_s = time.monotonic() - job_started

                def all_settled() -> bool:
                    live = {(c.thing, c.principal) for c in remote.connections()}
                    attached = remote.attached_certificates(things)
                    return all(settled(live, attached, d) for d in devices)

                remote.wait_for(all_settled, args.settle, 1.0)
                return check(remote, devices, data, job_s, time.monotonic() - started)
        finally:
            remote.close()


def check(
    remote: RemoteEngine, devices: list[SimulatedDevice], data: Path, job_s: float, wall_s: float
) -> dict[str, Any]:
    things = [d.thing for d in devices]
    executions = {e.thing: e for e in remote.executions(JOB)}
    statuses = Counter(executions[t].status.value if t in executions else PENDING_ROLLOUT for t in things)
    non_terminal = sum(n for s, n in statuses.items() if s in OPEN)
    live = {(c.thing, c.principal) for c in remote.connections()}
    attached = remote.attached_certificates(things)
    bricked = [d.thing for d in devices if not settled(live, attached, d) or not d.pair_matches()]
    notes: dict[str, list[dict[str, Any]]] = {}
    for n in remote.notifications(JOB):
        notes.setdefault(str(n.get("thingName")), []).append(n)
    problems: list[str] = []
    wrong_notifications = 0
    for thing in things:
        status = executions[thing].status.value if thing in executions else ""
        wanted = 0 if status == JobExecutionStatus.SUCCEEDED.value else 1
        if status not in OPEN and len(notes.get(thing, [])) != wanted:
            wrong_notifications += 1
            problems.append(f"{thing}: {len(notes.get(thing, []))} notifications for {status}")
    two = [t for t in things if len(attached[t]) == 2]
    for thing in two:
        kept = any(
            n.get("details", {}).get("progress") == RotationProgress.COMMITTED.value
            for n in notes.get(thing, [])
        )
        if not kept:
            problems.append(f"{thing}: two certificates attached where the table keeps one")
    if two:
        reconcile_data_dir(data, Options(settle_s=1.0), two)
    after = remote.attached_certificates(things)
    by_thing = {d.thing: d for d in devices}
    wrong_count = [t for t in things if after[t] != [by_thing[t].certificate_id()]]
    problems += [f"{t}: attached {after[t]} after reconcile" for t in wrong_count]
    orphans = len(remote.unattached_certificates())
    fault_log = (
        [json.loads(line) for line in (data / FAULT_LOG).read_text().splitlines()]
        if (data / FAULT_LOG).exists()
        else []
    )
    return {
        "devices": len(devices),
        "statuses": dict(sorted(statuses.items())),
        "dropped": sum(1 for r in fault_log if r.get("drop")),
        "delayed": sum(1 for r in fault_log if r.get("delay_s")),
        "reconciled": len(two),
        "bricked": len(bricked),
        "orphan_certificates": orphans,
        "non_terminal": non_terminal,
        "wrong_notifications": wrong_notifications,
        "wrong_certificate_count": len(wrong_count),
        "job_s": round(job_s, 1),
        "wall_s": round(wall_s, 1),
        "problems": problems[:20] + [f"{t}: not on a working pair" for t in bricked[:20]],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--loss", type=float, default=0.02, help="each message lost with this probability")
    parser.add_argument("--delay-probability", type=float, default=0.05, help="each message delayed so often")
    parser.add_argument(
        "--delay-max", type=float, default=2.0, help="longest delay (s); the shortest is 0.05"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--state-timeout", type=float, default=15.0, help="agents' per-state timeout (s)")
    parser.add_argument(
        "--resync", type=float, default=10.0, help="agents ask $next/get this often when idle"
    )
    parser.add_argument("--in-progress-timeout", type=float, default=1.5, help="the job's (minutes)")
    parser.add_argument(
        "--max-in-flight", type=int, default=0, help="the engine's admission limit (0 = none)"
    )
    parser.add_argument("--threads", type=int, default=8, help="fleet reactor threads")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="bound on connecting, and beyond the job's timeout"
    )
    parser.add_argument(
        "--settle", type=float, default=90.0, help="how long devices get to settle after the job (s)"
    )
    parser.add_argument("--work-dir")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("certrotator").setLevel(logging.ERROR)  # failures are counted, not logged
    relax_gc()
    raise_open_files_limit(4 * args.devices + 1024)
    print(
        f"soak: {args.devices} devices, loss {args.loss:.1%} and delays ({args.delay_probability:.0%} of "
        f"messages, 0.05-{args.delay_max:g} s) both ways, seed {args.seed}"
    )
    with tempfile.TemporaryDirectory(prefix="certrotator-soak-", dir=args.work_dir) as tmp:
        result = soak(args, Path(tmp))
    print("executions by status: " + ", ".join(f"{s} {n}" for s, n in result["statuses"].items()))
    print(
        f"messages dropped {result['dropped']}, delayed {result['delayed']}; reconciled {result['reconciled']}"
    )
    print(f"job {result['job_s']} s (created -> every execution terminal); wall time {result['wall_s']} s")
    for problem in result["problems"]:
        print(f"  problem: {problem}")
    if args.json:
        print(json.dumps(result))
    keys = (
        "bricked",
        "orphan_certificates",
        "non_terminal",
        "wrong_notifications",
        "wrong_certificate_count",
    )
    print(" ".join(f"{k}={result[k]}" for k in keys) + f" wall_s={result['wall_s']}")
    return 0 if not any(result[k] for k in keys) and not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
