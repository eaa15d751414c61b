"""Hostile create replies against real agents (file key store) and the real engine (issue 13).

The engine's create rule is switched off, so no backend answers; a hook on the broker answers each
device's create request instead, each device with a different hostile reply: a certificate for another
key, an expired or not-yet-valid one, one from an issuer the broker does not trust, garbage PEM, a
payload that is not JSON, and a good certificate sent on another thing's topic. Whatever arrives, the
rotation job fails with the device's reason in statusDetails, nothing new stays on the device, and the
old pair keeps working (the device reconnects with it). Only the untrusted issuer gets as far as the
key store: the device holds no client CA, so the broker refuses it and the device rolls back."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from certrotator import crypto
from certrotator.local.engine import LocalIoTCore
from certrotator.local.policy import Connection
from certrotator.protocol import (
    FAILURE_REASON_KEY,
    CreateCertificateRequest,
    JobExecutionStatus,
    Topics,
    certificate_accepted,
    encode,
)
from certrotator.sim.fleet import SimulatedDevice

from .harness import Fleet, running_fleet

pytestmark = pytest.mark.timeout(120)

STATE_TIMEOUT_S = 3.0
GARBAGE_PEM = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
ROTATE = "hostile-replies"

Reply = tuple[str, bytes]  # topic, payload
Forge = Callable[[LocalIoTCore, str, CertificatePublicKeyTypes, x509.Name], Reply]


def _accepted(thing: str, certificate: x509.Certificate) -> Reply:
    return Topics.accepted(Topics.create(thing)), encode(
        certificate_accepted(crypto.certificate_pem(certificate))
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# Each case: the reply to the device's create request, and what the device must report.
def another_key(e: LocalIoTCore, thing: str, _key: CertificatePublicKeyTypes, subject: x509.Name) -> Reply:
    other = crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P256).public_key()
    return _accepted(thing, e.ca.iot.issue(other, subject))


def expired(e: LocalIoTCore, thing: str, key: CertificatePublicKeyTypes, subject: x509.Name) -> Reply:
    issuer = dataclasses.replace(e.ca.iot, validity_days=1)
    return _accepted(thing, issuer.issue(key, subject, now=_now() - dt.timedelta(days=30)))


def not_yet_valid(e: LocalIoTCore, thing: str, key: CertificatePublicKeyTypes, subject: x509.Name) -> Reply:
    return _accepted(thing, e.ca.iot.issue(key, subject, now=_now() + dt.timedelta(days=30)))


def garbage_pem(_e: LocalIoTCore, thing: str, _key: CertificatePublicKeyTypes, _s: x509.Name) -> Reply:
    return Topics.accepted(Topics.create(thing)), encode(certificate_accepted(GARBAGE_PEM))


def not_json(_e: LocalIoTCore, thing: str, _key: CertificatePublicKeyTypes, _s: x509.Name) -> Reply:
    return Topics.accepted(Topics.create(thing)), b"\xff\xfe{certificatePem"


def the_ca_itself(e: LocalIoTCore, thing: str, _key: CertificatePublicKeyTypes, _s: x509.Name) -> Reply:
    return _accepted(thing, e.ca.iot.certificate)


def untrusted_issuer(
    e: LocalIoTCore, thing: str, key: CertificatePublicKeyTypes, subject: x509.Name
) -> Reply:
    # The right key and the trusted CA's name, signed by another key: only a verifier of the chain (the
    # broker, not the device, which holds no client CA) can tell.
    forger = dataclasses.replace(e.ca.iot, key=crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P256))
    return _accepted(thing, forger.issue(key, subject))


def another_things_topic(
    e: LocalIoTCore, _thing: str, key: CertificatePublicKeyTypes, subject: x509.Name
) -> Reply:
    # A good certificate for the right key, on a topic this device is not subscribed to (and may not be).
    return _accepted("someone-else", e.ca.iot.issue(key, subject))


CASES: dict[str, tuple[Forge, str]] = {
    "another key": (another_key, "the new certificate is not for the key this device generated"),
    "the CA's own certificate": (
        the_ca_itself,
        "the new certificate is not for the key this device generated",
    ),
    "garbage PEM": (garbage_pem, "installing the new certificate failed: the new certificate is unusable"),
    "not JSON": (not_json, "no reply in 3 s while CreatingCertificate"),
    "another thing's topic": (another_things_topic, "no reply in 3 s while CreatingCertificate"),
    "expired": (expired, "installing the new certificate failed: the new certificate is no longer valid"),
    "not yet valid": (
        not_yet_valid,
        "installing the new certificate failed: the new certificate is not valid yet",
    ),
    "an untrusted issuer": (untrusted_issuer, ""),
}
# Installed, then refused by the broker: the device rolls back (the net under what it cannot check).
INSTALLED_THEN_ROLLED_BACK = ["an untrusted issuer"]
OUTSIDE_VALIDITY = ["expired", "not yet valid"]


@dataclasses.dataclass
class Run:
    fleet: Fleet
    devices: dict[str, SimulatedDevice]  # case -> device
    installed: set[str]  # things whose key store accepted a certificate
    reasons: dict[str, str]  # thing -> DeviceFailureReason
    statuses: dict[str, str]


def _rotate_against_hostile_replies(fleet: Fleet, cases: list[str]) -> Run:
    provisioned = fleet.provision(len(cases), state_timeout_s=STATE_TIMEOUT_S)
    devices = dict(zip(cases, provisioned, strict=True))
    forge = {device.thing: CASES[case][0] for case, device in devices.items()}
    fleet.start_agents()
    installed: set[str] = set()
    for device in provisioned:  # count what each key store really took
        assert device.agent is not None
        store = device.agent.store
        take = store.install

        def install(
            job_id: str, pem: str, take: Callable[[str, str], None] = take, thing: str = device.thing
        ) -> None:
            take(job_id, pem)
            installed.add(thing)

        store.install = install  # type: ignore[method-assign]

    def answer(topic: str, payload: bytes, connection: Connection, e: LocalIoTCore) -> None:
        if topic != Topics.create(connection.thing) or connection.thing not in forge:
            return
        request = crypto.inspect_csr(CreateCertificateRequest.parse(payload).csr)
        reply_topic, reply = forge[connection.thing](e, connection.thing, request.public_key, request.subject)
        e.broker.publish_nowait(reply_topic, reply, 1)

    def arm(e: LocalIoTCore) -> None:
        e.set_rule_enabled("create", False)
        e.broker.on_message(lambda t, p, c: answer(t, p, c, e))

    fleet.engine.call(arm)
    report = fleet.run_job(ROTATE, timeout_s=60, unlimited_rollout=True)
    executions = {e.thing: e for e in fleet.engine.executions(ROTATE)}
    reasons = {t: e.status_details.get(FAILURE_REASON_KEY, "") for t, e in executions.items()}
    return Run(fleet, devices, installed, reasons, report.statuses)


def _back_on_the_old_pair(run: Run) -> None:
    """Every device is connected with its first certificate, has it on disk with its key, no backup;
    the registry holds the first certificates only; and a fresh agent comes up with the old pair."""
    wanted = {(d.thing, d.first_certificate_id) for d in run.devices.values()}

    def connected(engine: LocalIoTCore) -> bool:
        return wanted <= {(c.thing, c.principal) for c in engine.broker.connections()}

    assert run.fleet.engine.wait_until(connected, 30, tick_s=0.05), (
        "a device did not come back on its old pair"
    )
    for device in run.devices.values():
        assert device.certificate_id() == device.first_certificate_id and device.pair_matches()
        assert not device.config.certificate.with_name(device.config.certificate.name + ".bak").exists()
    registered = run.fleet.engine.call(lambda e: sorted(c.certificate_id for c in e.registry.certificates()))
    assert registered == sorted(d.first_certificate_id for d in run.devices.values())
    run.fleet.stop_agents()
    run.fleet.start_agents(list(run.devices.values()), timeout_s=30)
    assert run.fleet.engine.wait_until(connected, 30, tick_s=0.05), "the old pair no longer connects"


def test_hostile_create_replies_are_never_installed_and_fail_the_job_with_the_reason(tmp_path: Path) -> None:
    cases = [c for c in CASES if c not in INSTALLED_THEN_ROLLED_BACK + OUTSIDE_VALIDITY]
    with running_fleet(tmp_path) as fleet:
        run = _rotate_against_hostile_replies(fleet, cases)
        for case, device in run.devices.items():
            assert run.statuses[device.thing] == JobExecutionStatus.FAILED.value, case
            assert CASES[case][1] in run.reasons[device.thing], (case, run.reasons[device.thing])
        assert run.installed == set()
        _back_on_the_old_pair(run)


def test_certificates_the_broker_refuses_fail_the_job_and_the_old_pair_keeps_working(tmp_path: Path) -> None:
    """The job fails with a reason and the device ends on its old, working pair: the new pair cannot
    connect, so the device rolls back. (What the device can check itself, the dates: next test.)"""
    with running_fleet(tmp_path) as fleet:
        run = _rotate_against_hostile_replies(fleet, INSTALLED_THEN_ROLLED_BACK)
        for case, device in run.devices.items():
            assert run.statuses[device.thing] == JobExecutionStatus.FAILED.value, case
            assert run.reasons[device.thing], case
        _back_on_the_old_pair(run)


def test_certificates_outside_their_validity_are_never_installed(tmp_path: Path) -> None:
    """The key store refuses them before any change, and the job fails with their dates."""
    with running_fleet(tmp_path) as fleet:
        run = _rotate_against_hostile_replies(fleet, OUTSIDE_VALIDITY)
        assert run.installed == set()
        for case, device in run.devices.items():
            reason = run.reasons[device.thing]
            assert run.statuses[device.thing] == JobExecutionStatus.FAILED.value, case
            assert CASES[case][1] in reason, (case, reason)
            assert re.search(r"its not(Before|After) \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", reason), reason
        _back_on_the_old_pair(run)
