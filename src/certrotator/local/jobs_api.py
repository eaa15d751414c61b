"""The MQTT Jobs API subset of DESIGN.md §2 ($next/get, {jobId}/get, {jobId}/update, notify-next),
with AWS IoT's message shapes and error codes. Turns one device request into the replies to publish
and the facts the engine acts on (a terminal execution to route to the rule, notify-next to send).
What a device's update does to an execution is `device_transition`, pure."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from certrotator.local.job_records import Execution, JobError, Rejection
from certrotator.local.jobs import JobStore
from certrotator.protocol import (
    JobExecutionStatus,
    ParsedTopic,
    ProtocolError,
    TopicKind,
    Topics,
    decode_json_object,
)
from certrotator.status_details import coerce_status_details

S = JobExecutionStatus


# What a device may ask for, from each status (AWS IoT Jobs UpdateJobExecution).
_DEVICE_TARGETS = frozenset({S.IN_PROGRESS, S.SUCCEEDED, S.FAILED, S.REJECTED})


def device_transition(
    execution: Execution,
    status: str,
    status_details: object,
    expected_version: object,
    now: float,
    timeout_s: float | None,
) -> Execution:
    """The execution after a device's update, or JobError with AWS's code. Pure."""
    try:
        target = S(status)
    except ValueError:
        raise JobError("InvalidRequest", f"unknown status {status!r}") from None
    if expected_version is not None and expected_version != execution.version:
        raise JobError(
            "VersionMismatch", f"expected version {expected_version}, execution is at {execution.version}"
        )
    if execution.status.is_terminal:
        raise JobError(
            "InvalidStateTransition",
            f"job execution is already {execution.status.value}; it cannot become {target.value}",
        )
    if target not in _DEVICE_TARGETS:
        raise JobError("InvalidStateTransition", f"a device cannot set status {target.value}")
    try:
        details = (
            dict(execution.status_details)
            if status_details is None
            else coerce_status_details(status_details)
        )
    except ProtocolError as exc:
        raise JobError("InvalidRequest", str(exc)) from None
    started = execution.started_at
    timeout_at = execution.timeout_at
    if target is S.IN_PROGRESS and execution.status is S.QUEUED:
        started = now
        timeout_at = now + timeout_s if timeout_s is not None else None
    if target.is_terminal:
        timeout_at = None
    return replace(
        execution,
        status=target,
        status_details=details,
        version=execution.version + 1,
        started_at=started,
        updated_at=now,
        timeout_at=timeout_at,
    )


@dataclass
class JobsOutcome:
    replies: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    changed: Execution | None = None  # an execution whose status changed (terminal or not)


def execution_message(e: Execution, include_document: bool = True) -> dict[str, Any]:
    message: dict[str, Any] = {
        "jobId": e.job_id,
        "thingName": e.thing,
        "status": e.status.value,
        "statusDetails": dict(e.status_details),
        "queuedAt": int(e.queued_at),
        "lastUpdatedAt": int(e.updated_at),
        "versionNumber": e.version,
        "executionNumber": e.execution_number,
    }
    if e.started_at is not None:
        message["startedAt"] = int(e.started_at)
    if include_document:
        message["jobDocument"] = e.document
    return message


def notify_next_message(e: Execution | None, now: float) -> dict[str, Any]:
    """notify-next payload: the next pending execution, or no `execution` key when there is none."""
    message: dict[str, Any] = {"timestamp": int(now)}
    if e is not None:
        message["execution"] = execution_message(e)
    return message


def _rejection(code: str, message: str, now: float, token: object) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message, "timestamp": int(now)}
    if isinstance(token, str):
        body["clientToken"] = token
    return body


def handle_jobs_request(
    store: JobStore, topic: str, parsed: ParsedTopic, payload: bytes, now: float
) -> JobsOutcome:
    """Answer one Jobs API request from a device (the broker already checked the thing's identity)."""
    outcome = JobsOutcome()
    thing = parsed.thing
    assert thing is not None and parsed.job_id is not None
    try:
        body = decode_json_object(payload or b"{}", "jobs request")
    except ProtocolError as exc:
        if parsed.kind is TopicKind.UPDATE:
            store.record_rejection(Rejection(parsed.job_id, thing, "", "InvalidRequest", str(exc), now))
        outcome.replies.append((Topics.rejected(topic), _rejection("InvalidRequest", str(exc), now, None)))
        return outcome
    token = body.get("clientToken")
    try:
        if parsed.kind is TopicKind.GET:
            outcome.replies.append((Topics.accepted(topic), _get(store, thing, parsed.job_id, body, now)))
        elif parsed.kind is TopicKind.UPDATE:
            reply, changed = _update(store, thing, parsed.job_id, body, now)
            outcome.replies.append((Topics.accepted(topic), reply))
            outcome.changed = changed
    except JobError as exc:
        outcome.replies.append((Topics.rejected(topic), _rejection(exc.code, str(exc), now, token)))
    return outcome


def _get(store: JobStore, thing: str, job_id: str, body: dict[str, Any], now: float) -> dict[str, Any]:
    reply: dict[str, Any] = {"timestamp": int(now)}
    if isinstance(body.get("clientToken"), str):
        reply["clientToken"] = body["clientToken"]
    include_document = body.get("includeJobDocument", True) is not False
    if job_id == "$next":
        execution = store.next_execution(thing)
        if execution is not None:
            reply["execution"] = execution_message(execution, include_document)
        return reply
    execution = store.execution(thing, job_id)
    if execution is None:
        raise JobError("ResourceNotFound", f"no execution of job {job_id!r} for thing {thing!r}")
    reply["execution"] = execution_message(execution, include_document)
    return reply


def _update(
    store: JobStore, thing: str, job_id: str, body: dict[str, Any], now: float
) -> tuple[dict[str, Any], Execution]:
    current = store.execution(thing, job_id)
    if current is None:
        raise JobError("ResourceNotFound", f"no execution of job {job_id!r} for thing {thing!r}")
    status = body.get("status")
    try:
        updated = _transition(store, current, status, body, now)
    except JobError as exc:
        # The device hears /rejected; the operator sees it in `jobs describe`, not only a status that
        # did not move.
        requested = status if isinstance(status, str) else ""
        store.record_rejection(Rejection(job_id, thing, requested, exc.code, str(exc), now))
        raise
    reply: dict[str, Any] = {"timestamp": int(now)}
    if isinstance(body.get("clientToken"), str):
        reply["clientToken"] = body["clientToken"]
    if body.get("includeJobExecutionState"):
        reply["executionState"] = {
            "status": updated.status.value,
            "statusDetails": dict(updated.status_details),
            "versionNumber": updated.version,
        }
    if body.get("includeJobDocument"):
        reply["jobDocument"] = updated.document
    return reply, updated


def _transition(
    store: JobStore, current: Execution, status: object, body: dict[str, Any], now: float
) -> Execution:
    """Apply a device's update to `current` and save it, or raise JobError with AWS's code."""
    if not isinstance(status, str):
        raise JobError("InvalidRequest", "'status' is required")
    config = store.config(current.job_id)
    timeout_s = config.in_progress_timeout_s if config else None
    step = body.get("stepTimeoutInMinutes")
    if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
        timeout_s = min(timeout_s, step * 60.0) if timeout_s else step * 60.0
    updated = device_transition(
        current, status, body.get("statusDetails"), body.get("expectedVersion"), now, timeout_s
    )
    store.save_execution(updated, current.version)
    return updated
