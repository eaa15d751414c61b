"""The three backend handlers: create-certificate, commit-certificate, job-execution-terminal.

Each one takes a typed request (with the broker's context for create and commit), gathers facts
through the ports (lazily: a fact is fetched only when a decision needs it, because every port call is
an AWS API call on Lambda), asks `decisions` what to do, then acts. The same code runs on AWS Lambda
and inside the local IoT Core; only the ports differ, and only the callers parse: the Lambda adapter
from AWS's event dicts, the local engine from its broker connection. A request that does not parse
still gets its `/rejected` reply, through `reject_malformed_request`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from certrotator import crypto
from certrotator.backend import decisions
from certrotator.backend.ports import (
    JobExecution,
    Notification,
    PermanentFailure,
    Ports,
    RotationState,
    ThingNotFound,
)
from certrotator.backend.rotation_jobs import RotationJobs
from certrotator.protocol import (
    BrokerContext,
    CommitCertificateRequest,
    CreateCertificateRequest,
    JobExecutionEvent,
    JobExecutionStatus,
    ProtocolError,
    RotationProgress,
    TopicKind,
    Topics,
    certificate_accepted,
    commit_accepted,
    rejected,
)

log = logging.getLogger("certrotator.backend")

CREATE = "create-certificate"
COMMIT = "commit-certificate"
TERMINAL = "job-execution-terminal"


@dataclass(frozen=True, slots=True)
class HandlerResult:
    handler: str
    thing: str | None
    job_id: str | None
    outcome: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Rejection(Exception):
    """A precondition failed; the text goes to the device as errorMsg."""


def _record(result: HandlerResult) -> HandlerResult:
    # One structured record per decision; powertools turns the extra keys into JSON fields on Lambda.
    # A terminal result's outcome is the execution's status in lower case.
    ok = ("accepted", JobExecutionStatus.SUCCEEDED.value.lower())
    level = logging.INFO if result.outcome in ok else logging.WARNING
    log.log(level, "%s %s: %s", result.handler, result.outcome, result.reason or "ok", extra=result.to_dict())
    return result


def _reject(
    ports: Ports, handler: str, base_topic: str | None, thing: str | None, job_id: str | None, reason: str
) -> HandlerResult:
    if base_topic is not None:
        ports.publisher.publish(Topics.rejected(base_topic), rejected(reason))
    return _record(HandlerResult(handler, thing, job_id, "rejected", reason))


def _check(reason: str | None) -> None:
    if reason is not None:
        raise Rejection(reason)


def _common_preconditions(ports: Ports, context: BrokerContext, job_id: str) -> list[str]:
    """Client id, chain of custody, and the thing's exclusive principals."""
    _check(decisions.client_id_violation(context))
    execution = ports.jobs.describe_execution(context.thing, job_id)
    _check(decisions.execution_violation(execution, context.thing, job_id))
    try:
        return ports.registry.exclusive_principals(context.thing)
    except ThingNotFound:
        raise Rejection(f"thing {context.thing!r} is not in the registry") from None


# ------------------------------------------------------------------------------------------- create


def handle_create_certificate(
    context: BrokerContext, request: CreateCertificateRequest, ports: Ports
) -> HandlerResult:
    try:
        return _create(ports, context, request)
    except (ProtocolError, Rejection) as exc:
        return _reject(ports, CREATE, Topics.create(context.thing), context.thing, request.job_id, str(exc))


def reject_malformed_request(kind: TopicKind, thing: str | None, reason: str, ports: Ports) -> HandlerResult:
    """A create or commit request that did not parse (its payload, or the broker context around it):
    the device is told why on the request's `/rejected` topic, if its thing name is known."""
    if kind is TopicKind.CREATE:
        return _reject(ports, CREATE, Topics.create(thing) if thing else None, thing, None, reason)
    if kind is TopicKind.COMMIT:
        return _reject(ports, COMMIT, Topics.commit(thing) if thing else None, thing, None, reason)
    raise ValueError(f"{kind.value} is not a backend request")


def _create(ports: Ports, context: BrokerContext, request: CreateCertificateRequest) -> HandlerResult:
    thing, job_id = context.thing, request.job_id
    principals = _common_preconditions(ports, context, job_id)
    state = ports.state.load(thing)
    if len(principals) == 2:
        resent = _resend_issued(ports, context, request, principals, state)
        if resent is not None:
            return resent
    _check(decisions.current_certificate_violation(principals, context.principal))
    current = ports.registry.describe_certificate(context.principal)
    _check(decisions.certificate_record_violation(current))
    assert current is not None
    _check(decisions.csr_violation(request.csr, current.pem))

    leftover = decisions.leftover_certificate(state, principals, context.principal)
    if leftover is not None:
        # An earlier create stopped between recording and attaching it; the record is about to go.
        log.warning("withdrawing certificate %s of %s, recorded but never attached", leftover, thing)
        try:
            ports.registry.delete_certificate(thing, leftover)
        except Exception as exc:
            log.exception("could not withdraw certificate %s of %s", leftover, thing)
            raise Rejection(
                f"the backend could not remove an earlier, unattached certificate: {_safe_reason(exc)}"
            ) from None
    # Written before issuing, so that a terminal event from now on finds this rotation (and marks it).
    issuing = RotationState(job_id, current.certificate_id, "", RotationProgress.ISSUING)
    ports.state.save(thing, issuing)
    try:
        issued = ports.issuer.issue(thing, request.csr)
    except Exception as exc:
        log.exception("issuing a certificate for %s failed", thing)
        _forget_issuing(ports, thing, issuing)
        raise Rejection(f"the certificate authority refused the CSR: {_safe_reason(exc)}") from None
    mine = RotationState(job_id, current.certificate_id, issued.certificate_id, RotationProgress.CREATED)
    try:
        ports.state.save(thing, mine)  # before attaching: whoever comes next knows what to delete
        for policy in ports.registry.certificate_policies(current.certificate_id):
            ports.registry.attach_policy(policy, issued.certificate_id)
        ports.registry.attach_exclusive(thing, issued.certificate_id)
    except Exception as exc:
        # Never leave a half-set-up certificate behind: the device will not get it, so nothing uses it.
        log.exception("setting up certificate %s for %s failed; removing it", issued.certificate_id, thing)
        _withdraw(ports, thing, mine, _last_look(ports, thing, job_id))
        raise Rejection(f"the backend could not set up the new certificate: {_safe_reason(exc)}") from None
    # The last look: the execution may have ended (the device gives up after 30 s, issuing can take
    # longer) and the terminal handler may have run at any point since the state was written.
    now = _last_look(ports, thing, job_id)
    reason = decisions.withdrawal_reason(now.state, mine, now.execution)
    if reason is not None:
        log.warning("withdrawing certificate %s of %s: %s", issued.certificate_id, thing, reason)
        _withdraw(ports, thing, mine, now)
        raise Rejection(reason)
    ports.publisher.publish(Topics.accepted(Topics.create(thing)), certificate_accepted(issued.pem))
    return _record(HandlerResult(CREATE, thing, job_id, "accepted", f"issued {issued.certificate_id}"))


def _safe_reason(exc: Exception) -> str:
    """What a device may be told of a backend failure: input problems in full; for anything else only
    the kind of error, because AWS error text names accounts, roles and ARNs (it is in the log)."""
    if isinstance(exc, crypto.CryptoError | ValueError):
        return str(exc)
    return f"{type(exc).__name__} (details in the backend log)"


def _forget_issuing(ports: Ports, thing: str, issuing: RotationState) -> None:
    """Nothing was issued: take back the `issuing` record unless someone has written since."""
    try:
        if ports.state.load(thing) == issuing:
            ports.state.clear(thing)
    except Exception:
        log.exception("could not take back the issuing record of %s", thing)


@dataclass(frozen=True, slots=True)
class _LastLook:
    state: RotationState | None
    execution: JobExecution | None
    ended: bool  # the execution is not (or could not be shown to be) IN_PROGRESS


def _last_look(ports: Ports, thing: str, job_id: str) -> _LastLook:
    # Not knowing counts against the rotation: withdrawing a certificate is always safe before the
    # device has it, handing one out that the terminal handler may never learn of is not.
    try:
        state = ports.state.load(thing)
    except Exception:
        log.exception("could not read the rotation state of %s; taking it as replaced", thing)
        state = None
    try:
        execution = ports.jobs.describe_execution(thing, job_id)
    except Exception:
        log.exception("could not check the execution of %s on %s; taking it as ended", job_id, thing)
        return _LastLook(state, None, True)
    ended = execution is None or execution.status is not JobExecutionStatus.IN_PROGRESS
    return _LastLook(state, execution, ended)


def _withdraw(ports: Ports, thing: str, mine: RotationState, now: _LastLook) -> None:
    """Take back the certificate create set up (it never reached the device), then settle the state.

    Never raises: the device gets its rejection either way, and what could not be done is reported.
    """
    certificate = mine.new_certificate_id
    outcome, action = f"certificate {certificate} withdrawn before the device received it", ""
    withdrawn = True
    try:
        ports.registry.delete_certificate(thing, certificate)
    except Exception as exc:
        log.exception("could not withdraw certificate %s of %s", certificate, thing)
        withdrawn = False
        outcome = f"certificate {certificate} could not be withdrawn: {_safe_reason(exc)}"
        action = f"delete certificate {certificate} and detach it from {thing}"
    plan = decisions.withdrawal(now.state, mine, now.ended)
    try:
        # Not withdrawn: the `created` record stays, for the terminal handler (or reconcile) to act on.
        if withdrawn and plan.mark_terminated:
            ports.state.save(thing, mine.advanced(RotationProgress.TERMINATED))
        elif withdrawn and not now.ended and now.state == mine:
            ports.state.clear(thing)  # set-up failed while the job goes on: as if nothing was issued
    except Exception:
        log.exception("could not settle the rotation state of %s after withdrawing %s", thing, certificate)
    if not plan.notify and withdrawn:
        return
    status = now.execution.status.value if now.execution is not None else "UNKNOWN"
    details = {"oldCertificateId": mine.old_certificate_id, "newCertificateId": certificate}
    try:
        ports.notifier.notify(Notification(thing, mine.job_id, status, outcome, action, details))
    except Exception:
        log.exception("could not notify about certificate %s of %s", certificate, thing)


def _resend_issued(
    ports: Ports,
    context: BrokerContext,
    request: CreateCertificateRequest,
    principals: list[str],
    state: RotationState | None,
) -> HandlerResult | None:
    """A create repeated after success (its reply was lost): re-send, never issue a second time."""
    if state is None or state.job_id != request.job_id:
        return None
    issued = ports.registry.describe_certificate(state.new_certificate_id)
    try:
        csr_key = crypto.inspect_csr(request.csr).public_key
    except crypto.CryptoError:
        csr_key = None
    issued_key = crypto.load_certificate(issued.pem).public_key() if issued is not None else None
    verdict = decisions.repeated_create(
        state, principals, context.principal, request.job_id, csr_key, issued_key
    )
    if verdict is None:
        return None
    if verdict is decisions.RepeatCreate.CONFLICT or issued is None:
        raise Rejection(f"a certificate was already issued for job {request.job_id!r} for another key")
    ports.publisher.publish(Topics.accepted(Topics.create(context.thing)), certificate_accepted(issued.pem))
    return _record(
        HandlerResult(
            CREATE,
            context.thing,
            request.job_id,
            "accepted",
            f"re-sent {issued.certificate_id} (repeated request)",
        )
    )


# ------------------------------------------------------------------------------------------- commit


def handle_commit_certificate(
    context: BrokerContext, request: CommitCertificateRequest, ports: Ports
) -> HandlerResult:
    job_id = request.job_id
    try:
        principals = _common_preconditions(ports, context, job_id)
        state = ports.state.load(context.thing)
        decision = decisions.commit_decision(state, principals, context.principal, job_id)
        if not isinstance(decision, decisions.CommitDecision):
            raise Rejection(decision)
        assert state is not None
        if decision is decisions.CommitDecision.COMMIT:
            ports.state.save(
                context.thing,
                RotationState(
                    state.job_id,
                    state.old_certificate_id,
                    state.new_certificate_id,
                    RotationProgress.COMMITTED,
                ),
            )
        ports.publisher.publish(Topics.accepted(Topics.commit(context.thing)), commit_accepted())
        return _record(HandlerResult(COMMIT, context.thing, job_id, "accepted", decision.value))
    except (ProtocolError, Rejection) as exc:
        return _reject(ports, COMMIT, Topics.commit(context.thing), context.thing, job_id, str(exc))


# ----------------------------------------------------------------------------------------- terminal


def ignore_malformed_event(reason: str) -> HandlerResult:
    """A job execution event that did not parse: nothing to act on, but it is on the record."""
    return _record(HandlerResult(TERMINAL, None, None, "ignored", reason))


def handle_job_execution_terminal(
    execution: JobExecutionEvent, ports: Ports, rotation_jobs: RotationJobs | None = None
) -> HandlerResult:
    """The end of a job execution, any job's: act by DESIGN.md's table on the backend's own record.

    `rotation_jobs` remembers which jobs are rotations (the Lambda keeps one per container); without it
    the job is looked up through `ports.jobs` every time. Errors the ports raise propagate, except a
    certificate deletion the service refused for good (`PermanentFailure`), which is reported: the
    caller runs the event again, and every step below may be repeated without harm.
    """
    thing, job_id, status = execution.thing, execution.job_id, execution.status
    if not status.is_terminal:
        return _record(HandlerResult(TERMINAL, thing, job_id, "ignored", f"{status.value} is not terminal"))
    jobs = rotation_jobs if rotation_jobs is not None else RotationJobs(partial(_execution_document, ports))
    # A job that is known not to be a rotation can have no rotation state: no call at all.
    rotation = jobs.is_rotation(thing, job_id)
    if rotation is False:
        return _record(HandlerResult(TERMINAL, thing, job_id, "ignored", "not a certificate rotation job"))

    state = ports.state.load(thing)
    ours = state if state is not None and state.job_id == job_id else None
    plan = decisions.terminal_plan(status, ours.progress if ours else None, rotation)
    if plan.verdict is decisions.Verdict.IGNORE:
        return _record(HandlerResult(TERMINAL, thing, job_id, "ignored", plan.outcome))
    if plan.verdict is decisions.Verdict.DUPLICATE:
        return _record(HandlerResult(TERMINAL, thing, job_id, "duplicate", plan.outcome))

    outcome, action, notify = plan.outcome, plan.action, plan.notify
    if ours is not None and plan.cleanup is not decisions.Cleanup.NONE:
        doomed = (
            ours.old_certificate_id
            if plan.cleanup is decisions.Cleanup.DELETE_OLD
            else ours.new_certificate_id
        )
        try:
            ports.registry.delete_certificate(thing, doomed)
        except PermanentFailure as exc:
            log.exception("deleting certificate %s of %s failed for good", doomed, thing)
            outcome = f"{outcome} FAILED: could not delete certificate {doomed}: {exc}"
            action = f"delete certificate {doomed} and detach it from {thing}"
            notify = True
    if notify:
        details = dict(execution.status_details)  # the device's own words, for the operator only
        if ours is not None:
            details |= {
                "oldCertificateId": ours.old_certificate_id,
                "newCertificateId": ours.new_certificate_id,
                "progress": ours.progress.value,
            }
        ports.notifier.notify(Notification(thing, job_id, status.value, outcome, action, details))
    # Last, so that a retry after any failure above does everything again. Looked at once more: a
    # create for the thing's next job may have written since (it cannot have before the cleanup).
    if ours is not None and plan.mark_terminated and ports.state.load(thing) == ours:
        ports.state.save(thing, ours.advanced(RotationProgress.TERMINATED))
    return _record(HandlerResult(TERMINAL, thing, job_id, status.value.lower(), outcome))


def _execution_document(ports: Ports, thing: str, job_id: str) -> object | None:
    execution = ports.jobs.describe_execution(thing, job_id)
    return execution.document if execution is not None else None
