"""`schedule --aws`, and the stack's scheduled renewal Lambda: the policy's facts from AWS IoT, jobs
through `ops.aws.jobs.create_job` (what `certrotator aws create-job` runs).

Facts per thing: its exclusive principals (ListThingPrincipalsV2), each certificate's status and
validity (DescribeCertificate), its job executions (ListJobExecutionsForThing), each job's document
asked once per run (GetJobDocument) to tell rotations from other jobs. Three calls per thing and one
per job: the whole-fleet run costs ~3 calls per thing, so for large fleets the Device Defender trigger
is cheaper: its audit (DEVICE_CERTIFICATE_EXPIRING_CHECK) names the expiring certificates, and only
their things are looked at (ListAuditFindings, then ListPrincipalThings per certificate).

The audit's SNS notification carries counts per check, not the certificates (AWS IoT Developer Guide,
Device Defender audit "Notifications", payload schema `arn:aws:iot:::schema:auditnotification/1.0`):
`taskId` and `auditDetails[].{checkName, checkRunStatus, nonCompliantResourcesCount}`; the findings
come from ListAuditFindings(taskId, checkName), each `nonCompliantResource.resourceIdentifier
.deviceCertificateId`. See docs/decisions.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, Final

from botocore.exceptions import ClientError

from certrotator.ops.aws.clients import AwsClients, is_not_found, unless_missing
from certrotator.ops.aws.jobs import DEFAULT_TEMPLATE, create_job
from certrotator.ops.schedule.facts import certificate_details
from certrotator.ops.schedule.policy import CertificateFacts, Rotation, ThingFacts
from certrotator.ops.schedule.runner import run
from certrotator.ops.schedule.settings import parse_spec
from certrotator.protocol import JobExecutionStatus, is_rotation_document

log = logging.getLogger("certrotator.schedule")

EXCLUSIVE_THING: Final = "EXCLUSIVE_THING"
# The audit check's name as the API and the console spell it today, and as the developer guide's
# notification example spelled it; either one is taken.
EXPIRING_CHECKS: Final = frozenset(
    {"DEVICE_CERTIFICATE_EXPIRING_CHECK", "DEVICE_CERT_APPROACHING_EXPIRATION_CHECK"}
)
NON_COMPLIANT: Final = "COMPLETED_NON_COMPLIANT"


def _epoch(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value or 0.0)


class AwsBackend:
    """`runner.Backend` on AWS IoT, over the operator's (or the function's) IoT client."""

    def __init__(
        self, clients: AwsClients, *, template: str = DEFAULT_TEMPLATE, details: bool = False
    ) -> None:
        self.clients, self.template, self.details = clients, template, details
        self._rotation_jobs: dict[str, bool] = {}
        self._groups: dict[str, tuple[str, ...]] = {}

    # ------------------------------------------------------------------------------------- facts

    def things(self, group: str | None) -> Iterator[str]:
        iot = self.clients.iot
        if group is None:
            for page in iot.get_paginator("list_things").paginate():
                yield from (t["thingName"] for t in page.get("things", []) if "thingName" in t)
            return
        for members in iot.get_paginator("list_things_in_thing_group").paginate(thingGroupName=group):
            yield from members.get("things", [])

    def fleet(self, group: str | None) -> Iterator[ThingFacts]:
        groups = (group,) if group is not None else ()
        for thing in self.things(group):
            yield self.facts(thing, groups)

    def facts(self, thing: str, groups: tuple[str, ...] = ()) -> ThingFacts:
        certificates = tuple(c for c in (self._certificate(cid) for cid in self._principals(thing)) if c)
        return ThingFacts(thing, certificates, tuple(self._rotations(thing)), groups)

    def facts_with_groups(self, things: Sequence[str]) -> Iterator[ThingFacts]:
        """Facts of the named things, with their thing groups (for the policy's group scope)."""
        for thing in dict.fromkeys(things):
            yield self.facts(thing, self._thing_groups(thing))

    def _principals(self, thing: str) -> list[str]:
        ids: list[str] = []
        paginator = self.clients.iot.get_paginator("list_thing_principals_v2")
        for page in paginator.paginate(thingName=thing, thingPrincipalType=EXCLUSIVE_THING):
            for item in page.get("thingPrincipalObjects", []):
                principal = item.get("principal", "")
                if (
                    ":cert/" in principal
                    and item.get("thingPrincipalType", EXCLUSIVE_THING) == EXCLUSIVE_THING
                ):
                    ids.append(principal.rsplit("/", 1)[1].lower())
        return ids

    def _certificate(self, certificate_id: str) -> CertificateFacts | None:
        described = unless_missing(
            lambda: self.clients.iot.describe_certificate(certificateId=certificate_id)
        )
        if described is None:
            return None
        description = described["certificateDescription"]
        validity = description.get("validity", {})
        issuer, key_algorithm = (
            certificate_details(description.get("certificatePem", "")) if self.details else ("", "")
        )
        return CertificateFacts(
            certificate_id,
            _epoch(validity.get("notBefore")),
            _epoch(validity.get("notAfter")),
            str(description.get("status", "")),
            issuer,
            key_algorithm,
        )

    def _rotations(self, thing: str) -> Iterator[Rotation]:
        kwargs: dict[str, Any] = {"thingName": thing}
        while True:
            page = self.clients.iot.list_job_executions_for_thing(**kwargs)
            for summary in page.get("executionSummaries", []):
                job_id = summary.get("jobId")
                execution = summary.get("jobExecutionSummary", {})
                if not job_id or not self._is_rotation(job_id):
                    continue
                status = JobExecutionStatus(execution.get("status", JobExecutionStatus.QUEUED.value))
                ended = _epoch(execution.get("lastUpdatedAt")) if status.is_terminal else None
                yield Rotation(job_id, status.value, _epoch(execution.get("queuedAt")), ended)
            token = page.get("nextToken")
            if not token:
                return
            kwargs["nextToken"] = token

    def _is_rotation(self, job_id: str) -> bool:
        if job_id not in self._rotation_jobs:
            try:
                text = self.clients.iot.get_job_document(jobId=job_id).get("document", "")
                self._rotation_jobs[job_id] = is_rotation_document(json.loads(text or "null"))
            except (ClientError, ValueError) as exc:
                # A rotation not recognised only loses history (no back-off); counting another job
                # as one would block the thing, so unreadable documents count as not a rotation.
                log.warning("could not read job %s's document (%s): not counted as a rotation", job_id, exc)
                self._rotation_jobs[job_id] = False
        return self._rotation_jobs[job_id]

    def _thing_groups(self, thing: str) -> tuple[str, ...]:
        if thing not in self._groups:
            names: list[str] = []
            for page in self.clients.iot.get_paginator("list_thing_groups_for_thing").paginate(
                thingName=thing
            ):
                names.extend(g["groupName"] for g in page.get("thingGroups", []) if "groupName" in g)
            self._groups[thing] = tuple(names)
        return self._groups[thing]

    # ----------------------------------------------------------------------------------- changes

    def create_job(self, job_id: str, things: Sequence[str]) -> None:
        create_job(self.clients, things=things, job_id=job_id, template=self.template)

    # ------------------------------------------------------------------------------------- audit

    def audited_things(self, task_id: str, check_name: str) -> list[str]:
        """The things holding the certificates an audit task's check found non-compliant."""
        certificates: list[str] = []
        kwargs: dict[str, Any] = {"taskId": task_id, "checkName": check_name, "maxResults": 250}
        while True:
            page = self.clients.iot.list_audit_findings(**kwargs)
            for finding in page.get("findings", []):
                resource = finding.get("nonCompliantResource", {}).get("resourceIdentifier", {})
                if resource.get("deviceCertificateId"):
                    certificates.append(resource["deviceCertificateId"])
            token = page.get("nextToken")
            if not token:
                break
            kwargs["nextToken"] = token
        account, partition = self.clients.identity()
        things: list[str] = []
        for certificate_id in dict.fromkeys(certificates):
            arn = f"arn:{partition}:iot:{self.clients.region}:{account}:cert/{certificate_id}"
            try:
                things.extend(self.clients.iot.list_principal_things(principal=arn).get("things", []))
            except ClientError as exc:
                if not is_not_found(exc):  # deleted since the audit: nothing to renew
                    raise
        return list(dict.fromkeys(things))


def expiring_checks(notification: dict[str, Any]) -> list[tuple[str, str]]:
    """(taskId, checkName) of a Device Defender audit notification's expiring-certificate checks that
    found non-compliant certificates; [] for any other notification."""
    task_id = notification.get("taskId")
    details = notification.get("auditDetails")
    if not isinstance(task_id, str) or not isinstance(details, list):
        return []
    return [
        (task_id, str(d["checkName"]))
        for d in details
        if isinstance(d, dict)
        and d.get("checkName") in EXPIRING_CHECKS
        and d.get("checkRunStatus") == NON_COMPLIANT
        and int(d.get("nonCompliantResourcesCount") or 0) > 0
    ]


def sns_messages(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON messages of an SNS-triggered invocation (`Records[].Sns.Message`); [] otherwise."""
    messages = []
    for record in event.get("Records", []) if isinstance(event.get("Records"), list) else []:
        text = record.get("Sns", {}).get("Message") if isinstance(record, dict) else None
        try:
            message = json.loads(text) if isinstance(text, str) else None
        except ValueError:
            message = None
        if isinstance(message, dict):
            messages.append(message)
    return messages


# ------------------------------------------------------------------------------------ the Lambda

POLICY_ENV: Final = "RENEWAL_POLICY"  # the spec, as `local up --schedule` takes it (without every)
TEMPLATE_ENV: Final = "JOB_TEMPLATE"
REGION_ENV: Final = "AWS_REGION"  # set by Lambda
JOB_PREFIX_SCHEDULED: Final = "renew"
JOB_PREFIX_AUDIT: Final = "renew-audit"


def scheduled_handler(event: dict[str, Any], _context: object = None) -> dict[str, Any]:
    """Entry point of the stack's renewal function: an EventBridge schedule (`{"dryRun": false}`) runs
    the policy over the fleet (or its group); a Device Defender audit notification through SNS runs it
    over the things whose certificates the expiring-certificate check flagged. Returns the run's
    summary (counts per decision, jobs created or failed)."""
    settings = parse_spec(os.environ[POLICY_ENV]).settings
    clients = AwsClients.from_session(os.environ[REGION_ENV])
    backend = AwsBackend(clients, template=os.environ.get(TEMPLATE_ENV) or DEFAULT_TEMPLATE)
    now = time.time()
    dry_run = bool(event.get("dryRun", False))
    messages = sns_messages(event)
    if not messages:
        result = run(backend, settings, now, dry_run=dry_run, job_prefix=JOB_PREFIX_SCHEDULED)
        return {"trigger": "schedule", **result.summary()}
    checks = [check for message in messages for check in expiring_checks(message)]
    things = [t for task_id, check in checks for t in backend.audited_things(task_id, check)]
    result = run(
        backend,
        settings,
        now,
        dry_run=dry_run,
        job_prefix=JOB_PREFIX_AUDIT,
        fleet=backend.facts_with_groups(things),
    )
    return {"trigger": "audit", "auditTasks": sorted({t for t, _ in checks}), **result.summary()}
