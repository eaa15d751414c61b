"""`schedule --aws` and the renewal Lambda on moto: certificates with controlled validity, rotation
history from job executions, jobs created from the template as `aws create-job` creates them; the
Device Defender path with ListAuditFindings (which moto lacks) answered by a botocore stub."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import boto3
import moto  # noqa: F401 -- must precede every boto3 client
import pytest
from botocore.stub import Stubber
from moto import mock_aws
from moto.iot.models import iot_backends
from typer.testing import CliRunner

from certrotator.cli import app
from certrotator.compat import UTC
from certrotator.ops.aws.clients import AwsClients
from certrotator.ops.schedule import aws as schedule_aws
from certrotator.ops.schedule.aws import AwsBackend, expiring_checks, scheduled_handler, sns_messages
from certrotator.ops.schedule.policy import Verdict
from certrotator.ops.schedule.runner import run
from certrotator.ops.schedule.settings import DAY, Settings
from certrotator.protocol import JOB_DOCUMENT
from tests.aws_isolation import isolate_from_aws

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
TEMPLATE = "AWSLabsCertificateRotator"
RENEW_30D = Settings(renew_before_s=30 * DAY)


@pytest.fixture(autouse=True)
def aws_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    isolate_from_aws(monkeypatch, tmp_path_factory, REGION)


class Fleet:
    """moto's account: the job template, things with one certificate each, rotation jobs."""

    def __init__(self) -> None:
        self.clients = AwsClients(lambda name: boto3.client(name, region_name=REGION))
        self.iot = self.clients.iot
        self.iot.create_job_template(
            jobTemplateId=TEMPLATE, description="rotation", document=json.dumps(JOB_DOCUMENT)
        )
        self.certificates: dict[str, str] = {}

    def thing(self, name: str, expires_in_days: float, group: str | None = None) -> str:
        self.iot.create_thing(thingName=name)
        created = self.iot.create_keys_and_certificate(setAsActive=True)
        self.iot.attach_thing_principal(
            thingName=name, principal=created["certificateArn"], thingPrincipalType="EXCLUSIVE_THING"
        )
        certificate_id = str(created["certificateId"])
        fake = iot_backends[ACCOUNT][REGION].certificates[certificate_id]
        fake.validity_not_before = datetime.now(UTC) - timedelta(days=30)
        fake.validity_not_after = datetime.now(UTC) + timedelta(days=expires_in_days)
        if group is not None:
            with contextlib.suppress(self.iot.exceptions.ResourceAlreadyExistsException):
                self.iot.create_thing_group(thingGroupName=group)
            self.iot.add_thing_to_thing_group(thingGroupName=group, thingName=name)
        self.certificates[name] = certificate_id.lower()
        return certificate_id

    def rotation(self, job_id: str, thing: str, status: str | None = None, ended_ago_s: float = 0.0) -> None:
        """A rotation job for the thing; its execution set to `status` (moto queues it)."""
        arn = self.iot.describe_thing(thingName=thing)["thingArn"]
        self.iot.create_job(jobId=job_id, targets=[arn], document=json.dumps(JOB_DOCUMENT))
        if status is not None:
            execution = iot_backends[ACCOUNT][REGION].job_executions[(job_id, thing)]
            execution.status = status
            execution.last_updated_at = datetime.now(UTC) - timedelta(seconds=ended_ago_s)

    def job_targets(self) -> dict[str, list[str]]:
        """Jobs created by the scheduler (id prefix renew), with their targets' thing names."""
        jobs = iot_backends[ACCOUNT][REGION].jobs
        return {
            job_id: sorted(t.rsplit("/", 1)[1] for t in job.targets)
            for job_id, job in jobs.items()
            if job_id.startswith("renew")
        }


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    with mock_aws():
        yield Fleet()


def populate(fleet: Fleet) -> None:
    fleet.thing("soon-1", 10, group="line")
    fleet.thing("soon-2", 9)
    fleet.thing("year-1", 365, group="line")
    fleet.thing("busy", 5)
    fleet.rotation("manual-1", "busy", "IN_PROGRESS")
    fleet.thing("failed", 8)
    fleet.rotation("earlier-1", "failed", "FAILED", ended_ago_s=600)
    fleet.thing("firmware", 7)  # another kind of job does not count as a rotation
    arn = fleet.iot.describe_thing(thingName="firmware")["thingArn"]
    fleet.iot.create_job(jobId="firmware-9", targets=[arn], document='{"operation":"UPGRADE"}')


def test_the_due_things_get_one_job_from_the_template(fleet: Fleet) -> None:
    populate(fleet)
    calls: list[dict[str, Any]] = []
    fleet.iot.meta.events.register(
        "provide-client-params.iot.CreateJob", lambda params, **_: calls.append(params)
    )
    result = run(AwsBackend(fleet.clients), RENEW_30D, time.time())
    verdicts = {d.thing: d.verdict for d in result.decisions}
    assert verdicts == {
        "soon-1": Verdict.ROTATE,
        "soon-2": Verdict.ROTATE,
        "year-1": Verdict.WAIT,
        "busy": Verdict.IN_PROGRESS,
        "failed": Verdict.BACKOFF,
        "firmware": Verdict.ROTATE,
    }
    assert result.failed == {} and len(result.created) == 1
    (job_id,) = result.created
    assert fleet.job_targets() == {job_id: ["firmware", "soon-1", "soon-2"]}
    # the `aws create-job` path: from the template, a snapshot of exactly these things
    ((params),) = calls
    assert params["jobTemplateArn"].endswith(f"jobtemplate/{TEMPLATE}")
    assert params["targetSelection"] == "SNAPSHOT" and "document" not in params


def test_dry_run_and_group_scope(fleet: Fleet) -> None:
    populate(fleet)
    scoped = Settings(renew_before_s=30 * DAY, group="line")
    result = run(AwsBackend(fleet.clients), scoped, time.time(), dry_run=True)
    assert {d.thing: d.verdict for d in result.decisions} == {
        "soon-1": Verdict.ROTATE,
        "year-1": Verdict.WAIT,
    }
    assert [j.things for j in result.jobs] == [("soon-1",)]
    assert fleet.job_targets() == {}  # nothing created


def test_the_cli_json_dry_run(fleet: Fleet) -> None:
    populate(fleet)
    outcome = CliRunner().invoke(app, ["schedule", "--aws", "--renew-before", "30d", "--dry-run", "--json"])
    assert outcome.exit_code == 0, outcome.output
    body = json.loads(outcome.output)
    assert body["dryRun"] is True and body["rotate"] == 3 and body["created"] == []
    rows = {r["thing"]: r for r in body["decisions"]}
    assert rows["failed"]["decision"] == "backoff" and "FAILED (job earlier-1)" in rows["failed"]["reason"]
    assert rows["busy"]["decision"] == "in-progress"


# ------------------------------------------------------------------------------- Device Defender


NOTIFICATION: dict[str, Any] = {
    "accountId": ACCOUNT,
    "taskId": "4e2bcd1ccbc2a5dd15292a82ab80c380",
    "taskStatus": "COMPLETED",
    "taskType": "SCHEDULED_AUDIT_TASK",
    "scheduledAuditName": "daily",
    "failedChecksCount": 0,
    "canceledChecksCount": 0,
    "nonCompliantChecksCount": 1,
    "compliantChecksCount": 1,
    "totalChecksCount": 2,
    "taskStartTime": 1524740766191,
    "auditDetails": [
        {
            "checkName": "DEVICE_CERTIFICATE_EXPIRING_CHECK",
            "checkRunStatus": "COMPLETED_NON_COMPLIANT",
            "nonCompliantResourcesCount": 2,
            "totalResourcesCount": 6,
        },
        {
            "checkName": "REVOKED_CA_CERT_CHECK",
            "checkRunStatus": "COMPLETED_COMPLIANT",
            "nonCompliantResourcesCount": 0,
            "totalResourcesCount": 1,
        },
    ],
}


def sns_event(message: dict[str, Any]) -> dict[str, Any]:
    return {"Records": [{"EventSource": "aws:sns", "Sns": {"Message": json.dumps(message)}}]}


def test_the_audit_notification_names_the_expiring_check_only() -> None:
    assert sns_messages(sns_event(NOTIFICATION)) == [NOTIFICATION]
    assert expiring_checks(NOTIFICATION) == [(NOTIFICATION["taskId"], "DEVICE_CERTIFICATE_EXPIRING_CHECK")]
    compliant = {**NOTIFICATION, "auditDetails": NOTIFICATION["auditDetails"][1:]}
    assert expiring_checks(compliant) == []
    assert sns_messages({"dryRun": True}) == [] and expiring_checks({"taskId": 1}) == []


def finding(certificate_id: str) -> dict[str, Any]:
    return {
        "findingId": f"f-{certificate_id[:8]}",
        "taskId": NOTIFICATION["taskId"],
        "checkName": "DEVICE_CERTIFICATE_EXPIRING_CHECK",
        "severity": "MEDIUM",
        "nonCompliantResource": {
            "resourceType": "DEVICE_CERTIFICATE",
            "resourceIdentifier": {"deviceCertificateId": certificate_id},
        },
        "reasonForNonComplianceCode": "CERTIFICATE_APPROACHING_EXPIRATION",
    }


def canned_audit_findings(findings: list[dict[str, Any]], seen: list[dict[str, Any]]) -> Callable[..., Any]:
    """A before-call hook answering ListAuditFindings (moto lacks it) with a Stubber-checked response
    shape; every other call goes on to moto."""

    class Http:
        status_code = 200

    def answer(params: dict[str, Any], **_kwargs: Any) -> tuple[Http, dict[str, Any]]:
        seen.append(json.loads(params["body"]))
        return Http(), {"findings": findings}

    return answer


def test_the_lambda_renews_what_the_audit_flagged(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    populate(fleet)
    flagged = [fleet.certificates["soon-1"], fleet.certificates["year-1"]]  # the audit's own threshold
    # the canned response is a valid ListAuditFindings output (the Stubber validates it)
    Stubber(fleet.iot).add_response(
        "list_audit_findings",
        {"findings": [finding(c) for c in flagged]},
        {
            "taskId": NOTIFICATION["taskId"],
            "checkName": "DEVICE_CERTIFICATE_EXPIRING_CHECK",
            "maxResults": 250,
        },
    )
    seen: list[dict[str, Any]] = []

    def clients(region: str | None = None, _profile: str | None = None) -> AwsClients:
        made = AwsClients(lambda name: boto3.client(name, region_name=region))
        made.iot.meta.events.register(
            "before-call.iot.ListAuditFindings", canned_audit_findings([finding(c) for c in flagged], seen)
        )
        return made

    monkeypatch.setattr(schedule_aws.AwsClients, "from_session", staticmethod(clients))
    monkeypatch.setenv("RENEWAL_POLICY", "renew-before=30d")
    monkeypatch.setenv("JOB_TEMPLATE", TEMPLATE)
    summary = scheduled_handler(sns_event(NOTIFICATION))
    assert seen == [
        {
            "taskId": NOTIFICATION["taskId"],
            "checkName": "DEVICE_CERTIFICATE_EXPIRING_CHECK",
            "maxResults": 250,
        }
    ]
    # only the flagged things are decided: soon-1 is due; year-1 (flagged by a longer audit threshold)
    # waits under the policy's own window
    assert summary["trigger"] == "audit" and summary["things"] == 2
    assert summary["rotate"] == 1 and summary["wait"] == 1
    (job_id,) = summary["created"]
    assert job_id.startswith("renew-audit-")
    assert fleet.job_targets() == {job_id: ["soon-1"]}


def test_the_lambda_on_its_schedule_looks_at_the_fleet(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    populate(fleet)
    monkeypatch.setenv("RENEWAL_POLICY", "renew-before=30d,group=line")
    summary = scheduled_handler({"dryRun": False})
    assert summary["trigger"] == "schedule"
    assert summary["things"] == 2 and summary["rotate"] == 1
    (job_id,) = summary["created"]
    assert fleet.job_targets() == {job_id: ["soon-1"]}
