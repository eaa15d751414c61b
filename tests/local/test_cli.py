"""The `certrotator local ...` / `jobs ...` commands, offline (on the database) and against a running
engine (through its admin endpoint)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from certrotator import crypto
from certrotator.backend.ports import CertificateStatus
from certrotator.cli import app
from certrotator.local.engine import EngineConfig
from certrotator.local.handles.process import EngineProcess, RemoteEngine
from certrotator.local.handles.thread import EngineThread

from .mqtt_clients import Device, PahoClient

runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_provision_writes_a_runnable_credentials_directory(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dev1"
    code, output = cli(
        "local",
        "provision",
        "dev1",
        "--out",
        str(out),
        "--data-dir",
        str(data_dir),
        "--group",
        "g",
        "--key-algorithm",
        "RSA-2048",
    )
    assert code == 0, output
    key = out / "private.pem.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert crypto.certificate_matches_key(
        (out / "device.pem.crt").read_text(), crypto.load_private_key(key.read_bytes())
    )
    assert (out / "AmazonRootCA1.pem").read_bytes() == (data_dir / "ca" / "AmazonRootCA1.pem").read_bytes()
    assert 'signing_algorithm = "SHA256WITHRSA"' in (out / "device.toml").read_text()

    code, output = cli("local", "things", "--json", "--data-dir", str(data_dir))
    assert code == 0
    (thing,) = json.loads(output)
    cert = crypto.load_certificate((out / "device.pem.crt").read_bytes())
    assert thing == {
        "thing": "dev1",
        "groups": ["g"],
        "certificates": [
            {
                "certificateId": crypto.certificate_id(cert),  # all 64 hex digits
                "status": "ACTIVE",
                "issuer": "iot",
                "notAfter": "2049-12-31T23:59:59Z",
            }
        ],
    }
    code, output = cli("local", "things", "--data-dir", str(data_dir))
    assert code == 0 and f"{crypto.certificate_id(cert)[:12]} (ACTIVE)" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--key-algorithm", "RSA-1024"], "unknown key algorithm 'RSA-1024'"),
        (["--key-algorithm", "RSA-2048", "--signing-algorithm", "ECDSA-WITH-SHA256"], "does not match"),
    ],
)
def test_provision_rejects_bad_algorithms(
    data_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    code, output = cli(
        "local", "provision", "dev1", "--out", str(tmp_path / "d"), "--data-dir", str(data_dir), *args
    )
    assert code == 2
    assert message in output
    assert not (tmp_path / "d").exists()


def test_provisioning_a_thing_twice_is_refused(data_dir: Path, tmp_path: Path) -> None:
    assert (
        cli("local", "provision", "dev1", "--out", str(tmp_path / "a"), "--data-dir", str(data_dir))[0] == 0
    )
    code, output = cli(
        "local", "provision", "dev1", "--out", str(tmp_path / "b"), "--data-dir", str(data_dir)
    )
    assert code == 2 and "already provisioned" in output


def test_offline_commands_work_on_the_database(data_dir: Path, tmp_path: Path) -> None:
    cli(
        "local",
        "provision",
        "dev1",
        "--out",
        str(tmp_path / "dev1"),
        "--data-dir",
        str(data_dir),
        "--group",
        "g",
    )
    cert_id = crypto.certificate_id((tmp_path / "dev1" / "device.pem.crt").read_bytes())

    assert cli("local", "rule", "disable", "commit", "--data-dir", str(data_dir))[0] == 0
    code, output = cli("local", "rule", "disable", "bogus", "--data-dir", str(data_dir))
    assert code == 2 and "unknown rule 'bogus'" in output
    assert cli("local", "certificate", "set-status", cert_id, "REVOKED", "--data-dir", str(data_dir))[0] == 0
    code, output = cli("local", "certificate", "set-status", cert_id, "LOST", "--data-dir", str(data_dir))
    assert code == 2 and "ACTIVE, INACTIVE or REVOKED" in output
    code, output = cli(
        "local", "certificate", "set-status", "0" * 64, "INACTIVE", "--data-dir", str(data_dir)
    )
    assert code == 2 and "does not exist" in output
    certs = json.loads(cli("local", "certificates", "--json", "--data-dir", str(data_dir))[1])
    assert [(c["certificateId"], c["status"]) for c in certs] == [(cert_id, "REVOKED")]

    code, output = cli("jobs", "create", "--group", "g", "--job-id", "j1", "--data-dir", str(data_dir))
    assert code == 0 and "no engine running" in output
    code, output = cli("jobs", "create", "--thing", "ghost", "--job-id", "j2", "--data-dir", str(data_dir))
    assert code == 2 and "thing 'ghost' does not exist" in output
    code, output = cli("jobs", "create", "--data-dir", str(data_dir))
    assert code == 2 and "at least one --thing or --group" in output
    info = json.loads(cli("jobs", "describe", "j1", "--json", "--data-dir", str(data_dir))[1])
    assert info["executions"] == {"PENDING_ROLLOUT": 1}  # rolls out when an engine starts
    code, output = cli("jobs", "describe", "nope", "--data-dir", str(data_dir))
    assert code == 2 and "does not exist" in output


@pytest.fixture
def running(data_dir: Path) -> Iterator[EngineThread]:
    with EngineThread(EngineConfig(data_dir, port=0), admin=True) as engine:
        yield engine


def test_commands_reach_a_running_engine(running: EngineThread, data_dir: Path, tmp_path: Path) -> None:
    code, output = cli(
        "local",
        "provision",
        "dev1",
        "--out",
        str(tmp_path / "dev1"),
        "--data-dir",
        str(data_dir),
        "--group",
        "g",
    )
    assert code == 0, output
    toml = (tmp_path / "dev1" / "device.toml").read_text()
    assert f"port = {running.port}" in toml  # provisioning asked the running engine for its port

    assert cli("local", "rule", "disable", "create", "--data-dir", str(data_dir))[0] == 0
    assert running.call(lambda e: e.rule_enabled("create")) is False  # the live engine switched

    code, output = cli(
        "jobs",
        "create",
        "--group",
        "g",
        "--job-id",
        "live",
        "--in-progress-timeout-minutes",
        "3",
        "--data-dir",
        str(data_dir),
    )
    assert code == 0 and "no engine running" not in output
    execution = running.call(lambda e: e.jobs.execution("dev1", "live"))
    assert execution is not None and execution.status.value == "QUEUED"  # released by the live engine

    code, output = cli("jobs", "create", "--group", "g", "--job-id", "live", "--data-dir", str(data_dir))
    assert code == 2 and "already exists" in output
    assert cli("jobs", "cancel", "live", "--data-dir", str(data_dir))[0] == 0
    execution = running.call(lambda e: e.jobs.execution("dev1", "live"))
    assert execution is not None and execution.status.value == "CANCELED"

    cert_id = crypto.certificate_id((tmp_path / "dev1" / "device.pem.crt").read_bytes())
    assert cli("local", "certificate", "set-status", cert_id, "INACTIVE", "--data-dir", str(data_dir))[0] == 0
    cert = running.call(lambda e: e.registry.certificate(cert_id))
    assert cert is not None and cert.status is CertificateStatus.INACTIVE
    notes = json.loads(cli("local", "notifications", "--json", "--data-dir", str(data_dir))[1])
    assert isinstance(notes, list)


def test_cancel_needs_a_running_engine(data_dir: Path) -> None:
    code, output = cli("jobs", "cancel", "x", "--data-dir", str(data_dir))
    assert code == 2 and "needs the running engine" in output


def test_demo_json_reports_a_verified_fleet() -> None:
    code, output = cli("demo", "--devices", "3", "--json")
    assert code == 0, output
    summary = json.loads(output)
    for key in (
        "devices",
        "succeeded",
        "failed",
        "timed_out",
        "verified",
        "duration_s",
        "rotations_per_s",
        "p50_s",
        "p99_s",
    ):
        assert key in summary
    assert (summary["devices"], summary["succeeded"], summary["verified"], summary["failed"]) == (3, 3, 3, 0)


def test_demo_with_one_rotation_at_a_time_still_rotates_every_device() -> None:
    # Admission end to end with real agents: each device is notified only once the previous one ended.
    code, output = cli("demo", "--devices", "3", "--json", "--max-in-flight", "1")
    assert code == 0, output
    summary = json.loads(output)
    assert (summary["succeeded"], summary["verified"]) == (3, 3)


def test_demo_rejects_bad_options() -> None:
    code, output = cli("demo", "--key-algorithm", "ECDSA-P256", "--signing-algorithm", "SHA256WITHRSA")
    assert code == 2 and "does not match key algorithm" in output
    code, output = cli("demo", "--devices", "0")
    assert code == 2 and "at least 1" in output
    code, output = cli("demo", "--max-in-flight", "-1")
    assert code == 2 and "Invalid value for '--max-in-flight'" in output


def test_expiry_report_lists_certificates_by_days_left(data_dir: Path, tmp_path: Path) -> None:
    from certrotator.local.ca import IssuerName

    cli("local", "provision", "iot-dev", "--out", str(tmp_path / "a"), "--data-dir", str(data_dir))
    # the private CA issues with the engine's configured validity (365 days by default)
    cli(
        "local",
        "provision",
        "pca-dev",
        "--out",
        str(tmp_path / "b"),
        "--data-dir",
        str(data_dir),
        "--issuer",
        IssuerName.PRIVATE_CA.value,
    )
    soon = json.loads(
        cli("local", "certificates", "--json", "--expiring-within-days", "400", "--data-dir", str(data_dir))[
            1
        ]
    )
    assert [c["thing"] for c in soon] == ["pca-dev"]  # the AWS-IoT-style one lasts until 2049
    assert 360 < soon[0]["daysLeft"] <= 365
    everything = json.loads(cli("local", "certificates", "--json", "--data-dir", str(data_dir))[1])
    assert [c["thing"] for c in everything] == ["pca-dev", "iot-dev"]  # soonest first


def _flat(output: str) -> str:
    """The console wraps long lines: compare words."""
    return " ".join(output.split())


def _provision(data_dir: Path, tmp_path: Path, thing: str) -> str:
    code, output = cli(
        "local", "provision", thing, "--out", str(tmp_path / thing), "--data-dir", str(data_dir)
    )
    assert code == 0, output
    return crypto.certificate_id((tmp_path / thing / "device.pem.crt").read_bytes())


def test_certificate_detach_and_delete_for_what_reconcile_leaves_to_an_operator(
    data_dir: Path, tmp_path: Path
) -> None:
    kept, spare = _provision(data_dir, tmp_path, "dev1"), _provision(data_dir, tmp_path, "dev2")
    d = ("--data-dir", str(data_dir))
    # an ACTIVE attached certificate may be the device's only working one
    code, output = cli("local", "certificate", "delete", spare, *d)
    assert code == 2 and "ACTIVE and attached to 'dev2'" in _flat(output) and "--force" in _flat(output)
    code, output = cli("local", "certificate", "detach", spare, "--thing", "dev1", *d)
    assert code == 2 and "not attached to 'dev1'" in _flat(output)
    code, output = cli("local", "certificate", "detach", spare, "--thing", "dev2", *d)
    assert code == 0, output
    code, output = cli("local", "certificate", "delete", spare, *d)  # detached: allowed
    assert code == 0 and f"deleted {spare}" in _flat(output)
    code, output = cli("local", "certificate", "delete", spare, *d)
    assert code == 2 and "does not exist" in _flat(output)
    code, output = cli("local", "certificate", "delete", kept, "--force", *d)
    assert code == 0, output
    things = json.loads(cli("local", "things", "--json", *d)[1])
    assert [(t["thing"], t["certificates"]) for t in things] == [("dev1", []), ("dev2", [])]
    certificates = json.loads(cli("local", "certificates", "--json", *d)[1])
    assert certificates == []


def test_local_up_reconcile_every_runs_reconcile_inside_the_engine(data_dir: Path, tmp_path: Path) -> None:
    """A thing left with no certificate (an operator detached it) is reported by the engine's own
    periodic reconcile, without anyone running `certrotator reconcile`."""
    lonely = _provision(data_dir, tmp_path, "lonely")
    assert (
        cli("local", "certificate", "detach", lonely, "--thing", "lonely", "--data-dir", str(data_dir))[0]
        == 0
    )
    with EngineProcess(data_dir, ["--reconcile-every", "0.1"]) as engine:
        remote = RemoteEngine(data_dir)
        try:

            def reported() -> bool:
                return any(n.get("thingName") == "lonely" for n in remote.notifications())

            assert remote.wait_for(reported, 30), engine.log.read_text()[-2000:]
            (note,) = [n for n in remote.notifications() if n.get("thingName") == "lonely"]
            assert "no-certificate" in json.dumps(note)
        finally:
            remote.close()


def test_deleting_a_certificate_in_use_through_the_running_engine_cuts_its_connection(
    running: EngineThread, data_dir: Path, tmp_path: Path
) -> None:
    cert_id = _provision(data_dir, tmp_path, "inuse")
    device = Device(
        "inuse",
        tmp_path / "inuse" / "device.pem.crt",
        tmp_path / "inuse" / "private.pem.key",
        tmp_path / "inuse" / "AmazonRootCA1.pem",
        cert_id,
    )
    client = PahoClient(running.port, device)
    try:
        assert client.connect() == 0
        code, output = cli(
            "local", "certificate", "detach", cert_id, "--thing", "inuse", "--data-dir", str(data_dir)
        )
        assert code == 0, output
        code, output = cli("local", "certificate", "delete", cert_id, "--data-dir", str(data_dir))
        assert code == 2 and "in use by inuse" in _flat(output)  # detached, but the device is still connected
        code, output = cli("local", "certificate", "delete", cert_id, "--force", "--data-dir", str(data_dir))
        assert code == 0, output
        assert client.disconnected.wait(10)
        assert running.call(lambda e: e.registry.certificate(cert_id)) is None
    finally:
        client.close()


def test_describe_shows_a_device_update_the_jobs_api_refused(
    running: EngineThread, data_dir: Path, tmp_path: Path
) -> None:
    """A device whose update is refused gets /rejected and its execution stays QUEUED: describe says
    which update, why and when, in the table and in JSON."""
    cert_id = _provision(data_dir, tmp_path, "stuck")
    device = Device(
        "stuck",
        tmp_path / "stuck" / "device.pem.crt",
        tmp_path / "stuck" / "private.pem.key",
        tmp_path / "stuck" / "AmazonRootCA1.pem",
        cert_id,
    )
    client = PahoClient(running.port, device)
    try:
        assert client.connect() == 0
        client.subscribe("$aws/things/stuck/jobs/+/update/+")
        assert (
            cli("jobs", "create", "--thing", "stuck", "--job-id", "j1", "--data-dir", str(data_dir))[0] == 0
        )
        update = {"status": "IN_PROGRESS", "statusDetails": {"CertificateRotator": {"phase": 1}}}
        client.publish("$aws/things/stuck/jobs/j1/update", json.dumps(update).encode())
        reply = client.next_message()
        assert reply.topic == "$aws/things/stuck/jobs/j1/update/rejected"
        reason = json.loads(reply.payload)["message"]
    finally:
        client.close()
    code, output = cli("jobs", "describe", "j1", "--json", "--data-dir", str(data_dir))
    assert code == 0, output
    info = json.loads(output)
    assert info["executions"] == {"QUEUED": 1}
    (rejection,) = info["rejections"]
    assert {k: rejection[k] for k in ("thing", "status", "requestedStatus", "code", "reason")} == {
        "thing": "stuck",
        "status": "QUEUED",
        "requestedStatus": "IN_PROGRESS",
        "code": "InvalidRequest",
        "reason": reason,
    }
    rejected_at = datetime.fromisoformat(rejection["rejectedAt"].replace("Z", "+00:00"))
    assert abs(rejected_at.timestamp() - time.time()) < 60
    code, output = cli("jobs", "describe", "j1", "--data-dir", str(data_dir))
    assert code == 0
    assert "Rejected device updates" in output and "InvalidRequest" in output and "stuck" in output


def test_empty_listings_keep_their_title_and_headings(data_dir: Path) -> None:
    for command, title, heading in [
        ("things", "Things", "certificates"),
        ("certificates", "Certificates", "daysLeft"),
        ("jobs", "Jobs", "executions"),
        ("notifications", "Notifications", "outcome"),
    ]:
        code, output = cli("local", command, "--data-dir", str(data_dir))
        assert code == 0, output
        assert title in output and heading in output and "none" in output, output
        assert json.loads(cli("local", command, "--json", "--data-dir", str(data_dir))[1]) == []


def test_errors_are_one_line_when_the_output_is_not_a_terminal(data_dir: Path, tmp_path: Path) -> None:
    """A long error stays on one line for whoever reads the pipe (rich wrapped it at 80 columns)."""
    blocker = tmp_path / "a-file-where-a-directory-should-be"
    blocker.write_text("")
    out = blocker / ("a-rather-long-directory-name-" * 3) / "dev1"
    result = runner.invoke(
        app, ["local", "provision", "dev1", "--out", str(out), "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: [Errno 20] Not a directory: ")  # its brackets are not markup
    assert str(blocker) in line and len(line) > 80
