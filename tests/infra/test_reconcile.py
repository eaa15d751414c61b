"""The announcement rule (always there) and the scheduled reconcile (only with the ReconcileSchedule
context), as synthesised; the reconcile role against the AWS calls scheduled_handler really makes (moto)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.infra.support import (
    CDK_MISSING,
    RECONCILE_SCHEDULE,
    Synth,
    as_list,
    function_by_name,
    grants,
    make_app,
    only,
    render,
    role_statements,
)

pytest.importorskip("aws_cdk", reason=CDK_MISSING)

import certrotator_infra.announce as announce_module
from certrotator_infra import failures
from certrotator_infra.application import build
from certrotator_infra.stack import TERMINAL_TIMEOUT, TIMEOUT_CONFIG

from certrotator.ops.reconcile.aws import ANNOUNCE_RULE_SQL, ANNOUNCE_SHADOW_NAME
from certrotator.ops.reconcile.policy import HANDLER_GRACE_S
from certrotator.protocol import Topics

ARN_PREFIX = "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:"
THINGS = ARN_PREFIX + "thing/*"
CERTS = ARN_PREFIX + "cert/*"
JOBS = ARN_PREFIX + "job/*"
STATE_SHADOWS = ARN_PREFIX + "thing/*/AWSLabsCertificateRotator"
ANNOUNCE_SHADOWS = ARN_PREFIX + f"thing/*/{ANNOUNCE_SHADOW_NAME}"


@pytest.fixture(params=["iot", "pca", "iot_reconcile", "pca_reconcile"])
def synth(request: pytest.FixtureRequest) -> Synth:
    result: Synth = request.getfixturevalue(f"{request.param}_synth")
    return result


@pytest.fixture(params=["iot_reconcile", "pca_reconcile"])
def scheduled(request: pytest.FixtureRequest) -> Synth:
    """The two configurations with the scheduled reconcile on."""
    result: Synth = request.getfixturevalue(f"{request.param}_synth")
    return result


def logical_id(synth: Synth, kind: str) -> str:
    return only(synth.resources(kind))[0]


def prefix(synth: Synth) -> str:
    return synth.stack.stack_name.replace("-", "_")


def trust(synth: Synth, role_id: str) -> dict[str, Any]:
    (statement,) = synth.json["Resources"][role_id]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    return dict(statement)


def role_id_of(value: Any) -> str:
    return render(value).strip("${}").removesuffix(".Arn")


# ---------------------------------------------------------------------------- announcement rule


def announce_rule(synth: Synth) -> dict[str, Any]:
    (rule,) = [
        r
        for r in synth.resources("AWS::IoT::TopicRule").values()
        if r["Properties"]["RuleName"] == f"{prefix(synth)}CertificateAnnounce"
    ]
    payload: dict[str, Any] = rule["Properties"]["TopicRulePayload"]
    return payload


def test_the_announcement_rule_selects_the_unforgeable_principal_from_the_announce_topic(
    synth: Synth,
) -> None:
    payload = announce_rule(synth)
    assert payload["Sql"] == ANNOUNCE_RULE_SQL  # imported, not copied
    assert payload["Sql"] == (
        "SELECT principal() AS state.reported.principal, clientid() AS state.reported.clientId, "
        "timestamp() AS state.reported.announcedAt FROM 'awslabs/things/+/certificate/announce'"
    )
    assert f"FROM '{Topics.announce('+')}'" in payload["Sql"]
    assert payload["AwsIotSqlVersion"] == "2016-03-23"
    assert payload["RuleDisabled"] is False


def test_the_announcement_rule_republishes_to_the_things_announcement_shadow(synth: Synth) -> None:
    payload = announce_rule(synth)
    (action,) = payload["Actions"]
    republish = action["Republish"]
    # `$$` for the reserved topic; topic(3) is the thing of awslabs/things/{thing}/certificate/announce
    assert republish["Topic"] == f"$$aws/things/${{topic(3)}}/shadow/name/{ANNOUNCE_SHADOW_NAME}/update"
    assert Topics.announce("core-7").split("/")[2] == "core-7"
    assert republish["Qos"] == 1
    role_id = role_id_of(republish["RoleArn"])
    statement = trust(synth, role_id)
    assert statement["Principal"] == {"Service": "iot.amazonaws.com"}
    assert render(statement["Condition"]["StringEquals"]["aws:SourceAccount"]) == "${AWS::AccountId}"
    assert render(statement["Condition"]["ArnEquals"]["aws:SourceArn"]) == (
        f"{ARN_PREFIX}rule/{prefix(synth)}CertificateAnnounce"
    )
    # publish only; the IAM resource is the topic itself, with one `$`
    assert grants(role_statements(synth.json, role_id)) == {
        ("iot:Publish", f"{ARN_PREFIX}topic/$aws/things/*/shadow/name/{ANNOUNCE_SHADOW_NAME}/update")
    }


def test_the_announcement_rule_logs_its_failures_like_create_and_commit(synth: Synth) -> None:
    error = announce_rule(synth)["ErrorAction"]
    (create,) = [
        r
        for r in synth.resources("AWS::IoT::TopicRule").values()
        if r["Properties"]["RuleName"] == f"{prefix(synth)}CreateCertificate"
    ]
    assert error == create["Properties"]["TopicRulePayload"]["ErrorAction"]
    assert list(error) == ["CloudwatchLogs"]


def test_a_rule_sql_that_does_not_give_reconcile_its_evidence_stops_synthesis(
    tmp_path: Path, code_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        announce_module,
        "ANNOUNCE_RULE_SQL",
        "SELECT clientid() AS state.reported.clientId FROM 'awslabs/things/+/certificate/announce'",
    )
    with pytest.raises(ValueError, match=r"ANNOUNCE_RULE_SQL lacks .*principal\(\)"):
        build(make_app(tmp_path), code_dir=code_dir)


# --------------------------------------------------------------------------- scheduled reconcile


def test_no_scheduled_reconcile_unless_the_context_asks(iot_synth: Synth, pca_synth: Synth) -> None:
    for synth in (iot_synth, pca_synth):
        assert synth.resources("AWS::Events::Rule") == {}
        assert not any(
            "Reconcile" in str(r["Properties"].get("FunctionName"))
            for r in synth.resources("AWS::Lambda::Function").values()
        )
        assert synth.stack.reconcile is None


def reconcile_function(synth: Synth) -> tuple[str, dict[str, Any]]:
    return function_by_name(synth.json, f"{synth.stack.stack_name}Reconcile")


def test_the_schedule_runs_the_reconcile_function(scheduled: Synth) -> None:
    rule_id, rule = only(scheduled.resources("AWS::Events::Rule"))
    props = rule["Properties"]
    expected = RECONCILE_SCHEDULE if scheduled.stack.ca_arn is None else "cron(0 3 * * ? *)"
    assert props["ScheduleExpression"] == expected
    assert props["State"] == "ENABLED"
    assert props["Name"] == f"{scheduled.stack.stack_name}Reconcile"
    function_id, _ = reconcile_function(scheduled)
    (target,) = props["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": [function_id, "Arn"]}
    assert json.loads(target["Input"]) == {"dryRun": False}
    # EventBridge may invoke it, for this rule only
    (permission,) = [
        p["Properties"]
        for p in scheduled.resources("AWS::Lambda::Permission").values()
        if p["Properties"]["Principal"] == "events.amazonaws.com"
    ]
    assert permission["Action"] == "lambda:InvokeFunction"
    assert permission["FunctionName"] == {"Fn::GetAtt": [function_id, "Arn"]}
    assert permission["SourceArn"] == {"Fn::GetAtt": [rule_id, "Arn"]}


def test_the_reconcile_function(scheduled: Synth) -> None:
    function_id, resource = reconcile_function(scheduled)
    props = resource["Properties"]
    assert props["Handler"] == "certrotator.ops.reconcile.aws.scheduled_handler"
    assert (props["Runtime"], props["Architectures"], props["MemorySize"]) == ("python3.14", ["arm64"], 256)
    assert props["Timeout"] == 15 * 60
    assert props["ReservedConcurrentExecutions"] == 1  # runs never overlap
    assert "Layers" not in props  # no Powertools: test_lambda_asset imports it without
    variables = {k: render(v) for k, v in props["Environment"]["Variables"].items()}
    assert variables == {
        "SNS_TOPIC_ARN": "${" + logical_id(scheduled, "AWS::SNS::Topic") + "}",
        "STATE_KEY_SECRET_ARN": "${" + logical_id(scheduled, "AWS::SecretsManager::Secret") + "}",
    }
    logging = props["LoggingConfig"]
    assert (logging["LogFormat"], logging["ApplicationLogLevel"]) == ("JSON", "INFO")
    group = scheduled.json["Resources"][render(logging["LogGroup"]).strip("${}")]
    assert group["Properties"]["RetentionInDays"] == 365
    # not retried (the next run looks again); what fails, or cannot start within an hour, is notified
    (config,) = [
        c["Properties"]
        for c in scheduled.resources("AWS::Lambda::EventInvokeConfig").values()
        if c["Properties"]["FunctionName"] == {"Ref": function_id}
    ]
    assert config["MaximumRetryAttempts"] == 0
    assert config["MaximumEventAgeInSeconds"] == 3600
    assert config["DestinationConfig"] == {
        "OnFailure": {"Destination": {"Ref": logical_id(scheduled, "AWS::SNS::Topic")}}
    }
    assert scheduled.json["Outputs"]["ReconcileFunctionName"]["Value"] == {"Ref": function_id}


def reconcile_grants(synth: Synth) -> set[tuple[str, str]]:
    _, resource = reconcile_function(synth)
    return grants(role_statements(synth.json, role_id_of(resource["Properties"]["Role"])))


def test_least_privilege_for_the_reconcile_function(scheduled: Synth) -> None:
    _, resource = reconcile_function(scheduled)
    role_id = role_id_of(resource["Properties"]["Role"])
    assert trust(scheduled, role_id)["Principal"] == {"Service": "lambda.amazonaws.com"}
    log_group = "${" + render(resource["Properties"]["LoggingConfig"]["LogGroup"]).strip("${}") + ".Arn}"
    topic = "${" + logical_id(scheduled, "AWS::SNS::Topic") + "}"
    key = "${" + logical_id(scheduled, "AWS::KMS::Key") + ".Arn}"
    secret = "${" + logical_id(scheduled, "AWS::SecretsManager::Secret") + "}"
    assert reconcile_grants(scheduled) == {
        ("logs:CreateLogStream", log_group),
        ("logs:PutLogEvents", log_group),
        ("iot:DescribeEndpoint", "*"),
        ("secretsmanager:GetSecretValue", secret),
        ("iot:ListThings", "*"),
        ("iot:ListThingPrincipals", THINGS),
        ("iot:ListThingPrincipalsV2", THINGS),
        ("iot:ListJobExecutionsForThing", THINGS),
        ("iot:GetJobDocument", JOBS),
        ("iot:DescribeCertificate", CERTS),
        ("iot:ListPrincipalThings", "*"),
        ("iot:UpdateCertificate", CERTS),
        ("iot:DetachThingPrincipal", CERTS),
        ("iot:DeleteCertificate", CERTS),
        ("iot:GetThingShadow", STATE_SHADOWS),
        ("iot:DeleteThingShadow", STATE_SHADOWS),
        ("iot:GetThingShadow", ANNOUNCE_SHADOWS),  # read only: the rule writes it
        ("sns:Publish", topic),
        ("kms:GenerateDataKey", key),
        ("kms:Decrypt", key),
    }


def test_the_topic_lets_the_reconcile_function_publish(scheduled: Synth) -> None:
    _, policy = only(scheduled.resources("AWS::SNS::TopicPolicy"))
    (deny,) = [
        s
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
        if s["Sid"] == "OnlyTheRotatorPublishes"
    ]
    _, resource = reconcile_function(scheduled)
    publishers = [render(r) for r in as_list(deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"])]
    assert render(resource["Properties"]["Role"]) in publishers


# ---------------------------------------------------------------------------------- grace period


# The terminal function may act on a rotation state until its last asynchronous attempt ends: the
# attempt starts at most the maximum event age after the execution ended and runs up to the function's
# timeout. The state was written before the execution ended, up to the job's in-progress timeout before
# (the job template's). reconcile's HANDLER_GRACE_S, measured from the state's last write, must outlast
# all of it, or reconcile may act on a state the terminal function is still retrying.
TERMINAL_WINDOW_S = (
    failures.TERMINAL_MAX_EVENT_AGE.to_seconds()
    + TERMINAL_TIMEOUT.to_seconds()
    + TIMEOUT_CONFIG["InProgressTimeoutInMinutes"] * 60
)


def test_the_terminal_window_is_6_h_5_min_30_s_after_the_state_was_written() -> None:
    assert TERMINAL_WINDOW_S == 6 * 3600 + 30 + 5 * 60 == 21_930


def test_reconcile_waits_longer_than_the_terminal_function_may_still_act() -> None:
    assert HANDLER_GRACE_S > TERMINAL_WINDOW_S
