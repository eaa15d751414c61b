"""`certrotator schedule --data-dir` on the local IoT Core: facts from a real registry and job store,
jobs created as `jobs create` creates them (the running engine's admin endpoint, else the database),
and end to end with real agents: a fleet provisioned with certificates expiring in 10 days and others in
a year, `schedule --renew-before 30d` rotates exactly the first ones, and the report shows the new
expiries afterwards."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from certrotator.cli import app
from certrotator.device.standalone.config import load_device_config
from certrotator.local.ca import ensure_local_ca
from certrotator.local.db import Database
from certrotator.local.engine import EngineConfig
from certrotator.local.handles.thread import EngineThread
from certrotator.local.jobs import JobStore
from certrotator.local.metrics import attach
from certrotator.local.provision import CONFIG_FILE, ProvisionRequest, provision_thing
from certrotator.local.registry import LocalRegistry
from certrotator.ops.schedule.local import read_fleet
from certrotator.ops.schedule.policy import Verdict
from certrotator.ops.schedule.settings import DAY
from certrotator.protocol import JobExecutionStatus
from certrotator.sim.fleet import SimulatedDevice, SimulatedFleet

pytestmark = pytest.mark.timeout(180)

runner = CliRunner()
SHORT, LONG = 10, 365  # days of validity of the first certificates


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout


def schedule_json(data_dir: Path, *args: str) -> tuple[int, dict[str, Any]]:
    code, out = cli("schedule", "--data-dir", str(data_dir), "--renew-before", "30d", "--json", *args)
    assert code in (0, 1), out
    return code, json.loads(out)


def provision_data_dir(data_dir: Path, tmp_path: Path) -> None:
    registry = LocalRegistry(Database(data_dir))
    ca = ensure_local_ca(data_dir)
    for i in range(3):
        provision_thing(
            registry, ca, f"short-{i}", tmp_path / f"short-{i}", group="fleet", validity_days=SHORT
        )
        provision_thing(registry, ca, f"long-{i}", tmp_path / f"long-{i}", group="fleet", validity_days=LONG)
    provision_thing(registry, ca, "elsewhere", tmp_path / "elsewhere", group="lab", validity_days=SHORT)
    registry.db.close()


def test_facts_from_the_registry_and_the_job_store(tmp_path: Path) -> None:
    data_dir = tmp_path / "engine"
    provision_data_dir(data_dir, tmp_path)
    db = Database(data_dir)
    try:
        fleet = {f.thing: f for f in read_fleet(db, details=True)}
        assert sorted(fleet) == [
            "elsewhere",
            *(f"long-{i}" for i in range(3)),
            *(f"short-{i}" for i in range(3)),
        ]
        (cert,) = fleet["short-0"].certificates
        assert round(cert.lifetime_s / DAY) == SHORT and cert.status == "ACTIVE"
        assert cert.key_algorithm == "ECDSA-P256" and cert.issuer  # parsed from the PEM
        assert fleet["short-0"].groups == ("fleet",) and fleet["short-0"].rotations == ()
        assert [f.thing for f in read_fleet(db, "lab")] == ["elsewhere"]
    finally:
        db.close()


def test_without_an_engine_the_job_goes_to_the_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "engine"
    provision_data_dir(data_dir, tmp_path)
    code, dry = schedule_json(data_dir, "--dry-run", "--group", "fleet")
    assert code == 0 and dry["dryRun"] and dry["created"] == []
    decisions = {d["thing"]: d["decision"] for d in dry["decisions"]}
    assert decisions == {
        **{f"short-{i}": "rotate" for i in range(3)},
        **{f"long-{i}": "wait" for i in range(3)},
    }
    assert JobStore(Database(data_dir)).jobs() == []  # a dry run creates nothing

    code, done = schedule_json(data_dir, "--group", "fleet", "--max-per-job", "2")
    assert code == 0 and len(done["created"]) == 2
    store = JobStore(Database(data_dir))
    jobs = {j["jobId"]: j for j in store.jobs()}
    assert sorted(jobs) == sorted(done["created"])
    targets = sorted(t for j in jobs.values() for t in j["targets"])
    assert targets == [f"thing/short-{i}" for i in range(3)]
    assert all(j["config"].in_progress_timeout_s for j in jobs.values())  # the template's, as jobs create

    # the next run sees them pending (not rolled out: no engine) and creates nothing more
    code, again = schedule_json(data_dir, "--group", "fleet")
    assert again["created"] == [] and again["in-progress"] == 3


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[SimulatedFleet[EngineThread]]:
    config = EngineConfig(tmp_path / "engine", port=0)
    with EngineThread(config, admin=True) as engine, SimulatedFleet(engine, tmp_path, threads=2) as fleet:
        yield fleet


def provision(fleet: SimulatedFleet[EngineThread], thing: str, validity_days: int) -> SimulatedDevice:
    """As `local provision --validity-days N` does, through the engine's handle."""
    directory = fleet.root / "devices" / thing
    request = ProvisionRequest(thing, directory, group="fleet", validity_days=validity_days)
    certificate_id = fleet.engine.provision(request).certificate_id
    device = SimulatedDevice(thing, directory, load_device_config(directory / CONFIG_FILE), certificate_id)
    fleet.devices.append(device)
    return device


def test_schedule_rotates_exactly_the_things_inside_the_window(fleet: SimulatedFleet[EngineThread]) -> None:
    data_dir = fleet.engine.config.data_dir
    engine = fleet.engine
    server = engine.call(lambda e: attach(e, engine.loop, 0))  # as `local up --metrics-port 0`
    short = [provision(fleet, f"short-{i}", SHORT) for i in range(3)]
    long = [provision(fleet, f"long-{i}", LONG) for i in range(3)]
    fleet.start_agents()
    before = {d.thing: d.certificate_id() for d in fleet.devices}
    expiry = "certrotator_certificate_expiration_timestamp_seconds"
    metrics = scrape(server.port)
    assert metrics[("certrotator_connected_devices", ())] == 6
    short_expiry = {
        d.thing: metrics[(expiry, (("certificate_id", before[d.thing]), ("thing", d.thing)))] for d in short
    }
    assert all(abs(t - (time.time() + SHORT * DAY)) < 3600 for t in short_expiry.values())

    code, result = schedule_json(data_dir)
    assert code == 0, result
    (job_id,) = result["created"]
    assert {d["thing"] for d in result["decisions"] if d["jobId"] == job_id} == {d.thing for d in short}

    report = fleet.wait_job(job_id, timeout_s=60)
    assert report.statuses == {d.thing: JobExecutionStatus.SUCCEEDED.value for d in short}, report.problems
    fleet.verify(report)
    assert report.problems == []
    assert all(d.certificate_id() != before[d.thing] for d in short)
    assert all(d.certificate_id() == before[d.thing] for d in long)

    # the report shows the new expiries (the AWS IoT-style issuer: 2049-12-31) and the rotations
    code, out = cli("report", "--data-dir", str(data_dir), "--renew-before", "30d", "--json")
    assert code == 0, out
    rows = {r["thing"]: r for r in json.loads(out)["things"]}
    for device in short:
        row = rows[device.thing]
        assert row["certificateId"] == device.certificate_id()
        assert row["daysLeft"] > 5 * 365 and row["decision"] == Verdict.WAIT.value
        assert row["lastRotation"]["jobId"] == job_id and row["lastRotation"]["status"] == "SUCCEEDED"
    for device in long:
        assert rows[device.thing]["lastRotation"] is None and 360 < rows[device.thing]["daysLeft"] <= LONG

    # and the metrics endpoint: the new certificates' expiries, the rotations and the requests
    metrics = scrape(server.port)
    server.close()
    for device in short:
        new_expiry = metrics[(expiry, (("certificate_id", device.certificate_id()), ("thing", device.thing)))]
        assert new_expiry > time.time() + 5 * 365 * DAY
        assert (expiry, (("certificate_id", before[device.thing]), ("thing", device.thing))) not in metrics
    for device in long:
        assert (expiry, (("certificate_id", before[device.thing]), ("thing", device.thing))) in metrics
    assert metrics[("certrotator_rotations_total", (("outcome", "SUCCEEDED"),))] == 3
    assert metrics[("certrotator_rotations_total", (("outcome", "FAILED"),))] == 0
    for handler in ("create-certificate", "commit-certificate"):
        assert metrics[("certrotator_requests_total", (("handler", handler), ("outcome", "accepted")))] == 3
        assert metrics[("certrotator_handler_duration_seconds_count", (("handler", handler),))] == 3
    assert metrics[("certrotator_job_executions_total", (("status", "SUCCEEDED"),))] == 3
    assert metrics[("certrotator_connected_devices", ())] == 6

    # and a second run finds nothing due
    code, again = schedule_json(data_dir)
    assert code == 0 and again["created"] == [] and again["rotate"] == 0


def test_report_command_prints_the_table_histogram_and_writes_a_png(tmp_path: Path) -> None:
    data_dir = tmp_path / "engine"
    provision_data_dir(data_dir, tmp_path)
    png = tmp_path / "fleet.png"
    code, out = cli("report", "--data-dir", str(data_dir), "--png", str(png))
    assert code == 0, out
    assert "Days to expiry" in out and "short-0" in out and "chart written to" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    started = time.time()
    code, out = cli("report", "--data-dir", str(data_dir), "--json", "--group", "lab")
    assert code == 0 and [r["thing"] for r in json.loads(out)["things"]] == ["elsewhere"]
    assert time.time() - started < 30


def test_local_up_schedules_inside_the_engine_and_serves_metrics(tmp_path: Path) -> None:
    """The shipped command: `local provision --validity-days`, then `local up --schedule ...
    --metrics-port P` as its own process (no agents: the job's executions stay QUEUED)."""
    data_dir = tmp_path / "engine"
    for name, days in (("short-0", SHORT), ("short-1", SHORT), ("long-0", LONG)):
        code, out = cli(
            "local", "provision", name, "--out", str(tmp_path / name), "--data-dir", str(data_dir),
            "--validity-days", str(days), "--group", "fleet",
        )  # fmt: skip
        assert code == 0, out
    with socket.socket() as probe:  # a free loopback port for the metrics endpoint
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "certrotator.cli", "local", "up", "--data-dir", str(data_dir), "--port", "0",
        "--schedule", "renew-before=30d,group=fleet,every=0.5s", "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    log = (tmp_path / "engine.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:

        def scheduled() -> bool:
            db = Database(data_dir)
            try:
                return bool(JobStore(db).jobs())
            finally:
                db.close()

        wait_for(scheduled, "the engine's scheduler to create a job", process)
        db = Database(data_dir)
        (job,) = JobStore(db).jobs()
        db.close()
        assert job["jobId"].startswith("renew-") and sorted(job["targets"]) == [
            "thing/short-0",
            "thing/short-1",
        ]
        metrics = scrape(metrics_port)
        expiries = [k for k in metrics if k[0] == "certrotator_certificate_expiration_timestamp_seconds"]
        assert len(expiries) == 3 and metrics[("certrotator_connected_devices", ())] == 0
        queued = ("certrotator_job_executions_total", (("status", "QUEUED"),))
        # the rollout releases the two executions (the template's rate): each counted once, QUEUED
        wait_for(lambda: scrape(metrics_port)[queued] == 2, "both executions to be released", process)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        log.close()
    output = (tmp_path / "engine.log").read_text()
    assert "renewal schedule: renew-before=30d,group=fleet, every 0.5 s" in output
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in output


def wait_for(
    condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes], timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the engine exited ({process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # polling a file-backed condition across processes; the condition decides
