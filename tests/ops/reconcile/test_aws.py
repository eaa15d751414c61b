"""`reconcile --aws` on moto: things, certificates, jobs, the signed state shadow and the announcement
shadow as the stack's rule writes it; retiring and notifying through the backend's boto3 adapters."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import boto3
import moto  # noqa: F401 -- must precede every boto3 client
import pytest
from botocore.stub import Stubber
from moto import mock_aws
from moto.iot.models import iot_backends
from moto.sns.models import sns_backends
from typer.testing import CliRunner

from certrotator.backend.aws.clients import Clients
from certrotator.backend.ports import RotationState
from certrotator.cli import app
from certrotator.compat import UTC
from certrotator.ops.aws.clients import AwsClients, OperationError
from certrotator.ops.reconcile.aws import (
    ANNOUNCE_RULE_SQL,
    ANNOUNCE_SHADOW_NAME,
    STATE_KEY_OUTPUT,
    TOPIC_OUTPUT,
    AwsBackend,
    AwsSettings,
    scheduled_handler,
)
from certrotator.ops.reconcile.policy import DEFAULT_SETTLE_S
from certrotator.ops.reconcile.runner import Options, reconcile
from certrotator.protocol import JOB_DOCUMENT, RotationProgress, encode
from tests.aws_isolation import isolate_from_aws

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
HOUR = 3600.0


@pytest.fixture(autouse=True)
def aws_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    isolate_from_aws(monkeypatch, tmp_path_factory, REGION)


@dataclass
class World:
    control: AwsClients
    data: Clients
    secret_arn: str
    topic_arn: str

    def backend(self, later_s: float = 0.0) -> AwsBackend:
        settings = AwsSettings(topic_arn=self.topic_arn, state_key_secret_arn=self.secret_arn)
        return AwsBackend.build(self.control, self.data, settings, clock=lambda: time.time() + later_s)

    def thing(self, name: str, certificates: int) -> list[str]:
        """A thing with certificates exclusively attached, each with the device policy: the i-th of n
        created n - i hours ago (the newest an hour ago)."""
        iot = self.control.iot
        iot.create_thing(thingName=name)
        ids = []
        for _ in range(certificates):
            created = iot.create_keys_and_certificate(setAsActive=True)
            iot.attach_policy(policyName="DevicePolicy", target=created["certificateArn"])
            iot.attach_thing_principal(
                thingName=name, principal=created["certificateArn"], thingPrincipalType="EXCLUSIVE_THING"
            )
            ids.append(created["certificateId"].lower())
        for age_h, certificate_id in enumerate(reversed(ids), start=1):
            iot_backends[ACCOUNT][REGION].certificates[certificate_id].creation_date -= timedelta(hours=age_h)
        return ids

    def announce(self, thing: str, certificate_id: str, at_s: float) -> None:
        """What the announcement rule writes: principal(), clientid(), timestamp() (ms)."""
        reported = {"principal": certificate_id, "clientId": thing, "announcedAt": int(at_s * 1000)}
        self.data.iot_data.update_thing_shadow(
            thingName=thing,
            shadowName=ANNOUNCE_SHADOW_NAME,
            payload=encode({"state": {"reported": reported}}),
        )

    def attached(self, thing: str) -> list[str]:
        principals = self.control.iot.list_thing_principals(thingName=thing)["principals"]
        return sorted(p.rsplit("/", 1)[1].lower() for p in principals)

    def exists(self, certificate_id: str) -> bool:
        try:
            self.control.iot.describe_certificate(certificateId=certificate_id)
        except self.control.iot.exceptions.ResourceNotFoundException:
            return False
        return True

    def notifications(self) -> list[dict[str, Any]]:
        sent = sns_backends[ACCOUNT][REGION].topics[self.topic_arn].sent_notifications
        return [json.loads(message) for _id, message, *_rest in sent]


@pytest.fixture
def world() -> Iterator[World]:
    with mock_aws(config={"iot": {"use_valid_cert": True}}):
        control = AwsClients(lambda name: boto3.client(name, region_name=REGION))  # type: ignore[call-overload]
        data = Clients(REGION)
        control.iot.create_policy(
            policyName="DevicePolicy", policyDocument='{"Version":"2012-10-17","Statement":[]}'
        )
        secret = data.secretsmanager.create_secret(Name="state-key", SecretString="k" * 40)["ARN"]
        topic = data.sns.create_topic(Name="rotations")["TopicArn"]
        yield World(control, data, secret, topic)


def outcome_of(world: World, thing: str, later_s: float = 0.0, **options: Any) -> Any:
    (outcome,) = reconcile(world.backend(later_s), Options(**options), [thing])
    return outcome


# ----------------------------------------------------------------------------------------- tests


def test_the_old_certificate_goes_when_the_device_announced_the_new_one(world: World) -> None:
    old, new = world.thing("core-1", 2)
    world.backend().store.save("core-1", RotationState("job-1", old, new, RotationProgress.COMMITTED))
    world.announce("core-1", new, time.time() - 60)  # after both certificates were created

    planned = outcome_of(world, "core-1", later_s=7 * HOUR, dry_run=True)
    assert (planned.decision.verdict.value, planned.decision.retire, planned.decision.keep) == (
        "retire",
        (old,),
        new,
    )
    assert planned.applied is False and world.attached("core-1") == sorted([old, new])
    assert world.notifications() == []

    done = outcome_of(world, "core-1", later_s=7 * HOUR)
    assert done.applied and done.note == ""
    assert world.attached("core-1") == [new]
    assert not world.exists(old) and world.exists(new)
    assert world.backend().store.load("core-1") is None  # the state shadow is gone
    (note,) = world.notifications()
    assert note["thingName"] == "core-1" and note["status"] == "RECONCILE" and old in note["outcome"]
    assert note["details"]["keptCertificateId"] == new
    assert outcome_of(world, "core-1", later_s=7 * HOUR).decision.verdict.value == "ok"


def test_an_announcement_older_than_the_newer_certificate_deletes_nothing(world: World) -> None:
    old, new = world.thing("core-1", 2)
    world.announce("core-1", old, time.time() - 1.5 * HOUR)  # before the rotation issued `new`

    outcome = outcome_of(world, "core-1", later_s=HOUR)
    assert outcome.decision.verdict.value == "operator-action-needed"
    assert "older than the thing's newest certificate" in outcome.decision.reason
    assert world.attached("core-1") == sorted([old, new]) and world.exists(old) and world.exists(new)
    (note,) = world.notifications()
    assert note["operatorAction"].startswith("2 certificates attached")


def test_young_state_and_rotations_in_progress_are_left_alone(world: World) -> None:
    old, new = world.thing("core-1", 2)
    world.backend().store.save("core-1", RotationState("job-1", old, new, RotationProgress.COMMITTED))
    world.announce("core-1", new, time.time() - 60)

    young = outcome_of(world, "core-1", later_s=60)  # the terminal event may still be on its way
    assert young.decision.verdict.value == "skip" and "may still be handling it" in young.decision.reason

    thing_arn = world.control.iot.describe_thing(thingName="core-1")["thingArn"]
    world.control.iot.create_job(jobId="job-2", targets=[thing_arn], document=json.dumps(JOB_DOCUMENT))
    busy = outcome_of(world, "core-1", later_s=7 * HOUR)
    assert busy.decision.verdict.value == "skip" and "job-2 QUEUED" in busy.decision.reason
    assert world.attached("core-1") == sorted([old, new]) and world.notifications() == []


def test_a_job_of_another_kind_does_not_block(world: World) -> None:
    (only,) = world.thing("core-1", 1)
    world.backend().store.save("core-1", RotationState("job-1", only, "", RotationProgress.ISSUING))
    thing_arn = world.control.iot.describe_thing(thingName="core-1")["thingArn"]
    world.control.iot.create_job(jobId="firmware", targets=[thing_arn], document='{"operation":"UPGRADE"}')

    outcome = outcome_of(world, "core-1", later_s=7 * HOUR)
    assert (outcome.decision.verdict.value, outcome.applied) == ("clear-state", True)
    assert world.backend().store.load("core-1") is None and world.attached("core-1") == [only]


def test_a_state_that_fails_its_mac_is_no_state(world: World) -> None:
    (only,) = world.thing("core-1", 1)
    forged = RotationState("job-1", only, "f" * 64, RotationProgress.CREATED).to_dict() | {"mac": "0" * 64}
    world.data.iot_data.update_thing_shadow(
        thingName="core-1",
        shadowName="AWSLabsCertificateRotator",
        payload=encode({"state": {"reported": forged}}),
    )
    outcome = outcome_of(world, "core-1", later_s=7 * HOUR)
    assert outcome.decision.verdict.value == "ok" and outcome.decision.findings == ()


def test_an_unattached_certificate_named_by_the_state_goes_with_evidence(world: World) -> None:
    old, new = world.thing("core-1", 2)
    new_arn = f"arn:aws:iot:{REGION}:{ACCOUNT}:cert/{new}"
    world.control.iot.detach_thing_principal(thingName="core-1", principal=new_arn)
    world.backend().store.save("core-1", RotationState("job-1", old, new, RotationProgress.CREATED))
    world.announce("core-1", old, time.time() - 60)

    outcome = outcome_of(world, "core-1", later_s=7 * HOUR)
    assert outcome.decision.findings[-1].value == "unattached-certificate"
    assert (outcome.decision.retire, outcome.decision.keep, outcome.applied) == ((new,), old, True)
    assert not world.exists(new) and world.attached("core-1") == [old]


def test_cli_reconciles_aws_and_exits_by_what_needs_an_operator(world: World) -> None:
    old, new = world.thing("core-1", 2)
    world.thing("core-2", 2)  # no announcement: an operator must decide
    world.announce("core-1", new, time.time() - 60)
    args = ["reconcile", "--aws", "--region", REGION, "--json", "--settle-seconds", "0"]
    args += ["--topic-arn", world.topic_arn, "--state-key-secret-arn", world.secret_arn]

    result = CliRunner().invoke(app, [*args, "--thing", "core-1"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert (row["thing"], row["decision"], row["retire"], row["applied"]) == ("core-1", "retire", [old], True)
    assert world.attached("core-1") == [new]

    result = CliRunner().invoke(app, [*args, "--dry-run"])
    assert result.exit_code == 1, result.output
    assert [(r["thing"], r["decision"]) for r in json.loads(result.stdout)] == [
        ("core-2", "operator-action-needed")
    ]


def missing_stack(world: World, stack: str) -> Stubber:
    """moto's CloudFormation needs packages this install lacks: answer DescribeStacks with a stub."""
    stub = Stubber(world.control.cloudformation)
    stub.add_client_error(
        "describe_stacks",
        "ValidationError",
        f"Stack with id {stack} does not exist",
        400,
        {"StackName": stack},
    )
    return stub


def stack_with_outputs(world: World, stack: str) -> Stubber:
    stub = Stubber(world.control.cloudformation)
    outputs = [
        {"OutputKey": TOPIC_OUTPUT, "OutputValue": world.topic_arn},
        {"OutputKey": STATE_KEY_OUTPUT, "OutputValue": world.secret_arn},
    ]
    described = {
        "StackName": stack,
        "CreationTime": datetime.now(UTC),
        "StackStatus": "CREATE_COMPLETE",
        "Outputs": outputs,
    }
    stub.add_response("describe_stacks", {"Stacks": [described]}, {"StackName": stack})
    return stub


def test_the_stack_names_the_topic_and_the_key(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = world.thing("core-1", 2)
    world.announce("core-1", new, time.time() - 60)
    monkeypatch.setattr(AwsClients, "from_session", classmethod(lambda cls, region, profile: world.control))
    with stack_with_outputs(world, "Rotator"):
        result = CliRunner().invoke(
            app, ["reconcile", "--aws", "--stack", "Rotator", "--settle-seconds", "0"]
        )
    assert result.exit_code == 0, result.output
    assert "core-1" in result.stdout and "retire (done)" in result.stdout
    assert world.attached("core-1") == [new] and not world.exists(old) and len(world.notifications()) == 1

    with missing_stack(world, "Nope"):
        result = CliRunner().invoke(app, ["reconcile", "--aws", "--stack", "Nope"])
    assert result.exit_code == 2 and "stack 'Nope' does not exist" in result.output


def test_an_unreadable_state_key_is_one_clear_error(world: World) -> None:
    settings = AwsSettings(topic_arn=world.topic_arn, state_key_secret_arn=world.secret_arn + "x")
    with pytest.raises(Exception, match=r"ResourceNotFound|can't find"):
        AwsBackend.build(world.control, world.data, settings)
    short = world.data.secretsmanager.create_secret(Name="short", SecretString="k")["ARN"]
    with pytest.raises(ValueError, match="at least 32"):
        AwsBackend.build(world.control, world.data, AwsSettings(state_key_secret_arn=short, topic_arn="t"))
    with missing_stack(world, "Nope"), pytest.raises(OperationError, match="does not exist"):
        AwsBackend.build(world.control, world.data, AwsSettings(stack="Nope"))


def test_the_announcement_rule_records_the_unforgeable_principal() -> None:
    assert "principal() AS state.reported.principal" in ANNOUNCE_RULE_SQL
    assert ANNOUNCE_RULE_SQL.endswith("FROM 'awslabs/things/+/certificate/announce'")


def test_the_scheduled_function_reconciles_every_thing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = world.thing("core-1", 2)
    world.thing("core-2", 2)
    (healthy,) = world.thing("core-3", 1)
    world.announce("core-1", new, time.time() - 3 * DEFAULT_SETTLE_S)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("SNS_TOPIC_ARN", world.topic_arn)
    monkeypatch.setenv("STATE_KEY_SECRET_ARN", world.secret_arn)

    assert scheduled_handler({"dryRun": True}) == {
        "things": 3,
        "retired": 0,
        "statesCleared": 0,
        "needOperator": ["core-2"],
        "skipped": [],
    }
    assert world.attached("core-1") == sorted([old, new]) and world.notifications() == []
    assert scheduled_handler({})["retired"] == 1
    assert world.attached("core-1") == [new] and world.attached("core-3") == [healthy]
    assert [n["thingName"] for n in world.notifications()] == ["core-1", "core-2"]
    assert scheduled_handler({"things": ["core-1"]})["needOperator"] == []
