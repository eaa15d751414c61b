"""Pure backend decisions: preconditions, CSR policy and the terminal-outcome table.

Nothing here does I/O; `handlers` gathers facts through the ports and asks these functions what to
do, the way cert-manager keeps "should we issue" policies apart from the controllers that act.
Each check returns the reason it fails (sent to the authenticated device as `errorMsg`) or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from certrotator import crypto
from certrotator.backend.ports import CertificateRecord, CertificateStatus, JobExecution, RotationState
from certrotator.protocol import (
    BrokerContext,
    JobExecutionStatus,
    RotationProgress,
    client_id_is_for_thing,
    is_rotation_document,
)


def client_id_violation(context: BrokerContext) -> str | None:
    # Greengrass opens extra connections as "{thing}#n"; anything else must be the thing name itself,
    # so "dev10" can never pass for "dev1".
    cid, thing = context.client_id, context.thing
    if client_id_is_for_thing(cid, thing):
        return None
    return f"client id {cid!r} does not match thing name {thing!r}"


def execution_violation(execution: JobExecution | None, thing: str, job_id: str) -> str | None:
    """Chain of custody: the thing must be executing this very rotation job."""
    if execution is None:
        return f"thing {thing!r} has no execution of job {job_id!r}"
    if execution.status is not JobExecutionStatus.IN_PROGRESS:
        return f"job {job_id!r} execution for {thing!r} is {execution.status.value}, not IN_PROGRESS"
    if not is_rotation_document(execution.document):
        return f"job {job_id!r} is not a certificate rotation job"
    return None


def current_certificate_violation(principals: list[str], principal: str) -> str | None:
    """create: the thing has exactly one certificate, and the request came over it."""
    if len(principals) != 1:
        return f"thing must have exactly one certificate attached, found {len(principals)}"
    if principals[0] != principal:
        return "connection was not authenticated by the thing's certificate"
    return None


def certificate_record_violation(record: CertificateRecord | None) -> str | None:
    if record is None:
        return "the thing's current certificate is not in the registry"
    if record.status is not CertificateStatus.ACTIVE:
        return f"the thing's current certificate is {record.status.value}, not ACTIVE"
    return None


def csr_violation(csr_pem: str, current_certificate_pem: str) -> str | None:
    """CSR policy: well formed, self-signed correctly, allowed key, a new key, the same subject."""
    try:
        info = crypto.inspect_csr(csr_pem)
    except crypto.CryptoError as exc:
        return str(exc)
    if not info.signature_valid:
        return "CSR signature does not verify"
    if (reason := crypto.csr_key_policy_violation(info.public_key)) is not None:
        return f"CSR key not allowed: {reason}"
    current = crypto.load_certificate(current_certificate_pem)
    if crypto.same_public_key(info.public_key, current.public_key()):
        return "CSR reuses the current certificate's key; a rotation needs a new key"
    if info.subject != current.subject:
        return (
            f"CSR subject {info.subject.rfc4514_string()!r} differs from the current certificate's "
            f"{current.subject.rfc4514_string()!r}"
        )
    return None


class RepeatCreate(StrEnum):
    RESEND = "resend"  # same job, same key: send the certificate already issued again
    CONFLICT = "conflict"


def repeated_create(
    state: RotationState | None,
    principals: list[str],
    principal: str,
    job_id: str,
    csr_public_key: CertificatePublicKeyTypes | None,
    issued_public_key: CertificatePublicKeyTypes | None,
) -> RepeatCreate | None:
    """Whether a create is the repeat of one that already issued for this job (reply lost)."""
    if state is None or state.job_id != job_id or state.progress is not RotationProgress.CREATED:
        return None
    if principal != state.old_certificate_id or set(principals) != {
        state.old_certificate_id,
        state.new_certificate_id,
    }:
        return None
    if csr_public_key is None or issued_public_key is None:
        return RepeatCreate.CONFLICT
    same = crypto.same_public_key(csr_public_key, issued_public_key)
    return RepeatCreate.RESEND if same else RepeatCreate.CONFLICT


class CommitDecision(StrEnum):
    COMMIT = "commit"
    ALREADY_COMMITTED = "already-committed"  # a repeated commit whose reply was lost


def commit_decision(
    state: RotationState | None, principals: list[str], principal: str, job_id: str
) -> CommitDecision | str:
    """commit: two certificates, the connection used the new one recorded at create."""
    if len(principals) != 2:
        return f"thing must have exactly two certificates attached during commit, found {len(principals)}"
    if principal not in principals:
        return "connection was not authenticated by a certificate of this thing"
    if state is None or state.job_id != job_id:
        return f"no certificate was created for job {job_id!r}"
    if principal != state.new_certificate_id:
        return "connection was not authenticated by the new certificate"
    if state.progress is RotationProgress.COMMITTED:
        return CommitDecision.ALREADY_COMMITTED
    return CommitDecision.COMMIT


# ------------------------------------------------------------------------------------ terminal table


class Cleanup(StrEnum):
    NONE = "none"
    DELETE_OLD = "delete-old"
    DELETE_NEW = "delete-new"


@dataclass(frozen=True, slots=True)
class TerminalPlan:
    cleanup: Cleanup
    notify: bool
    outcome: str  # what the backend does, in words
    action: str  # what the operator must do ("" = nothing)


# FAILED-like: the execution ended without the device succeeding and without a timeout.
_FAILED_LIKE = frozenset(
    {
        JobExecutionStatus.FAILED,
        JobExecutionStatus.CANCELED,
        JobExecutionStatus.REJECTED,
        JobExecutionStatus.REMOVED,
    }
)


def terminal_plan(status: JobExecutionStatus, progress: RotationProgress | None) -> TerminalPlan:
    """DESIGN.md §2's terminal-outcome table; CANCELED / REJECTED / REMOVED count as FAILED."""
    created, committed = progress is RotationProgress.CREATED, progress is RotationProgress.COMMITTED
    if status is JobExecutionStatus.SUCCEEDED:
        if committed:
            return TerminalPlan(Cleanup.DELETE_OLD, False, "old certificate deleted", "")
        return TerminalPlan(
            Cleanup.NONE,
            True,
            f"contradiction: execution SUCCEEDED but rotation progress is {progress or 'none'}",
            "check the device: it reported success without committing a new certificate",
        )
    if status in _FAILED_LIKE:
        if committed:
            # Not in DESIGN.md's table: the commit was accepted, then the device failed (e.g. it never got
            # the commit reply and rolled back). It may use either pair: never delete one it might use.
            return TerminalPlan(
                Cleanup.NONE,
                True,
                f"both certificates kept: the new certificate was committed, then the execution ended {status.value}",
                "find which certificate the device uses, then delete the other one",
            )
        if created:
            return TerminalPlan(
                Cleanup.DELETE_NEW,
                True,
                "new certificate deleted; the device rolled back to its old certificate",
                "see the device's failure reason, fix the cause and create a new rotation job",
            )
        return TerminalPlan(
            Cleanup.NONE,
            True,
            "no certificate had been issued; nothing to clean up",
            "see the device's failure reason, fix the cause and create a new rotation job",
        )
    if status is JobExecutionStatus.TIMED_OUT:
        if committed:
            return TerminalPlan(
                Cleanup.NONE,
                True,
                "both certificates kept: the device committed but did not report success in time",
                "find which certificate the device uses, then delete the other one",
            )
        return TerminalPlan(
            Cleanup.DELETE_NEW if created else Cleanup.NONE,
            True,
            "new certificate deleted" if created else "no certificate had been issued",
            "check the device is online and running the rotator; create a new rotation job",
        )
    raise ValueError(f"{status.value} is not a terminal job execution status")
