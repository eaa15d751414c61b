"""In-memory implementations of the backend ports, with a real (small) CA behind the issuer."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certrotator import crypto
from certrotator.backend.ports import (
    CertificateRecord,
    CertificateStatus,
    IssuedCertificate,
    JobExecution,
    Notification,
    Ports,
    RotationState,
    ThingNotFound,
)
from certrotator.protocol import (
    JOB_DOCUMENT,
    STATUS_DETAILS_KEY,
    BrokerContext,
    CommitCertificateRequest,
    CreateCertificateRequest,
    JobExecutionEvent,
    JobExecutionStatus,
    Topics,
)


class TestCa:
    """A real CA (EC P-256) that signs CSRs the way CreateCertificateFromCsr does."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certrotator test CA")])

    def sign(self, subject: x509.Name, public_key: Any) -> x509.Certificate:
        now = dt.datetime.now(dt.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(self.key, crypto.SigningAlgorithm.ECDSA_WITH_SHA256.hash())
        )


@dataclass
class FakeRegistry:
    certificates: dict[str, CertificateRecord] = field(default_factory=dict)
    things: dict[str, list[str]] = field(default_factory=dict)
    policies: dict[str, list[str]] = field(default_factory=dict)  # certificate id -> policy names
    deleted: list[str] = field(default_factory=list)
    fail_attach: bool = False

    def exclusive_principals(self, thing: str) -> list[str]:
        if thing not in self.things:
            raise ThingNotFound(thing)
        return list(self.things[thing])

    def describe_certificate(self, certificate_id: str) -> CertificateRecord | None:
        return self.certificates.get(certificate_id)

    def certificate_policies(self, certificate_id: str) -> list[str]:
        return list(self.policies.get(certificate_id, []))

    def _known(self, certificate_id: str) -> None:
        # as AWS IoT: a deleted certificate cannot be attached to anything
        if certificate_id not in self.certificates:
            raise LookupError(f"certificate {certificate_id} does not exist")

    def attach_policy(self, policy_name: str, certificate_id: str) -> None:
        self._known(certificate_id)
        self.policies.setdefault(certificate_id, []).append(policy_name)

    def attach_exclusive(self, thing: str, certificate_id: str) -> None:
        if self.fail_attach:
            raise RuntimeError("attach throttled")
        self._known(certificate_id)
        if certificate_id not in self.things[thing]:
            self.things[thing].append(certificate_id)

    def delete_certificate(self, thing: str, certificate_id: str) -> None:
        if certificate_id in self.things.get(thing, []):
            self.things[thing].remove(certificate_id)
        self.policies.pop(certificate_id, None)
        if self.certificates.pop(certificate_id, None) is not None:
            self.deleted.append(certificate_id)


@dataclass
class FakeJobs:
    executions: dict[tuple[str, str], JobExecution] = field(default_factory=dict)

    def describe_execution(self, thing: str, job_id: str) -> JobExecution | None:
        return self.executions.get((thing, job_id))


@dataclass
class FakeIssuer:
    ca: TestCa
    registry: FakeRegistry
    issued: list[str] = field(default_factory=list)
    fail: bool = False

    def issue(self, thing: str, csr_pem: str) -> IssuedCertificate:
        if self.fail:
            raise RuntimeError("CA unavailable")
        csr = crypto.inspect_csr(csr_pem).csr
        cert = self.ca.sign(csr.subject, csr.public_key())
        cid, pem = crypto.certificate_id(cert), crypto.certificate_pem(cert)
        self.registry.certificates[cid] = CertificateRecord(cid, pem, CertificateStatus.ACTIVE)
        self.issued.append(cid)
        return IssuedCertificate(cid, pem)


@dataclass
class FakeStateStore:
    states: dict[str, RotationState] = field(default_factory=dict)
    writes: list[tuple[str, RotationState | None]] = field(default_factory=list)  # saves and clears (None)

    def load(self, thing: str) -> RotationState | None:
        return self.states.get(thing)

    def save(self, thing: str, state: RotationState) -> None:
        self.states[thing] = state
        self.writes.append((thing, state))

    def clear(self, thing: str) -> None:
        self.states.pop(thing, None)
        self.writes.append((thing, None))


@dataclass
class FakePublisher:
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def publish(self, topic: str, message: dict[str, Any]) -> None:
        self.messages.append((topic, message))


@dataclass
class FakeNotifier:
    notifications: list[Notification] = field(default_factory=list)

    def notify(self, notification: Notification) -> None:
        self.notifications.append(notification)


class World:
    """One thing with one ACTIVE certificate, one policy, and an IN_PROGRESS rotation job."""

    thing = "dev1"
    job_id = "rotate-1"

    def __init__(self, key_algorithm: crypto.KeyAlgorithm = crypto.KeyAlgorithm.ECDSA_P256) -> None:
        self.ca = TestCa()
        self.registry = FakeRegistry()
        self.jobs = FakeJobs()
        self.issuer = FakeIssuer(self.ca, self.registry)
        self.state = FakeStateStore()
        self.publisher = FakePublisher()
        self.notifier = FakeNotifier()
        self.subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.thing)])
        self.key = crypto.generate_private_key(key_algorithm)
        cert = self.ca.sign(self.subject, self.key.public_key())
        self.cert_id = crypto.certificate_id(cert)
        self.registry.certificates[self.cert_id] = CertificateRecord(
            self.cert_id, crypto.certificate_pem(cert), CertificateStatus.ACTIVE
        )
        self.registry.things[self.thing] = [self.cert_id]
        self.registry.policies[self.cert_id] = ["DevicePolicy"]
        self.set_execution(JobExecutionStatus.IN_PROGRESS)

    @property
    def ports(self) -> Ports:
        return Ports(self.registry, self.jobs, self.issuer, self.state, self.publisher, self.notifier)

    def set_execution(
        self, status: JobExecutionStatus, document: dict[str, Any] | None = None, job_id: str | None = None
    ) -> None:
        doc = dict(JOB_DOCUMENT) if document is None else document
        job = job_id or self.job_id
        self.jobs.executions[(self.thing, job)] = JobExecution(self.thing, job, status, doc)

    def end_execution(self, status: JobExecutionStatus, job_id: str | None = None) -> JobExecutionEvent:
        """The execution ends (keeping its document) and AWS IoT publishes the event."""
        job = job_id or self.job_id
        execution = self.jobs.executions[(self.thing, job)]
        self.jobs.executions[(self.thing, job)] = JobExecution(self.thing, job, status, execution.document)
        return self.terminal_event(status, job_id=job)

    def new_csr(
        self,
        key_algorithm: crypto.KeyAlgorithm = crypto.KeyAlgorithm.ECDSA_P256,
        signing: crypto.SigningAlgorithm = crypto.SigningAlgorithm.ECDSA_WITH_SHA256,
    ) -> tuple[crypto.PrivateKey, str]:
        key = crypto.generate_private_key(key_algorithm)
        return key, crypto.build_csr(key, signing, self.subject)

    def create_request(
        self, csr: str, principal: str | None = None, client_id: str | None = None, job_id: str | None = None
    ) -> tuple[BrokerContext, CreateCertificateRequest]:
        """A create request as the broker hands it over: its context and the parsed payload."""
        context = BrokerContext(
            self.thing, client_id or self.thing, principal or self.cert_id, Topics.create(self.thing)
        )
        return context, CreateCertificateRequest(job_id or self.job_id, csr)

    def commit_request(
        self, principal: str, job_id: str | None = None, client_id: str | None = None
    ) -> tuple[BrokerContext, CommitCertificateRequest]:
        context = BrokerContext(self.thing, client_id or self.thing, principal, Topics.commit(self.thing))
        return context, CommitCertificateRequest(job_id or self.job_id)

    def terminal_event(
        self, status: JobExecutionStatus, job_id: str | None = None, details: dict[str, str] | None = None
    ) -> JobExecutionEvent:
        """A job execution event; `details` is what the device wrote (the backend decides without it)."""
        written = {STATUS_DETAILS_KEY: status.value} if details is None else details
        return JobExecutionEvent(self.thing, job_id or self.job_id, status, written)

    def create_event(self, csr: str) -> dict[str, Any]:
        """The same create request as the AWS IoT rule delivers it to the Lambda function."""
        context, request = self.create_request(csr)
        return {**request.to_payload(), **context.to_event_fields()}

    def commit_event(self, principal: str) -> dict[str, Any]:
        context, request = self.commit_request(principal)
        return {**request.to_payload(), **context.to_event_fields()}

    def last_message(self) -> tuple[str, dict[str, Any]]:
        return self.publisher.messages[-1]
