"""The renewal function's role against the AWS calls its handler really makes.

scheduled_handler runs on moto with the environment the stack gives the function: on its schedule over
the whole fleet (AWS IoT issuer stack), and, in the Private CA stack (group-scoped policy, Device
Defender trigger), on its schedule and on an audit notification. Every call is recorded at botocore's
API-call layer; each must be allowed by the synthesised role (action and every resource it is
authorised on), and every action the role grants must have been used, except the few named below."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.infra.support import CDK_MISSING, Synth, function_by_name, grants, render, role_statements

pytest.importorskip("aws_cdk", reason=CDK_MISSING)
pytest.importorskip("moto", reason="the renewal call test needs moto (the test extra)")

import boto3
import moto  # noqa: F401 -- must precede every boto3 client
from botocore.client import BaseClient
from moto import mock_aws
from moto.iot.models import iot_backends

from certrotator.compat import UTC
from certrotator.ops.schedule.aws import scheduled_handler
from certrotator.protocol import JOB_DOCUMENT
from tests.aws_isolation import isolate_from_aws

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's
EXPIRING_CHECK = "DEVICE_CERTIFICATE_EXPIRING_CHECK"
TASK_ID = "4e2bcd1ccbc2a5dd15292a82ab80c380"

# Granted but not called here, and why.
ALWAYS_UNUSED = {
    # the adapters call ListThingPrincipalsV2; the API reference names this permission for it
    "iot:ListThingPrincipals",
    # SNS uses the topic's key on the publisher's behalf (the on-failure record); no call here fails
    "sns:Publish",
    "kms:GenerateDataKey",
    "kms:Decrypt",
}


@pytest.fixture(autouse=True)
def aws_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    isolate_from_aws(monkeypatch, tmp_path_factory, REGION)


class Account:
    """moto's account: the job template, things in a group with certificates of controlled validity,
    a rotation that failed long ago, a job of another kind."""

    def __init__(self, template: str) -> None:
        self.iot = boto3.client("iot", region_name=REGION)
        self.iot.create_job_template(
            jobTemplateId=template, description="rotation", document=json.dumps(JOB_DOCUMENT)
        )
        self.iot.create_thing_group(thingGroupName="line-1")
        self.certificates: dict[str, str] = {}
        for name, left_days in (("due-1", 20), ("due-2", 25), ("fresh", 300)):
            self.thing(name, left_days)
        arn = self.iot.describe_thing(thingName="due-1")["thingArn"]
        self.iot.create_job(jobId="firmware-1", targets=[arn], document='{"operation":"UPGRADE"}')
        self.iot.create_job(jobId="old-rotation", targets=[arn], document=json.dumps(JOB_DOCUMENT))
        execution = iot_backends[ACCOUNT][REGION].job_executions[("old-rotation", "due-1")]
        execution.status, execution.last_updated_at = "FAILED", datetime.now(UTC) - timedelta(days=3)
        iot_backends[ACCOUNT][REGION].job_executions[("firmware-1", "due-1")].status = "SUCCEEDED"

    def thing(self, name: str, left_days: float) -> None:
        """A one-year certificate with `left_days` to go (due at 0.66 of its life when under ~124)."""
        self.iot.create_thing(thingName=name)
        self.iot.add_thing_to_thing_group(thingGroupName="line-1", thingName=name)
        created = self.iot.create_keys_and_certificate(setAsActive=True)
        self.iot.attach_thing_principal(
            thingName=name, principal=created["certificateArn"], thingPrincipalType="EXCLUSIVE_THING"
        )
        fake = iot_backends[ACCOUNT][REGION].certificates[created["certificateId"]]
        fake.validity_not_after = datetime.now(UTC) + timedelta(days=left_days)
        fake.validity_not_before = fake.validity_not_after - timedelta(days=365)
        self.certificates[name] = str(created["certificateId"])


@pytest.fixture
def mocked() -> Iterator[None]:
    with mock_aws():
        yield


Call = tuple[str, str, dict[str, Any]]


def record_calls(patch: pytest.MonkeyPatch, findings: list[str]) -> list[Call]:
    """Record every call; answer ListAuditFindings (moto lacks it) with findings for `findings`."""
    calls: list[Call] = []
    original = BaseClient._make_api_call

    def recording(client: BaseClient, operation: str, params: dict[str, Any]) -> Any:
        calls.append((client.meta.service_model.service_name, operation, dict(params)))
        if operation == "ListAuditFindings":
            return {
                "findings": [
                    {
                        "taskId": params["taskId"],
                        "checkName": params["checkName"],
                        "nonCompliantResource": {
                            "resourceType": "DEVICE_CERTIFICATE",
                            "resourceIdentifier": {"deviceCertificateId": c},
                        },
                    }
                    for c in findings
                ]
            }
        return original(client, operation, params)

    patch.setattr(BaseClient, "_make_api_call", recording)
    return calls


def iam_requests(service: str, operation: str, params: dict[str, Any]) -> list[tuple[str, str]]:
    """(IAM action, resource) pairs the call is authorised on; [] for calls that need no permission."""
    iot = f"arn:aws:iot:{REGION}:{ACCOUNT}"
    if (service, operation) == ("sts", "GetCallerIdentity"):
        return []
    assert service == "iot", (service, operation)
    if operation == "CreateJob":
        return [
            ("iot:CreateJob", resource)
            for resource in (f"{iot}:job/{params['jobId']}", params["jobTemplateArn"], *params["targets"])
        ]
    resource = {
        "ListThings": "*",
        "ListAuditFindings": "*",
        "ListPrincipalThings": "*",
        "ListThingsInThingGroup": f"{iot}:thinggroup/{params.get('thingGroupName')}",
        "ListThingPrincipalsV2": f"{iot}:thing/{params.get('thingName')}",
        "ListJobExecutionsForThing": f"{iot}:thing/{params.get('thingName')}",
        "ListThingGroupsForThing": f"{iot}:thing/{params.get('thingName')}",
        "DescribeThing": f"{iot}:thing/{params.get('thingName')}",
        "DescribeCertificate": f"{iot}:cert/{params.get('certificateId')}",
        "GetJobDocument": f"{iot}:job/{params.get('jobId')}",
        "DescribeJobTemplate": f"{iot}:jobtemplate/{params.get('jobTemplateId')}",
    }[operation]
    return [(f"iot:{operation}", resource)]


def deployed(synth: Synth) -> tuple[set[tuple[str, str]], dict[str, str]]:
    """The renewal role's (action, resource) pairs resolved to moto's account, and its environment."""
    _, function = function_by_name(synth.json, f"{synth.stack.stack_name}Renewal")
    values = {
        "AWS::Partition": "aws",
        "AWS::Region": REGION,
        "AWS::AccountId": ACCOUNT,
        **{k: f"arn:aws:sns:{REGION}:{ACCOUNT}:{k}" for k in synth.resources("AWS::SNS::Topic")},
    }

    def resolve(text: str) -> str:
        for name, value in values.items():
            text = text.replace("${" + name + "}", value)
        return text

    role_id = render(function["Properties"]["Role"]).strip("${}").removesuffix(".Arn")
    pairs = {
        (a, resolve(r)) for a, r in grants(role_statements(synth.json, role_id)) if not a.startswith("logs:")
    }
    environment = {
        k: resolve(render(v)) for k, v in function["Properties"]["Environment"]["Variables"].items()
    }
    return pairs, environment


def allowed(request: tuple[str, str], granted: set[tuple[str, str]]) -> bool:
    action, resource = request
    return any(action == a and (r == "*" or fnmatch.fnmatchcase(resource, r)) for a, r in granted)


def run(
    synth: Synth, events: list[dict[str, Any]], findings: list[str]
) -> tuple[list[Call], list[dict[str, Any]], set[tuple[str, str]]]:
    granted, environment = deployed(synth)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        patch.setenv("AWS_REGION", REGION)  # Lambda sets it
        calls = record_calls(patch, findings)
        results = [scheduled_handler(event) for event in events]
    return calls, results, granted


def check(calls: list[Call], granted: set[tuple[str, str]], unused: set[str]) -> None:
    requests = {r for c in calls for r in iam_requests(*c)}
    refused = sorted(r for r in requests if not allowed(r, granted))
    assert refused == [], refused
    assert {a for a, _ in granted} - {a for a, _ in requests} == unused


def test_the_scheduled_run_over_the_fleet(mocked: None, iot_renewal_synth: Synth) -> None:
    account = Account(iot_renewal_synth.stack.stack_name)
    calls, (summary,), granted = run(iot_renewal_synth, [{"dryRun": False}], [])
    # renew-before=30d: the two with 20 and 25 days left (one backs off? its failure was 3 days ago: no)
    assert summary["trigger"] == "schedule" and summary["rotate"] == 2 and len(summary["created"]) == 1
    assert summary["wait"] == 1 and summary["failed"] == {}
    check(calls, granted, ALWAYS_UNUSED | {"iot:ListThingsInThingGroup", "iot:ListThingGroupsForThing"})
    assert account.certificates  # the fleet was there


def test_the_group_run_and_the_audit_trigger(mocked: None, pca_renewal_audit_synth: Synth) -> None:
    synth = pca_renewal_audit_synth
    account = Account(synth.stack.stack_name)
    audit = {
        "accountId": ACCOUNT,
        "taskId": TASK_ID,
        "taskStatus": "COMPLETED",
        "taskType": "SCHEDULED_AUDIT_TASK",
        "auditDetails": [
            {
                "checkName": EXPIRING_CHECK,
                "checkRunStatus": "COMPLETED_NON_COMPLIANT",
                "nonCompliantResourcesCount": 1,
                "totalResourcesCount": 3,
            }
        ],
    }
    event = {"Records": [{"EventSource": "aws:sns", "Sns": {"Message": json.dumps(audit)}}]}
    calls, (scheduled, audited), granted = run(
        synth, [{"dryRun": True}, event], [account.certificates["due-2"]]
    )
    # renew-at-fraction=0.66 of a year: due under ~124 days left; group line-1 scoped
    assert scheduled["rotate"] == 2 and scheduled["created"] == []  # dry run
    assert audited["trigger"] == "audit" and audited["things"] == 1 and len(audited["created"]) == 1
    check(calls, granted, ALWAYS_UNUSED | {"iot:ListThings"})
