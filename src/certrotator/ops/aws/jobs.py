"""The operator's side of a fleet on AWS: rotation jobs from the job template, as plain functions over
boto3 clients (the `certrotator aws` commands are thin wrappers over these).

Every function takes an `AwsClients`, so tests hand in moto-backed or Stubber-wrapped clients. What AWS
would reject (ranges, options that only make sense together) is checked here first, so a typo costs no
API call and the message names the option. A missing resource is reported by name, not as the
service's anonymous "The specified resource does not exist".

boto3 plumbing is in `clients`, what a job may override of its template in `job_overrides`, the
Greengrass commands in `greengrass`, the readiness checks in `checks`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

from botocore.exceptions import ClientError

from certrotator.ops.aws.clients import (
    AwsClients,
    OperationError,
    error_code,
    is_not_found,
    named,
    thing_arn,
    thing_group_arn,
)
from certrotator.ops.aws.job_overrides import JobOverrides
from certrotator.protocol import (
    ACTIVE_EXECUTION_STATUSES,
    FAILURE_REASON_KEY,
    FINISHED_JOB_STATUSES,
    JOB_DOCUMENT,
    UNSUCCESSFUL_EXECUTION_STATUSES,
    ProtocolError,
    validate_job_id,
)
from certrotator.protocol import JobExecutionStatus as S

DEFAULT_TEMPLATE: Final = "AWSLabsCertificateRotator"
# AWS IoT Jobs' limit on a cancellation's comment (CancelJob API reference).
MAX_COMMENT_LENGTH: Final = 2028

# Execution status -> describe_job's jobProcessDetails counter.
EXECUTION_COUNTERS: Final[dict[str, str]] = {
    S.QUEUED: "numberOfQueuedThings",
    S.IN_PROGRESS: "numberOfInProgressThings",
    S.SUCCEEDED: "numberOfSucceededThings",
    S.FAILED: "numberOfFailedThings",
    S.TIMED_OUT: "numberOfTimedOutThings",
    S.REJECTED: "numberOfRejectedThings",
    S.CANCELED: "numberOfCanceledThings",
    S.REMOVED: "numberOfRemovedThings",
}


def document_of(template: dict[str, Any]) -> Any:
    try:
        return json.loads(template.get("document") or "null")
    except ValueError:
        return None


def rotation_template_arn(clients: AwsClients, template: str) -> str:
    """The template's ARN, refusing one whose document is not the rotation document (devices would
    reject its jobs)."""
    with named(f"job template {template!r}", clients.region):
        described = clients.iot.describe_job_template(jobTemplateId=template)
    if document_of(cast(dict[str, Any], described)) != JOB_DOCUMENT:
        raise OperationError(
            f"job template {template!r} does not carry the rotation document {json.dumps(JOB_DOCUMENT)}"
        )
    return described["jobTemplateArn"]


# ---------------------------------------------------------------------------------------- create job


@dataclass(frozen=True, slots=True)
class CreatedJob:
    job_id: str
    job_arn: str
    template_arn: str
    targets: list[str]


def default_job_id(now: float | None = None) -> str:
    return f"rotate-{int(time.time() if now is None else now)}"


def create_job(
    clients: AwsClients,
    *,
    things: Sequence[str] = (),
    groups: Sequence[str] = (),
    job_id: str | None = None,
    template: str = DEFAULT_TEMPLATE,
    overrides: JobOverrides | None = None,
) -> CreatedJob:
    """A rotation job from the template for things and thing groups (a SNAPSHOT: things added to a
    group later are not rotated by this job)."""
    if not things and not groups:
        raise OperationError("give at least one --thing or --group")
    api = (overrides or JobOverrides()).to_api()
    job_id = job_id or default_job_id()
    try:
        validate_job_id(job_id)
    except ProtocolError as exc:
        raise OperationError(str(exc)) from None
    targets = [thing_arn(clients, t) for t in dict.fromkeys(things)]
    targets += [thing_group_arn(clients, g) for g in dict.fromkeys(groups)]
    template_arn = rotation_template_arn(clients, template)
    try:
        created = clients.iot.create_job(
            jobId=job_id,
            targets=targets,
            targetSelection="SNAPSHOT",
            jobTemplateArn=template_arn,
            **api,
        )
    except ClientError as exc:
        if error_code(exc) == "ResourceAlreadyExistsException":
            raise OperationError(f"job {job_id!r} already exists: pick another --job-id") from None
        raise
    return CreatedJob(created["jobId"], created["jobArn"], template_arn, targets)


# -------------------------------------------------------------------------------------- describe job


@dataclass(frozen=True, slots=True)
class ExecutionFailure:
    thing: str
    status: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"thing": self.thing, "status": self.status, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class JobReport:
    job_id: str
    status: str
    counts: dict[str, int]
    targets: list[str] = field(default_factory=list)
    template_arn: str | None = None
    comment: str | None = None
    failures: list[ExecutionFailure] = field(default_factory=list)
    failures_truncated: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(n for status, n in self.counts.items() if status not in ACTIVE_EXECUTION_STATUSES)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_JOB_STATUSES

    def to_json(self) -> dict[str, Any]:
        return {
            "jobId": self.job_id,
            "status": self.status,
            "targets": self.targets,
            "jobTemplateArn": self.template_arn,
            "comment": self.comment,
            "executions": self.counts,
            "failures": [f.to_json() for f in self.failures],
            "failuresTruncated": self.failures_truncated,
        }


def job_status(clients: AwsClients, job_id: str) -> JobReport:
    """Status and execution counts: one describe_job call, cheap enough to poll."""
    with named(f"job {job_id!r}", clients.region):
        job = clients.iot.describe_job(jobId=job_id)["job"]
    details = cast(dict[str, Any], job.get("jobProcessDetails", {}))
    counts = {status: int(details.get(counter, 0)) for status, counter in EXECUTION_COUNTERS.items()}
    return JobReport(
        job_id=job_id,
        status=str(job.get("status", "UNKNOWN")),
        counts=counts,
        targets=list(job.get("targets", [])),
        template_arn=job.get("jobTemplateArn"),
        comment=job.get("comment"),
    )


def execution_failures(
    clients: AwsClients, report: JobReport, limit: int = 50
) -> tuple[list[ExecutionFailure], bool]:
    """Up to `limit` failed, timed-out, rejected or canceled executions with the device's reason
    (statusDetails' DeviceFailureReason); True when there were more. Only statuses the counts show
    are listed, so a clean job costs no extra call."""
    iot = clients.iot
    failures: list[ExecutionFailure] = []
    for status in UNSUCCESSFUL_EXECUTION_STATUSES:
        if report.counts.get(status, 0) == 0:
            continue
        token: str | None = None
        while True:
            if len(failures) >= limit:
                return failures, True
            kwargs: dict[str, Any] = {"jobId": report.job_id, "status": status, "maxResults": 100}
            if token:
                kwargs["nextToken"] = token
            page = iot.list_job_executions_for_job(**kwargs)
            for summary in page.get("executionSummaries", []):
                if len(failures) >= limit:
                    return failures, True
                thing = summary.get("thingArn", "").rsplit("/", 1)[-1]
                failures.append(
                    ExecutionFailure(thing, status, _failure_reason(clients, report.job_id, thing))
                )
            token = page.get("nextToken")
            if not token:
                break
    return failures, False


def _failure_reason(clients: AwsClients, job_id: str, thing: str) -> str:
    try:
        execution = clients.iot.describe_job_execution(jobId=job_id, thingName=thing)["execution"]
    except ClientError as exc:
        if is_not_found(exc):  # deleted since it was listed
            return ""
        raise
    details = execution.get("statusDetails", {}).get("detailsMap", {})
    return str(details.get(FAILURE_REASON_KEY, ""))


def describe_job(clients: AwsClients, job_id: str, max_failures: int = 50) -> JobReport:
    report = job_status(clients, job_id)
    failures, truncated = execution_failures(clients, report, max_failures)
    return JobReport(
        report.job_id,
        report.status,
        report.counts,
        report.targets,
        report.template_arn,
        report.comment,
        failures,
        truncated,
    )


def watch_job(
    clients: AwsClients,
    job_id: str,
    *,
    interval: float,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[JobReport]:
    """Poll the job's counts every `interval` seconds, yielding each snapshot, until it finishes or
    `timeout` seconds pass (the last snapshot then has `finished` False)."""
    deadline = clock() + timeout
    while True:
        report = job_status(clients, job_id)
        yield report
        if report.finished or clock() >= deadline:
            return
        sleep(max(0.0, min(interval, deadline - clock())))


# ---------------------------------------------------------------------------------------- cancel job


def cancel_job(
    clients: AwsClients, job_id: str, *, force: bool = False, comment: str | None = None
) -> JobReport:
    """Cancel a job: QUEUED executions are canceled; IN_PROGRESS ones too with `force` (a device in
    the middle of a rotation then rolls back on its own)."""
    if comment is not None and not 0 < len(comment) <= MAX_COMMENT_LENGTH:
        raise OperationError(f"--comment must be 1-{MAX_COMMENT_LENGTH} characters")
    before = job_status(clients, job_id)
    if before.finished:
        raise OperationError(f"job {job_id!r} is already {before.status}: nothing to cancel")
    kwargs: dict[str, Any] = {"jobId": job_id, "force": force}
    if comment:
        kwargs["comment"] = comment
    try:
        clients.iot.cancel_job(**kwargs)
    except ClientError as exc:
        if error_code(exc) == "InvalidStateTransitionException":
            raise OperationError(f"job {job_id!r} cannot be canceled now: {exc}") from None
        raise
    return job_status(clients, job_id)
