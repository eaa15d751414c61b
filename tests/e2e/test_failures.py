"""Failure scenarios end to end: each asserts the final job status, the device's credentials, the
registry and the notifications (DESIGN.md §4's invariants)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from certrotator.backend.ports import CertificateStatus, IssuedCertificate
from certrotator.device.journal import CRASH_ENV
from certrotator.device.settings import ConfigError
from certrotator.device.standalone.config import load_device_config
from certrotator.local.adapters import IssuerPort
from certrotator.local.engine import LocalIoTCore
from certrotator.local.operations import JobRequest
from certrotator.sim.fleet import SimulatedDevice, SimulatedFleet

from .harness import running_fleet

pytestmark = pytest.mark.timeout(120)

STATE_TIMEOUT_S = 3.0  # per-state timeout of the agents: short, with room for a loaded CI machine


def registry_of(fleet: SimulatedFleet, device: SimulatedDevice) -> tuple[list[str], list[str]]:
    """(certificates attached to the thing, ids of every certificate in the registry)."""

    def read(engine: LocalIoTCore) -> tuple[list[str], list[str]]:
        return engine.registry.thing_principals(device.thing), [
            c.certificate_id for c in engine.registry.certificates()
        ]

    return fleet.engine.call(read)


def notifications(fleet: SimulatedFleet, job_id: str) -> dict[str, dict[str, object]]:
    notes = fleet.engine.call(lambda e: e.registry.notifications())
    return {str(n["thingName"]): n for n in notes if n.get("jobId") == job_id}


def wait_back_online_with_first_certificates(fleet: SimulatedFleet, devices: list[SimulatedDevice]) -> None:
    """A device reports FAILED *before* it rolls back and reconnects; wait for the reconnection (with
    the old certificate) so the files are checked after the rollback, not during it."""
    wanted = {(d.thing, d.first_certificate_id) for d in devices}

    def back(engine: LocalIoTCore) -> bool:
        return wanted <= {(c.thing, c.principal) for c in engine.broker.connections()}

    assert fleet.engine.wait_until(back, 30, tick_s=0.05), "devices did not reconnect with their old pair"


def assert_back_on_the_old_pair(fleet: SimulatedFleet, devices: list[SimulatedDevice]) -> None:
    wait_back_online_with_first_certificates(fleet, devices)
    for device in devices:
        assert device.pair_matches()
        assert device.certificate_id() == device.first_certificate_id
        attached, registered = registry_of(fleet, device)
        assert attached == [device.first_certificate_id]
        assert device.first_certificate_id in registered
        assert not device.config.certificate.with_name("device.pem.crt.bak").exists()


def still_works(fleet: SimulatedFleet, devices: list[SimulatedDevice]) -> None:
    """The old pair still connects: a fresh agent comes up with it."""
    fleet.stop_agents()
    fleet.start_agents(devices, timeout_s=30)

    def live(engine: LocalIoTCore) -> set[str]:
        return {c.principal for c in engine.broker.connections()}

    principals = fleet.engine.call(live)
    assert {d.first_certificate_id for d in devices} <= principals


def test_create_rule_disabled_fails_every_execution(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        devices = fleet.provision(2, state_timeout_s=STATE_TIMEOUT_S)
        fleet.start_agents()
        fleet.engine.call(lambda e: e.set_rule_enabled("create", False))

        report = fleet.run_job("no-create", timeout_s=60, unlimited_rollout=True)

        assert set(report.statuses.values()) == {"FAILED"}
        reasons = {p.thing: p.what for p in report.problems}
        assert all(
            "no reply" in reasons[d.thing] and "CreatingCertificate" in reasons[d.thing] for d in devices
        )
        assert_back_on_the_old_pair(fleet, devices)
        notes = notifications(fleet, "no-create")
        assert set(notes) == {d.thing for d in devices}
        assert all("nothing to clean up" in str(n["outcome"]) for n in notes.values())
        still_works(fleet, devices)


def test_new_certificates_deactivated_right_after_issue_roll_back(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        devices = fleet.provision(2, state_timeout_s=STATE_TIMEOUT_S)
        fleet.start_agents()

        def sabotage(engine: LocalIoTCore) -> None:
            port = engine.ports.issuer
            assert isinstance(port, IssuerPort)
            original = port.issue

            def issue_then_deactivate(thing: str, csr_pem: str) -> IssuedCertificate:
                issued = original(thing, csr_pem)
                engine.registry.set_certificate_status(issued.certificate_id, CertificateStatus.INACTIVE)
                return issued

            port.issue = issue_then_deactivate  # type: ignore[method-assign]

        fleet.engine.call(sabotage)
        report = fleet.run_job("deactivated", timeout_s=60, unlimited_rollout=True)

        assert set(report.statuses.values()) == {"FAILED"}
        reasons = {p.thing: p.what for p in report.problems}
        assert all(
            "restarted or reconnected mid-rotation without new credentials" in reasons[d.thing]
            for d in devices
        )
        assert_back_on_the_old_pair(fleet, devices)
        for device in devices:
            _, registered = registry_of(fleet, device)
            assert registered.count(device.first_certificate_id) == 1
        # the backend deleted the new certificates: only the first ones remain
        assert len(fleet.engine.call(lambda e: e.registry.certificates())) == len(devices)
        assert all(
            "new certificate deleted" in str(n["outcome"])
            for n in notifications(fleet, "deactivated").values()
        )
        still_works(fleet, devices)


def test_commit_rule_disabled_rolls_back(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        devices = fleet.provision(2, state_timeout_s=STATE_TIMEOUT_S)
        fleet.start_agents()
        fleet.engine.call(lambda e: e.set_rule_enabled("commit", False))

        report = fleet.run_job("no-commit", timeout_s=60, unlimited_rollout=True)

        assert set(report.statuses.values()) == {"FAILED"}
        reasons = {p.thing: p.what for p in report.problems}
        assert all("CommittingCertificate" in reasons[d.thing] for d in devices)
        assert_back_on_the_old_pair(fleet, devices)
        assert len(fleet.engine.call(lambda e: e.registry.certificates())) == len(devices)
        still_works(fleet, devices)


def run_agent_until_crash(
    fleet: SimulatedFleet, device: SimulatedDevice, crash_point: str, job_id: str, **job_options: object
) -> None:
    """Run the shipped standalone agent as a process that dies (SIGKILL-like, exit 86) at
    `crash_point`, and create the job that drives it there."""
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "certrotator.device.standalone.runtime",
            str(device.directory / "device.toml"),
        ],
        env={**os.environ, CRASH_ENV: crash_point},
    )
    try:
        request = JobRequest(job_id, things=(device.thing,), unlimited_rollout=True, **job_options)  # type: ignore[arg-type]
        fleet.engine.call(lambda e: e.create_job(request))
        assert agent.wait(timeout=60) == 86, f"the agent did not die at {crash_point}"
    finally:
        if agent.poll() is None:
            agent.kill()


def test_device_killed_after_install_and_offline_past_the_timeout(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        (device,) = fleet.provision(1, state_timeout_s=STATE_TIMEOUT_S)
        # dies right after installing the new credentials, then stays offline past the timeout
        run_agent_until_crash(
            fleet, device, "files.install.installed", "killed", in_progress_timeout_minutes=2.0 / 60
        )
        # on disk: the new pair, with the old one backed up
        assert device.pair_matches()
        assert device.certificate_id() != device.first_certificate_id

        report = fleet.wait_job("killed", timeout_s=60)
        assert report.statuses == {device.thing: "TIMED_OUT"}
        note = notifications(fleet, "killed")[device.thing]
        assert note["status"] == "TIMED_OUT" and "new certificate deleted" in str(note["outcome"])

        # back online: the new certificate was deleted, so the agent rolls back and works on the old pair
        fleet.start_agents([device], timeout_s=30)
        assert_back_on_the_old_pair(fleet, [device])

        def live(engine: LocalIoTCore) -> set[str]:
            return {c.principal for c in engine.broker.connections() if c.thing == device.thing}

        assert fleet.engine.call(live) == {device.first_certificate_id}


@pytest.mark.parametrize(
    ("key", "signing", "message"),
    [
        ("RSA-2048", "ECDSA-WITH-SHA256", "does not match key algorithm RSA-2048"),
        ("ECDSA-P256", "SHA256WITHRSA", "does not match key algorithm ECDSA-P256"),
        ("RSA-1024", "SHA256WITHRSA", "unknown key algorithm 'RSA-1024'"),
        ("ECDSA-P256", "SHA1WITHECDSA", "unknown signing algorithm 'SHA1WITHECDSA'"),
    ],
)
def test_invalid_agent_configuration_is_rejected_and_nothing_rotates(
    tmp_path: Path, key: str, signing: str, message: str
) -> None:
    with running_fleet(tmp_path) as fleet:
        (device,) = fleet.provision(1)
        toml = device.directory / "device.toml"
        text = toml.read_text()
        text = text.replace('key_algorithm = "ECDSA-P256"', f'key_algorithm = "{key}"')
        text = text.replace('signing_algorithm = "ECDSA-WITH-SHA256"', f'signing_algorithm = "{signing}"')
        toml.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_device_config(toml)
        assert device.certificate_id() == device.first_certificate_id
        assert registry_of(fleet, device)[0] == [device.first_certificate_id]


def test_device_killed_mid_commit_finishes_the_rotation_after_restart(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        (device,) = fleet.provision(1, state_timeout_s=STATE_TIMEOUT_S)
        device.certificate_before_job = device.first_certificate_id  # what verify() expects to be gone
        # dies with the backup deleted, before reporting SUCCEEDED
        run_agent_until_crash(fleet, device, "files.commit.cert_backup_deleted", "mid-commit")
        assert fleet.statuses("mid-commit") == {device.thing: "IN_PROGRESS"}

        fleet.start_agents([device], timeout_s=30)
        report = fleet.wait_job("mid-commit", timeout_s=60)
        fleet.verify(report)
        assert report.statuses == {device.thing: "SUCCEEDED"}
        assert report.problems == []
        assert device.certificate_id() != device.first_certificate_id
        assert not (device.directory / ".certrotator-journal.json.committed").exists()
