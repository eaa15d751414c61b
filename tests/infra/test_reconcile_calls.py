"""The scheduled reconcile's role against the AWS calls scheduled_handler really makes.

scheduled_handler runs on moto with the environment the stack gives the function, over things that take
every path it has (retire a certificate, clear a leftover state, look up a certificate held elsewhere, read
another job's document); every AWS call it makes is recorded at botocore's API-call layer. Each call must
be allowed by the synthesised role (action and resource, wildcards as IAM matches them), and every action
the role grants must have been used, except the few named below with the reason."""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from tests.infra.support import CDK_MISSING, Synth, function_by_name, grants, render, role_statements

pytest.importorskip("aws_cdk", reason=CDK_MISSING)
pytest.importorskip("moto", reason="the reconcile call test needs moto (the test extra)")

import boto3
import moto  # noqa: F401 -- must precede every boto3 client
from botocore.client import BaseClient
from moto import mock_aws
from moto.iot.models import iot_backends

from certrotator.backend.aws.adapters import ShadowStateStore
from certrotator.backend.aws.clients import Clients
from certrotator.backend.ports import RotationState
from certrotator.ops.reconcile.aws import ANNOUNCE_SHADOW_NAME, scheduled_handler
from certrotator.ops.reconcile.policy import DEFAULT_SETTLE_S, HANDLER_GRACE_S
from certrotator.protocol import RotationProgress, encode
from tests.aws_isolation import isolate_from_aws

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's
STATE_SHADOW = "AWSLabsCertificateRotator"
HOUR = 3600.0

# Granted but not called here, and why.
NOT_EXERCISED = {
    # moto answers only on the default data endpoint, so the test sets IOT_DATA_ENDPOINT and the
    # function skips the lookup it makes on AWS (once per container)
    "iot:DescribeEndpoint",
    # the adapters call ListThingPrincipalsV2; the API reference names this permission for it
    "iot:ListThingPrincipals",
    # SNS uses the topic's key on the publisher's behalf; the client makes no KMS call
    "kms:GenerateDataKey",
    "kms:Decrypt",
}


@pytest.fixture(autouse=True)
def aws_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    isolate_from_aws(monkeypatch, tmp_path_factory, REGION)


class Account:
    """moto's account, filled the way devices, the backend and the announcement rule would."""

    def __init__(self) -> None:
        self.iot = boto3.client("iot", region_name=REGION)
        self.data = Clients(REGION)
        self.iot.create_policy(
            policyName="DevicePolicy", policyDocument='{"Version":"2012-10-17","Statement":[]}'
        )
        self.secret_arn = self.data.secretsmanager.create_secret(Name="StateKey", SecretString="k" * 48)[
            "ARN"
        ]
        self.topic_arn = self.data.sns.create_topic(Name="Notification")["TopicArn"]
        self.store = ShadowStateStore(self.data, key=lambda: b"k" * 48)

    def thing(self, name: str, certificates: int) -> list[str]:
        """Certificates exclusively attached, the i-th of n created n - i hours ago."""
        self.iot.create_thing(thingName=name)
        ids = [self.certificate(name) for _ in range(certificates)]
        for age_h, certificate_id in enumerate(reversed(ids), start=1):
            iot_backends[ACCOUNT][REGION].certificates[certificate_id].creation_date -= timedelta(hours=age_h)
        return ids

    def certificate(self, thing: str) -> str:
        created = self.iot.create_keys_and_certificate(setAsActive=True)
        self.iot.attach_policy(policyName="DevicePolicy", target=created["certificateArn"])
        self.iot.attach_thing_principal(
            thingName=thing, principal=created["certificateArn"], thingPrincipalType="EXCLUSIVE_THING"
        )
        return str(created["certificateId"]).lower()

    def announce(self, thing: str, certificate_id: str, at_s: float) -> None:
        """What the stack's announcement rule writes (timestamp() is in milliseconds)."""
        reported = {"principal": certificate_id, "clientId": thing, "announcedAt": int(at_s * 1000)}
        self.data.iot_data.update_thing_shadow(
            thingName=thing,
            shadowName=ANNOUNCE_SHADOW_NAME,
            payload=encode({"state": {"reported": reported}}),
        )

    def state(self, thing: str, state: RotationState, age_s: float = 0.0) -> None:
        self.store.save(thing, state)
        # AWS IoT's metadata time of the write, which reconcile reads as the state's age
        shadow = iot_backends[ACCOUNT][REGION].describe_thing(thing).thing_shadows[STATE_SHADOW]
        shadow.timestamp -= int(age_s)
        shadow.metadata_reported = shadow._create_metadata_from_state(shadow.reported, shadow.timestamp)

    def attached(self, thing: str) -> list[str]:
        principals = self.iot.list_thing_principals(thingName=thing)["principals"]
        return sorted(p.rsplit("/", 1)[1].lower() for p in principals)


@pytest.fixture
def account() -> Iterator[Account]:
    with mock_aws(config={"iot": {"use_valid_cert": True}}):
        yield Account()


Call = tuple[str, str, dict[str, Any]]


def record_calls(patch: pytest.MonkeyPatch) -> list[Call]:
    calls: list[Call] = []
    original = BaseClient._make_api_call

    def recording(client: BaseClient, operation: str, params: dict[str, Any]) -> Any:
        calls.append((client.meta.service_model.service_name, operation, dict(params)))
        return original(client, operation, params)

    patch.setattr(BaseClient, "_make_api_call", recording)
    return calls


def iam_request(
    account: Account, service: str, operation: str, params: dict[str, Any]
) -> tuple[str, str] | None:
    """(IAM action, resource ARN) that authorises the call; None for calls that need no permission."""
    iot = f"arn:aws:iot:{REGION}:{ACCOUNT}"
    if (service, operation) == ("sts", "GetCallerIdentity"):
        return None  # STS: no permission needed, and none can deny it
    if service == "iot-data":
        return f"iot:{operation}", f"{iot}:thing/{params['thingName']}/{params['shadowName']}"
    if service == "secretsmanager":
        return f"secretsmanager:{operation}", params["SecretId"]
    if service == "sns":
        return f"sns:{operation}", params["TopicArn"]
    assert service == "iot", (service, operation)
    resource = {
        "ListThings": "*",
        "ListPrincipalThings": "*",
        "ListThingPrincipalsV2": f"{iot}:thing/{params.get('thingName')}",
        "ListJobExecutionsForThing": f"{iot}:thing/{params.get('thingName')}",
        "GetJobDocument": f"{iot}:job/{params.get('jobId')}",
        "DescribeCertificate": f"{iot}:cert/{params.get('certificateId')}",
        "UpdateCertificate": f"{iot}:cert/{params.get('certificateId')}",
        "DeleteCertificate": f"{iot}:cert/{params.get('certificateId')}",
        "DetachThingPrincipal": str(params.get("principal")),
        "DescribeEndpoint": "*",
    }[operation]
    return f"iot:{operation}", resource


def deployed_grants(synth: Synth, account: Account) -> tuple[set[tuple[str, str]], dict[str, str]]:
    """The reconcile role's (action, resource) pairs with CloudFormation references resolved to moto's
    account, and the function's environment likewise."""
    _, function = function_by_name(synth.json, f"{synth.stack.stack_name}Reconcile")
    values = {
        "AWS::Partition": "aws",
        "AWS::Region": REGION,
        "AWS::AccountId": ACCOUNT,
        next(iter(synth.resources("AWS::SNS::Topic"))): account.topic_arn,
        next(iter(synth.resources("AWS::SecretsManager::Secret"))): account.secret_arn,
    }

    def resolve(text: str) -> str:
        for name, value in values.items():
            text = text.replace("${" + name + "}", value)
        return text

    role_id = render(function["Properties"]["Role"]).strip("${}").removesuffix(".Arn")
    pairs = {(action, resolve(resource)) for action, resource in grants(role_statements(synth.json, role_id))}
    environment = {
        k: resolve(render(v)) for k, v in function["Properties"]["Environment"]["Variables"].items()
    }
    assert not any("${" in v for v in environment.values()), environment
    return pairs, environment


def allowed(request: tuple[str, str], granted: set[tuple[str, str]]) -> bool:
    action, resource = request
    return any(action == a and (r == "*" or fnmatch.fnmatchcase(resource, r)) for a, r in granted)


def test_the_reconcile_role_allows_every_call_the_scheduled_handler_makes_and_no_more(
    iot_reconcile_synth: Synth, account: Account
) -> None:
    now = time.time()
    # two certificates; the device announced the newer one after both were issued: the older goes
    _old, new = account.thing("rotated", 2)
    account.announce("rotated", new, now - 3 * DEFAULT_SETTLE_S)
    # a leftover state past the grace period, and a job of another kind: the state is cleared
    (only,) = account.thing("leftover", 1)
    account.state(
        "leftover", RotationState("job-9", only, "", RotationProgress.ISSUING), HANDLER_GRACE_S + HOUR
    )
    thing_arn = account.iot.describe_thing(thingName="leftover")["thingArn"]
    account.iot.create_job(jobId="firmware", targets=[thing_arn], document='{"operation":"UPGRADE"}')
    # a young state naming a certificate another thing holds: reconcile asks who holds it, then waits
    (mine,) = account.thing("elsewhere", 1)
    (theirs,) = account.thing("neighbour", 1)
    account.state("elsewhere", RotationState("job-8", mine, theirs, RotationProgress.CREATED))

    granted, environment = deployed_grants(iot_reconcile_synth, account)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        patch.setenv("AWS_REGION", REGION)  # Lambda sets it
        calls = record_calls(patch)
        result = scheduled_handler(json.loads('{"dryRun": false}'))

    assert result == {
        "things": 4,
        "retired": 1,
        "statesCleared": 1,
        "needOperator": [],
        "skipped": ["elsewhere"],
    }
    assert account.attached("rotated") == [new]
    requests = {r for c in calls if (r := iam_request(account, *c)) is not None}
    refused = sorted(r for r in requests if not allowed(r, granted))
    assert refused == [], refused
    used = {action for action, _ in requests}
    granted_actions = {a for a, _ in granted if not a.startswith("logs:")}
    assert granted_actions - used == NOT_EXERCISED
    # and the shadows it touched: it reads both, and deletes only the rotation state
    shadows = {(op, p["shadowName"]) for service, op, p in calls if service == "iot-data"}
    assert shadows == {
        ("GetThingShadow", STATE_SHADOW),
        ("GetThingShadow", ANNOUNCE_SHADOW_NAME),
        ("DeleteThingShadow", STATE_SHADOW),
    }


def test_the_check_would_see_a_call_the_role_does_not_allow(account: Account) -> None:
    """The comparison can fail: a grant narrowed to one thing does not cover another thing's shadow."""
    granted = {("iot:GetThingShadow", f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/one/{STATE_SHADOW}")}
    request = iam_request(
        account, "iot-data", "GetThingShadow", {"thingName": "two", "shadowName": STATE_SHADOW}
    )
    assert request is not None and not allowed(request, granted)
    assert allowed(
        request, {("iot:GetThingShadow", f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/*/{STATE_SHADOW}")}
    )
