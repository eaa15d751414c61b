"""Pure backend decisions: preconditions, CSR policy and the terminal-outcome table.

Nothing here does I/O; `handlers` gathers facts through the ports and asks these functions what to
do, the way cert-manager keeps "should we issue" policies apart from the controllers that act.
Each check returns the reason it fails (sent to the authenticated device as `errorMsg`) or None.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from certrotator import crypto
from certrotator.backend.ports import CertificateRecord, CertificateStatus, JobExecution, RotationState
from certrotator.compat import StrEnum
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
    if state is None or state.job_id != job_id or state.progress is RotationProgress.ISSUING:
        return f"no certificate was created for job {job_id!r}"
    if state.progress is RotationProgress.TERMINATED:
        return f"the rotation of job {job_id!r} has ended"
    if principal != state.new_certificate_id:
        return "connection was not authenticated by the new certificate"
    if state.progress is RotationProgress.COMMITTED:
        return CommitDecision.ALREADY_COMMITTED
    return CommitDecision.COMMIT


# ------------------------------------------------------------------------------- create vs terminal
#
# Create and the terminal handler agree through the rotation state alone (docs/reliability.md,
# "Create/terminal race"): create writes `issuing` before it issues and `created` (with the new id)
# before it attaches; the terminal handler writes `terminated` once it has acted. An execution's status
# only ever moves forward, so create's last look at it, after attaching, settles every interleaving:
# either the execution was still IN_PROGRESS then (and the terminal handler, which runs after the
# execution ended, finds `created` with the new id), or it was not (and create withdraws).


def leftover_certificate(state: RotationState | None, principals: list[str], principal: str) -> str | None:
    """A certificate an earlier create recorded but never attached (it stopped between the two), which a
    new create for the thing must withdraw before it overwrites the record: nothing else knows of it.

    Only `created` records a new id; a certificate attached to the thing, or the one this very request
    came over, is in use and never a leftover.
    """
    if state is None or state.progress is not RotationProgress.CREATED:
        return None
    new = state.new_certificate_id
    if not new or new in principals or new == principal:
        return None
    return new


def withdrawal_reason(
    state: RotationState | None, mine: RotationState, execution: JobExecution | None
) -> str | None:
    """Create's last look, after attaching: why the certificate it just set up must be withdrawn, or
    None if the rotation may go on (the state is still its own and the execution still IN_PROGRESS)."""
    if state != mine:
        if (
            state is not None
            and state.job_id == mine.job_id
            and state.progress is RotationProgress.TERMINATED
        ):
            return f"job {mine.job_id!r} execution ended while the certificate was being created"
        return f"the rotation state of {mine.job_id!r} was replaced while the certificate was being created"
    if execution is None:
        return f"job {mine.job_id!r} execution is gone"
    if execution.status is not JobExecutionStatus.IN_PROGRESS:
        return f"job {mine.job_id!r} execution ended ({execution.status.value}) while the certificate was being created"
    return None


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """What create does with the rotation state and the operator once it has withdrawn a certificate."""

    mark_terminated: bool  # the state is still its own: record the end, so a later terminal event is a no-op
    notify: bool  # False only when the terminal handler has already handled (and reported) this execution


def withdrawal(state: RotationState | None, mine: RotationState, execution_ended: bool) -> Withdrawal:
    """After withdrawing. If the execution is still IN_PROGRESS (create's own set-up failed) the state goes
    back to none: the device is told, fails the job, and the terminal handler reports that as usual."""
    if not execution_ended:
        return Withdrawal(mark_terminated=False, notify=False)
    handled = (
        state is not None and state.job_id == mine.job_id and state.progress is RotationProgress.TERMINATED
    )
    return Withdrawal(mark_terminated=state == mine, notify=not handled)


# ------------------------------------------------------------------------------------ terminal table


class Cleanup(StrEnum):
    NONE = "none"
    DELETE_OLD = "delete-old"
    DELETE_NEW = "delete-new"


class Verdict(StrEnum):
    ACT = "act"  # carry out the plan
    IGNORE = "ignore"  # not a rotation job's execution: nothing to do, nobody to tell
    DUPLICATE = "duplicate"  # this execution's end was handled already (a redelivered event)


@dataclass(frozen=True, slots=True)
class TerminalPlan:
    verdict: Verdict
    cleanup: Cleanup
    notify: bool
    outcome: str  # what the backend does, in words
    action: str  # what the operator must do ("" = nothing)
    mark_terminated: bool  # write `terminated` for the job once the plan has been carried out


def _skip(verdict: Verdict, outcome: str) -> TerminalPlan:
    return TerminalPlan(verdict, Cleanup.NONE, False, outcome, "", False)


def _act(cleanup: Cleanup, notify: bool, outcome: str, action: str, *, mark: bool = True) -> TerminalPlan:
    return TerminalPlan(Verdict.ACT, cleanup, notify, outcome, action, mark)


# FAILED-like: the execution ended without the device succeeding and without a timeout.
_FAILED_LIKE = frozenset(
    {
        JobExecutionStatus.FAILED,
        JobExecutionStatus.CANCELED,
        JobExecutionStatus.REJECTED,
        JobExecutionStatus.REMOVED,
    }
)
_FIX_AND_RETRY = "see the device's failure reason, fix the cause and create a new rotation job"
_CHECK_DEVICE = "check the device is online and running the rotator; create a new rotation job"
_CONTRADICTION = "check the device: it reported success without committing a new certificate"
_FIND_PAIR = "find which certificate the device uses, then delete the other one (certrotator reconcile)"


def _retry_action(status: JobExecutionStatus) -> str:
    if status is JobExecutionStatus.SUCCEEDED:
        return _CONTRADICTION
    return _CHECK_DEVICE if status is JobExecutionStatus.TIMED_OUT else _FIX_AND_RETRY


def terminal_plan(
    status: JobExecutionStatus, progress: RotationProgress | None, rotation_job: bool | None = None
) -> TerminalPlan:
    """DESIGN.md §2's terminal-outcome table over the backend's own record, never the device's words.

    `progress` is the rotation state's progress *for this job* (None: no state for it); `rotation_job`
    (whether the job's document is the rotation document; None: unknown) matters only without one.
    CANCELED / REJECTED / REMOVED count as FAILED.
    """
    if not status.is_terminal:
        raise ValueError(f"{status.value} is not a terminal job execution status")
    if progress is RotationProgress.TERMINATED:
        return _skip(Verdict.DUPLICATE, "already handled")
    if progress is RotationProgress.ISSUING:
        # Create is still at work (or stopped): it finds the mark when it looks again and withdraws.
        return _act(
            Cleanup.NONE,
            True,
            f"execution ended {status.value} while its certificate was being issued; the create handler"
            " withdraws the certificate",
            _retry_action(status),
        )
    if progress is None:
        if rotation_job is None:
            return _skip(Verdict.IGNORE, "no rotation state and the job document is unavailable")
        if not rotation_job:
            return _skip(Verdict.IGNORE, "not a certificate rotation job")
        # Nothing was issued (or it was cleaned up already): there is no state to settle.
        if status is JobExecutionStatus.SUCCEEDED:
            return _act(
                Cleanup.NONE,
                True,
                "contradiction: execution SUCCEEDED but rotation progress is none",
                _CONTRADICTION,
                mark=False,
            )
        return _act(
            Cleanup.NONE,
            True,
            "no certificate had been issued; nothing to clean up",
            _retry_action(status),
            mark=False,
        )
    created, committed = progress is RotationProgress.CREATED, progress is RotationProgress.COMMITTED
    if status is JobExecutionStatus.SUCCEEDED:
        if committed:
            return _act(Cleanup.DELETE_OLD, False, "old certificate deleted", "")
        return _act(
            Cleanup.NONE,
            True,
            f"contradiction: execution SUCCEEDED but rotation progress is {progress.value}",
            _CONTRADICTION,
        )
    if committed:
        # TIMED_OUT after commit is DESIGN.md's "keep both"; FAILED after commit is not in its table (e.g.
        # the device never got the commit reply and rolled back). Either way it may use either pair.
        return _act(
            Cleanup.NONE,
            True,
            f"both certificates kept: the new certificate was committed, then the execution ended {status.value}",
            _FIND_PAIR,
        )
    assert created
    if status in _FAILED_LIKE:
        return _act(
            Cleanup.DELETE_NEW,
            True,
            "new certificate deleted; the device rolled back to its old certificate",
            _FIX_AND_RETRY,
        )
    return _act(Cleanup.DELETE_NEW, True, "new certificate deleted", _CHECK_DEVICE)
