"""The three handlers over in-memory ports: every precondition, the CSR policy, the terminal table."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from certrotator import crypto
from certrotator.backend.handlers import (
    handle_commit_certificate,
    handle_create_certificate,
    handle_job_execution_terminal,
)
from certrotator.backend.ports import CertificateRecord, CertificateStatus, PermanentFailure, RotationState
from certrotator.protocol import (
    FAILURE_REASON_KEY,
    BrokerContext,
    CommitCertificateRequest,
    CreateCertificateRequest,
    JobExecutionStatus,
    RotationProgress,
)

from .fakes import World

CREATE = "awslabs/things/dev1/certificate/create"
COMMIT = "awslabs/things/dev1/certificate/commit"


@pytest.fixture
def world() -> World:
    return World()


def created(world: World) -> tuple[crypto.PrivateKey, str]:
    """Run a successful create; return the new key and the new certificate id."""
    key, csr = world.new_csr()
    result = handle_create_certificate(*world.create_request(csr), world.ports)
    assert result.outcome == "accepted", result.reason
    return key, world.issuer.issued[-1]


# ------------------------------------------------------------------------------------------- create


def test_create_issues_attaches_records_and_replies(world: World) -> None:
    key, csr = world.new_csr()
    result = handle_create_certificate(*world.create_request(csr), world.ports)

    assert result.outcome == "accepted"
    topic, message = world.last_message()
    assert topic == f"{CREATE}/accepted"
    cert = crypto.load_certificate(message["certificatePem"])
    assert crypto.certificate_matches_key(cert, key)
    assert cert.subject == world.subject
    new_id = crypto.certificate_id(cert)
    assert world.issuer.issued == [new_id]
    assert world.registry.things["dev1"] == [world.cert_id, new_id]
    assert world.registry.policies[new_id] == ["DevicePolicy"]
    assert world.state.states["dev1"] == RotationState(
        world.job_id, world.cert_id, new_id, RotationProgress.CREATED
    )
    assert world.notifier.notifications == []


def test_create_accepts_greengrass_extra_connection_client_id(world: World) -> None:
    _, csr = world.new_csr()
    result = handle_create_certificate(*world.create_request(csr, client_id="dev1#2"), world.ports)
    assert result.outcome == "accepted"


def _other_subject_csr(world: World) -> str:
    key = crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P256)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")])
    return crypto.build_csr(key, crypto.SigningAlgorithm.ECDSA_WITH_SHA256, name)


def _same_key_csr(world: World) -> str:
    return crypto.build_csr(world.key, crypto.SigningAlgorithm.ECDSA_WITH_SHA256, world.subject)


def _weak_rsa_csr(world: World) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return crypto.build_csr(key, crypto.SigningAlgorithm.SHA256WITHRSA, world.subject)


def _tampered_csr(world: World) -> str:
    _, pem = world.new_csr()
    csr = x509.load_pem_x509_csr(pem.encode())
    from cryptography.hazmat.primitives import serialization

    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    import base64

    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


Request = tuple[BrokerContext, CreateCertificateRequest]
Setup = Callable[[World], Request]


def _request(
    principal: str | None = None,
    client_id: str | None = None,
    job_id: str | None = None,
    csr: str | None = None,
) -> Setup:
    def build(world: World) -> Request:
        return world.create_request(csr or world.new_csr()[1], principal, client_id, job_id)

    return build


def _with(mutate: Callable[[World], None], csr: Callable[[World], str] | None = None) -> Setup:
    def build(world: World) -> Request:
        mutate(world)
        pem = csr(world) if csr else world.new_csr()[1]
        return world.create_request(pem)

    return build


def _second_cert(world: World) -> None:
    world.registry.things["dev1"].append("f" * 64)


def _inactive(world: World) -> None:
    rec = world.registry.certificates[world.cert_id]
    world.registry.certificates[world.cert_id] = CertificateRecord(
        rec.certificate_id, rec.pem, CertificateStatus.INACTIVE
    )


# Requests that do not parse never reach the handler: tests/aws/test_lambdas.py checks their replies.
CREATE_REJECTIONS: list[tuple[str, Setup, str]] = [
    ("client id of another thing", _request(client_id="dev10"), "does not match thing name"),
    ("unknown job", _request(job_id="other-job"), "has no execution of job 'other-job'"),
    (
        "execution queued",
        _with(lambda w: w.set_execution(JobExecutionStatus.QUEUED)),
        "QUEUED, not IN_PROGRESS",
    ),
    ("execution done", _with(lambda w: w.set_execution(JobExecutionStatus.SUCCEEDED)), "SUCCEEDED, not IN_P"),
    (
        "not a rotation job",
        _with(lambda w: w.set_execution(JobExecutionStatus.IN_PROGRESS, {"operation": "REBOOT"})),
        "not a certificate rotation job",
    ),
    ("thing unknown", _with(lambda w: w.registry.things.pop("dev1")), "is not in the registry"),
    (
        "no certificate",
        _with(lambda w: w.registry.things["dev1"].clear()),
        "exactly one certificate attached, found 0",
    ),
    ("two certificates", _with(_second_cert), "exactly one certificate attached, found 2"),
    ("another principal", _request(principal="e" * 64), "not authenticated by the thing's certificate"),
    ("certificate inactive", _with(_inactive), "INACTIVE, not ACTIVE"),
    ("garbage csr", _request(csr="-----BEGIN CERTIFICATE REQUEST-----\nnope\n"), "not a well-formed PEM"),
    ("tampered csr", _with(lambda w: None, _tampered_csr), "CSR signature does not verify"),
    ("weak rsa", _with(lambda w: None, _weak_rsa_csr), "RSA key of 1024 bits is too small"),
    ("same key", _with(lambda w: None, _same_key_csr), "reuses the current certificate's key"),
    ("other subject", _with(lambda w: None, _other_subject_csr), "differs from the current certificate's"),
    # an infrastructure error's text (which can name accounts and roles) stays in the log
    (
        "issuer down",
        _with(lambda w: setattr(w.issuer, "fail", True)),
        "refused the CSR: RuntimeError (details in",
    ),
]


@pytest.mark.parametrize(
    ("case", "setup", "reason"), CREATE_REJECTIONS, ids=[c[0] for c in CREATE_REJECTIONS]
)
def test_create_rejections_tell_the_device_why_and_issue_nothing(
    world: World, case: str, setup: Setup, reason: str
) -> None:
    context, request = setup(world)
    principals_before = list(world.registry.things.get("dev1", []))
    result = handle_create_certificate(context, request, world.ports)

    assert result.outcome == "rejected"
    assert reason in result.reason
    topic, message = world.last_message()
    assert topic == f"{CREATE}/rejected"
    assert reason in message["errorMsg"]
    assert world.issuer.issued == []
    assert world.state.states == {}
    assert world.registry.things.get("dev1", []) == principals_before


@pytest.mark.parametrize(
    ("key_algorithm", "signing"),
    [
        (crypto.KeyAlgorithm.RSA_2048, crypto.SigningAlgorithm.SHA256WITHRSAANDMGF1),
        (crypto.KeyAlgorithm.ECDSA_P384, crypto.SigningAlgorithm.ECDSA_WITH_SHA384),
        (crypto.KeyAlgorithm.ECDSA_P521, crypto.SigningAlgorithm.ECDSA_WITH_SHA512),
    ],
)
def test_create_accepts_each_allowed_key_family(
    world: World, key_algorithm: crypto.KeyAlgorithm, signing: crypto.SigningAlgorithm
) -> None:
    _, csr = world.new_csr(key_algorithm, signing)
    assert handle_create_certificate(*world.create_request(csr), world.ports).outcome == "accepted"


def test_repeated_create_with_the_same_csr_resends_without_issuing_again(world: World) -> None:
    _, csr = world.new_csr()
    handle_create_certificate(*world.create_request(csr), world.ports)
    first_pem = world.last_message()[1]["certificatePem"]

    result = handle_create_certificate(*world.create_request(csr), world.ports)

    assert result.outcome == "accepted"
    assert "re-sent" in result.reason
    assert world.last_message() == (f"{CREATE}/accepted", {"certificatePem": first_pem})
    assert len(world.issuer.issued) == 1
    assert len(world.registry.things["dev1"]) == 2


def test_repeated_create_with_another_csr_is_rejected(world: World) -> None:
    created(world)
    _, other = world.new_csr()
    result = handle_create_certificate(*world.create_request(other), world.ports)
    assert result.outcome == "rejected"
    assert "already issued" in result.reason
    assert len(world.issuer.issued) == 1


def test_create_for_another_job_while_a_rotation_is_open_is_rejected(world: World) -> None:
    created(world)
    world.jobs.executions[("dev1", "rotate-2")] = world.jobs.executions[("dev1", world.job_id)]
    _, csr = world.new_csr()
    result = handle_create_certificate(*world.create_request(csr, job_id="rotate-2"), world.ports)
    assert result.outcome == "rejected"
    assert "found 2" in result.reason
    assert len(world.issuer.issued) == 1


def test_create_removes_the_certificate_when_setting_it_up_fails(world: World) -> None:
    world.registry.fail_attach = True
    _, csr = world.new_csr()
    result = handle_create_certificate(*world.create_request(csr), world.ports)

    assert result.outcome == "rejected"
    assert "could not set up the new certificate" in result.reason
    assert world.registry.deleted == world.issuer.issued
    assert world.registry.things["dev1"] == [world.cert_id]
    assert world.state.states == {}


# ------------------------------------------------------------------------------------------- commit


def test_commit_over_the_new_certificate_commits(world: World) -> None:
    _, new_id = created(world)
    result = handle_commit_certificate(*world.commit_request(new_id), world.ports)

    assert result.outcome == "accepted"
    assert world.last_message() == (f"{COMMIT}/accepted", {})
    assert world.state.states["dev1"].progress is RotationProgress.COMMITTED


def test_repeated_commit_is_accepted_again_without_change(world: World) -> None:
    _, new_id = created(world)
    handle_commit_certificate(*world.commit_request(new_id), world.ports)
    state = world.state.states["dev1"]
    result = handle_commit_certificate(*world.commit_request(new_id), world.ports)
    assert (result.outcome, result.reason) == ("accepted", "already-committed")
    assert world.state.states["dev1"] == state


CommitRequest = tuple[BrokerContext, CommitCertificateRequest]


def _commit_case(mutate: Callable[[World, str], CommitRequest]) -> Callable[[World], CommitRequest]:
    def build(world: World) -> CommitRequest:
        _, new_id = created(world)
        return mutate(world, new_id)

    return build


def _drop_new(world: World, new_id: str) -> CommitRequest:
    world.registry.things["dev1"].remove(new_id)
    return world.commit_request(new_id)


def _third(world: World, new_id: str) -> CommitRequest:
    world.registry.things["dev1"].append("c" * 64)
    return world.commit_request(new_id)


def _no_state(world: World, new_id: str) -> CommitRequest:
    world.state.states.clear()
    return world.commit_request(new_id)


def _other_job(world: World, new_id: str) -> CommitRequest:
    world.jobs.executions[("dev1", "rotate-9")] = world.jobs.executions[("dev1", world.job_id)]
    return world.commit_request(new_id, job_id="rotate-9")


def _ended(world: World, new_id: str) -> CommitRequest:
    world.set_execution(JobExecutionStatus.TIMED_OUT)
    return world.commit_request(new_id)


def _client(world: World, new_id: str) -> CommitRequest:
    return world.commit_request(new_id, client_id="intruder")


COMMIT_REJECTIONS: list[tuple[str, Callable[[World], CommitRequest], str]] = [
    (
        "over the old certificate",
        _commit_case(lambda w, n: w.commit_request(w.cert_id)),
        "not authenticated by the new",
    ),
    (
        "foreign principal",
        _commit_case(lambda w, n: w.commit_request("d" * 64)),
        "not authenticated by a certificate",
    ),
    ("one certificate", _commit_case(_drop_new), "exactly two certificates attached during commit, found 1"),
    ("three certificates", _commit_case(_third), "found 3"),
    ("nothing created", _commit_case(_no_state), "no certificate was created for job"),
    ("other job", _commit_case(_other_job), "no certificate was created for job 'rotate-9'"),
    ("execution ended", _commit_case(_ended), "TIMED_OUT, not IN_PROGRESS"),
    ("client id", _commit_case(_client), "does not match thing name"),
]


@pytest.mark.parametrize(
    ("case", "setup", "reason"), COMMIT_REJECTIONS, ids=[c[0] for c in COMMIT_REJECTIONS]
)
def test_commit_rejections(
    world: World, case: str, setup: Callable[[World], CommitRequest], reason: str
) -> None:
    context, request = setup(world)
    state_before = world.state.states.get("dev1")
    result = handle_commit_certificate(context, request, world.ports)

    assert result.outcome == "rejected"
    assert reason in result.reason
    topic, message = world.last_message()
    assert topic == f"{COMMIT}/rejected"
    assert reason in message["errorMsg"]
    assert world.state.states.get("dev1") == state_before


# ----------------------------------------------------------------------------------------- terminal

S = JobExecutionStatus
P = RotationProgress

# (status, progress at the end, certificate deleted: "old" / "new" / None, notification expected)
TERMINAL_TABLE: list[tuple[JobExecutionStatus, RotationProgress | None, str | None, bool]] = [
    (S.SUCCEEDED, P.COMMITTED, "old", False),
    (S.SUCCEEDED, P.CREATED, None, True),
    (S.SUCCEEDED, None, None, True),
    (S.FAILED, P.CREATED, "new", True),
    (S.FAILED, None, None, True),
    (S.TIMED_OUT, P.COMMITTED, None, True),
    (S.TIMED_OUT, P.CREATED, "new", True),
    (S.TIMED_OUT, None, None, True),
    (S.CANCELED, P.CREATED, "new", True),
    (S.CANCELED, None, None, True),
    (S.REJECTED, P.CREATED, "new", True),
    (S.REMOVED, P.CREATED, "new", True),
    (S.FAILED, P.COMMITTED, None, True),  # beyond DESIGN.md's table: keep both, the operator decides
    (S.CANCELED, P.COMMITTED, None, True),
]


@pytest.mark.parametrize(("status", "progress", "deleted", "notified"), TERMINAL_TABLE)
@pytest.mark.parametrize("device_wrote", ["the rotator's key", "nothing"])
def test_terminal_outcome_table(
    world: World,
    status: JobExecutionStatus,
    progress: RotationProgress | None,
    deleted: str | None,
    notified: bool,
    device_wrote: str,
) -> None:
    """Whatever the device wrote in statusDetails (here: nothing at all, as a device that crashed or
    timed out leaves it), the backend acts on its own record."""
    new_id = None
    if progress is not None:
        _, new_id = created(world)
        if progress is P.COMMITTED:
            assert handle_commit_certificate(*world.commit_request(new_id), world.ports).outcome == "accepted"
    world.set_execution(status)
    details: dict[str, str] | None = None if device_wrote == "the rotator's key" else {}

    result = handle_job_execution_terminal(world.terminal_event(status, details=details), world.ports)

    assert result.outcome == status.value.lower()
    expected_deleted = {"old": [world.cert_id], "new": [new_id], None: []}[deleted]
    assert world.registry.deleted == expected_deleted
    remaining = {world.cert_id, new_id} - set(expected_deleted) - {None}
    assert set(world.registry.things["dev1"]) == remaining
    if progress is None:
        assert world.state.states == {}
    else:  # the record says it is over: a repeated event finds nothing to do
        assert world.state.states["dev1"].progress is P.TERMINATED
        assert world.state.states["dev1"].job_id == world.job_id
    assert len(world.notifier.notifications) == int(notified)
    if notified:
        note = world.notifier.notifications[0]
        assert (note.thing, note.job_id, note.status) == ("dev1", world.job_id, status.value)
        assert note.action
        if new_id:
            assert note.details["newCertificateId"] == new_id


def test_timed_out_after_commit_keeps_both_and_names_them(world: World) -> None:
    _, new_id = created(world)
    handle_commit_certificate(*world.commit_request(new_id), world.ports)
    handle_job_execution_terminal(world.terminal_event(S.TIMED_OUT), world.ports)
    note = world.notifier.notifications[0]
    assert "both certificates kept" in note.outcome
    assert (note.details["oldCertificateId"], note.details["newCertificateId"]) == (world.cert_id, new_id)
    assert set(world.registry.things["dev1"]) == {world.cert_id, new_id}


def test_terminal_ignores_executions_of_other_jobs(world: World) -> None:
    """Even when another application's device writes the rotator's statusDetails key."""
    created(world)
    world.set_execution(S.FAILED, {"operation": "REBOOT"}, job_id="reboot-1")
    result = handle_job_execution_terminal(world.terminal_event(S.FAILED, job_id="reboot-1"), world.ports)
    assert (result.outcome, result.reason) == ("ignored", "not a certificate rotation job")
    assert world.registry.deleted == [] and world.notifier.notifications == []
    assert world.state.states["dev1"].progress is P.CREATED


def test_terminal_ignores_a_job_it_cannot_find_when_there_is_no_state(world: World) -> None:
    result = handle_job_execution_terminal(world.terminal_event(S.FAILED, job_id="gone"), world.ports)
    assert result.outcome == "ignored"
    assert world.notifier.notifications == []


def test_terminal_cleans_up_after_a_job_deleted_mid_rotation(world: World) -> None:
    """The state is the backend's own evidence: a job whose document is gone is still cleaned up."""
    _, new_id = created(world)
    del world.jobs.executions[("dev1", world.job_id)]
    result = handle_job_execution_terminal(world.terminal_event(S.CANCELED, details={}), world.ports)
    assert result.outcome == "canceled"
    assert world.registry.deleted == [new_id]


def test_terminal_ignores_non_terminal_status(world: World) -> None:
    created(world)
    result = handle_job_execution_terminal(world.terminal_event(S.IN_PROGRESS), world.ports)
    assert result.outcome == "ignored"
    assert world.registry.deleted == []


def test_terminal_leaves_the_state_of_another_rotation_alone(world: World) -> None:
    _, new_id = created(world)
    world.set_execution(S.FAILED, job_id="older-job")
    handle_job_execution_terminal(world.terminal_event(S.FAILED, job_id="older-job"), world.ports)
    assert world.registry.deleted == []
    assert world.state.states["dev1"] == RotationState(world.job_id, world.cert_id, new_id, P.CREATED)
    assert len(world.notifier.notifications) == 1


def test_terminal_reports_a_deletion_refused_for_good(world: World) -> None:
    _, new_id = created(world)

    def refused(thing: str, certificate_id: str) -> None:
        raise PermanentFailure("AccessDeniedException deleting certificate")

    world.registry.delete_certificate = refused  # type: ignore[method-assign]
    result = handle_job_execution_terminal(world.terminal_event(S.FAILED), world.ports)
    assert result.outcome == "failed"
    note = world.notifier.notifications[0]
    assert f"could not delete certificate {new_id}" in note.outcome
    assert new_id in note.action
    assert world.state.states["dev1"].progress is P.TERMINATED  # retrying cannot help: reported instead


def test_device_failure_reason_reaches_the_operator(world: World) -> None:
    created(world)
    event = world.terminal_event(S.FAILED)
    event.status_details[FAILURE_REASON_KEY] = "commit rejected: not the new certificate"
    handle_job_execution_terminal(event, world.ports)
    assert world.notifier.notifications[0].details[FAILURE_REASON_KEY].startswith("commit rejected")


def test_a_commit_while_create_is_still_issuing_is_rejected(world: World) -> None:
    _, new_id = created(world)
    world.state.states["dev1"] = RotationState(world.job_id, world.cert_id, "", P.ISSUING)
    result = handle_commit_certificate(*world.commit_request(new_id), world.ports)
    assert (result.outcome, result.reason) == (
        "rejected",
        f"no certificate was created for job {world.job_id!r}",
    )


def test_a_commit_after_the_rotation_ended_is_rejected(world: World) -> None:
    _, new_id = created(world)
    world.state.states["dev1"] = world.state.states["dev1"].advanced(P.TERMINATED)
    result = handle_commit_certificate(*world.commit_request(new_id), world.ports)
    assert (result.outcome, result.reason) == ("rejected", f"the rotation of job {world.job_id!r} has ended")
    assert world.state.states["dev1"].progress is P.TERMINATED


@pytest.mark.parametrize("failing", ["delete_certificate", "notify", "load", "save"])
def test_terminal_lets_a_transient_failure_propagate_and_a_retry_finishes_the_work(
    world: World, failing: str
) -> None:
    """Anything but a PermanentFailure (throttling, a timeout, a service error) propagates, so the event is
    run again (Lambda's asynchronous retries); the retry does everything left, and nothing twice that
    matters: one deletion, the notification, the record."""
    _, new_id = created(world)
    target = {
        "delete_certificate": world.registry,
        "notify": world.notifier,
        "load": world.state,
        "save": world.state,
    }[failing]
    original = getattr(target, failing)
    calls = {"n": 0}

    def throttled_once(*args: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("ThrottlingException")
        return original(*args)

    setattr(target, failing, throttled_once)
    event = world.end_execution(S.FAILED)

    with pytest.raises(RuntimeError, match="Throttling"):
        handle_job_execution_terminal(event, world.ports)
    assert world.state.states["dev1"].progress is P.CREATED  # not marked: the retry has work to do

    result = handle_job_execution_terminal(event, world.ports)
    assert result.outcome == "failed"
    assert world.registry.deleted == [new_id]
    assert world.registry.things["dev1"] == [world.cert_id]
    assert len(world.notifier.notifications) in (1, 2)  # at least once: a retry may repeat it
    assert world.notifier.notifications[-1].details["newCertificateId"] == new_id
    assert world.state.states["dev1"].progress is P.TERMINATED
    assert handle_job_execution_terminal(event, world.ports).outcome == "duplicate"
