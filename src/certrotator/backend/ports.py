"""The ports the three handlers talk to. `backend.aws` implements them with boto3, `local` with the
embedded engine, tests with in-memory fakes. Certificates are named by their id (SHA-256 of the DER)
everywhere on this side of the ports; adapters translate to ARNs where their service needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from certrotator.compat import StrEnum
from certrotator.protocol import JobExecutionStatus, RotationProgress


class CertificateStatus(StrEnum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"
    REVOKED = "REVOKED"
    PENDING_TRANSFER = "PENDING_TRANSFER"
    REGISTER_INACTIVE = "REGISTER_INACTIVE"
    PENDING_ACTIVATION = "PENDING_ACTIVATION"


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    certificate_id: str
    pem: str
    status: CertificateStatus


@dataclass(frozen=True, slots=True)
class JobExecution:
    thing: str
    job_id: str
    status: JobExecutionStatus
    document: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    certificate_id: str
    pem: str


@dataclass(frozen=True, slots=True)
class RotationState:
    """Per thing: which rotation the backend is carrying out and how far it got.

    Written only by the backend: `issuing` (create, before it issues; no new id yet), `created` (create,
    with the new id, before it attaches), `committed` (commit), `terminated` (the terminal handler once
    it has acted, or create when it withdraws): docs/reliability.md, "Create/terminal race".
    """

    job_id: str
    old_certificate_id: str
    new_certificate_id: str  # "" while issuing
    progress: RotationProgress

    def advanced(self, progress: RotationProgress) -> RotationState:
        return RotationState(self.job_id, self.old_certificate_id, self.new_certificate_id, progress)

    def to_dict(self) -> dict[str, str]:
        return {
            "jobId": self.job_id,
            "oldCertificateId": self.old_certificate_id,
            "newCertificateId": self.new_certificate_id,
            "progress": self.progress.value,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RotationState:
        return cls(
            job_id=str(data["jobId"]),
            old_certificate_id=str(data["oldCertificateId"]),
            new_certificate_id=str(data["newCertificateId"]),
            progress=RotationProgress(data["progress"]),
        )


@dataclass(frozen=True, slots=True)
class Notification:
    thing: str
    job_id: str
    status: str  # the job execution's terminal status
    outcome: str  # what the backend did
    action: str  # what the operator must do ("" if nothing)
    details: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "thingName": self.thing,
            "jobId": self.job_id,
            "status": self.status,
            "outcome": self.outcome,
            "operatorAction": self.action,
            "details": dict(self.details),
        }


class Registry(Protocol):
    def exclusive_principals(self, thing: str) -> list[str]:
        """Certificate ids exclusively attached to the thing. Raises ThingNotFound."""
        ...

    def describe_certificate(self, certificate_id: str) -> CertificateRecord | None: ...

    def certificate_policies(self, certificate_id: str) -> list[str]: ...

    def attach_policy(self, policy_name: str, certificate_id: str) -> None: ...

    def attach_exclusive(self, thing: str, certificate_id: str) -> None: ...

    def delete_certificate(self, thing: str, certificate_id: str) -> None:
        """Set INACTIVE, detach from the thing, drop policy attachments, delete. Idempotent."""
        ...


class JobsData(Protocol):
    def describe_execution(self, thing: str, job_id: str) -> JobExecution | None:
        """The thing's execution of the job with its document, or None if there is none."""
        ...


class Issuer(Protocol):
    def issue(self, thing: str, csr_pem: str) -> IssuedCertificate:
        """Issue an ACTIVE certificate for the CSR's key and subject and register it."""
        ...


class RotationStateStore(Protocol):
    def load(self, thing: str) -> RotationState | None: ...

    def save(self, thing: str, state: RotationState) -> None: ...

    def clear(self, thing: str) -> None: ...


class Publisher(Protocol):
    def publish(self, topic: str, message: dict[str, Any]) -> None: ...


class Notifier(Protocol):
    def notify(self, notification: Notification) -> None: ...


class ThingNotFound(LookupError):
    pass


class PermanentFailure(Exception):
    """A port call the service refused for good (access denied, an invalid request): repeating it
    cannot help, so a handler reports it to the operator instead of failing.

    Adapters raise it, chained to the service's error, only where they know the error is permanent.
    Anything else a port raises may be transient (throttling, a timeout, a service error): the terminal
    handler lets it propagate so that its caller runs it again (Lambda's asynchronous retries; the local
    engine's durable terminal work).
    """


@dataclass(frozen=True, slots=True)
class Ports:
    registry: Registry
    jobs: JobsData
    issuer: Issuer
    state: RotationStateStore
    publisher: Publisher
    notifier: Notifier
