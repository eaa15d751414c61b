"""Expiry-driven renewal in the stack (only with RenewalSchedule or RenewalAuditFindings), the Device
Defender trigger's topic and role, the configurable metrics namespace, and the alarm on failed or
timed-out rotations (always there)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.infra.support import (
    CDK_MISSING,
    RENEWAL_SCHEDULE,
    Synth,
    as_list,
    function_by_name,
    grants,
    only,
    render,
    role_statements,
)

pytest.importorskip("aws_cdk", reason=CDK_MISSING)

from certrotator_infra.config import ContextError, RotatorConfig
from certrotator_infra.permissions import Function

from certrotator.backend.aws import lambdas

ARN_PREFIX = "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:"
THINGS = ARN_PREFIX + "thing/*"
CERTS = ARN_PREFIX + "cert/*"
JOBS = ARN_PREFIX + "job/*"
GROUPS = ARN_PREFIX + "thinggroup/*"


@pytest.fixture(params=["iot_renewal", "pca_renewal_audit"])
def renewing(request: pytest.FixtureRequest) -> Synth:
    result: Synth = request.getfixturevalue(f"{request.param}_synth")
    return result


@pytest.fixture(params=["iot", "pca", "iot_reconcile", "iot_renewal", "pca_renewal_audit"])
def any_synth(request: pytest.FixtureRequest) -> Synth:
    result: Synth = request.getfixturevalue(f"{request.param}_synth")
    return result


def audited(synth: Synth) -> bool:
    return synth.stack.config.renewal_audit_findings


def renewal_function(synth: Synth) -> tuple[str, dict[str, Any]]:
    return function_by_name(synth.json, f"{synth.stack.stack_name}Renewal")


def role_id_of(value: Any) -> str:
    return render(value).strip("${}").removesuffix(".Arn")


def ref(synth: Synth, kind: str, name_part: str = "") -> str:
    (logical_id,) = [k for k in synth.resources(kind) if k.startswith(name_part)]
    return logical_id


# ---------------------------------------------------------------------------------- off by default


@pytest.mark.parametrize("name", ["iot", "pca", "iot_reconcile"])
def test_off_without_context(request: pytest.FixtureRequest, name: str) -> None:
    synth: Synth = request.getfixturevalue(f"{name}_synth")
    assert synth.stack.renewal is None
    assert not any(
        "Renewal" in str(r["Properties"].get("FunctionName"))
        for r in synth.resources("AWS::Lambda::Function").values()
    )
    assert not any("Audit" in k for k in synth.resources("AWS::SNS::Topic"))
    assert "RenewalFunctionName" not in synth.json["Outputs"]


# ------------------------------------------------------------------------------------ the function


def test_the_renewal_function(renewing: Synth) -> None:
    function_id, resource = renewal_function(renewing)
    props = resource["Properties"]
    assert props["Handler"] == "certrotator.ops.schedule.aws.scheduled_handler"
    assert props["Timeout"] == 15 * 60 and props["ReservedConcurrentExecutions"] == 1
    assert "Layers" not in props  # no Powertools: test_lambda_asset imports it without
    expected_policy = (
        "renew-at-fraction=0.66,group=line-1,max-per-job=50" if audited(renewing) else "renew-before=30d"
    )
    variables = {k: render(v) for k, v in props["Environment"]["Variables"].items()}
    assert variables == {"RENEWAL_POLICY": expected_policy, "JOB_TEMPLATE": renewing.stack.stack_name}
    (config,) = [
        c["Properties"]
        for c in renewing.resources("AWS::Lambda::EventInvokeConfig").values()
        if c["Properties"]["FunctionName"] == {"Ref": function_id}
    ]
    assert (config["MaximumRetryAttempts"], config["MaximumEventAgeInSeconds"]) == (0, 3600)
    topic = ref(renewing, "AWS::SNS::Topic", "Notifications")
    assert config["DestinationConfig"] == {"OnFailure": {"Destination": {"Ref": topic}}}
    assert renewing.json["Outputs"]["RenewalFunctionName"]["Value"] == {"Ref": function_id}


def test_the_schedule_runs_it(renewing: Synth) -> None:
    (rule,) = [
        r["Properties"]
        for r in renewing.resources("AWS::Events::Rule").values()
        if r["Properties"]["Name"] == f"{renewing.stack.stack_name}Renewal"
    ]
    assert rule["ScheduleExpression"] == ("cron(15 4 * * ? *)" if audited(renewing) else RENEWAL_SCHEDULE)
    (target,) = rule["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": [renewal_function(renewing)[0], "Arn"]}
    assert json.loads(target["Input"]) == {"dryRun": False}


def test_least_privilege_for_the_renewal_function(renewing: Synth) -> None:
    _, resource = renewal_function(renewing)
    role_id = role_id_of(resource["Properties"]["Role"])
    log_group = "${" + render(resource["Properties"]["LoggingConfig"]["LogGroup"]).strip("${}") + ".Arn}"
    template = ARN_PREFIX + f"jobtemplate/{renewing.stack.stack_name}"
    topic = "${" + ref(renewing, "AWS::SNS::Topic", "Notifications") + "}"
    key = "${" + ref(renewing, "AWS::KMS::Key") + ".Arn}"
    expected = {
        ("logs:CreateLogStream", log_group),
        ("logs:PutLogEvents", log_group),
        ("iot:ListThings", "*"),
        ("iot:ListThingsInThingGroup", GROUPS),
        ("iot:ListThingPrincipals", THINGS),
        ("iot:ListThingPrincipalsV2", THINGS),
        ("iot:ListJobExecutionsForThing", THINGS),
        ("iot:ListThingGroupsForThing", THINGS),
        ("iot:DescribeThing", THINGS),
        ("iot:DescribeCertificate", CERTS),
        ("iot:GetJobDocument", JOBS),
        ("iot:DescribeJobTemplate", template),
        ("iot:CreateJob", JOBS),
        ("iot:CreateJob", THINGS),
        ("iot:CreateJob", template),
        ("sns:Publish", topic),  # its on-failure records only
        ("kms:GenerateDataKey", key),
        ("kms:Decrypt", key),
    }
    if audited(renewing):
        expected |= {("iot:ListAuditFindings", "*"), ("iot:ListPrincipalThings", "*")}
    assert grants(role_statements(renewing.json, role_id)) == expected
    # it may publish to the notification topic (the topic's deny names it)
    _, policy = only(
        {
            k: v
            for k, v in renewing.resources("AWS::SNS::TopicPolicy").items()
            if k.startswith("Notifications")
        }
    )
    (deny,) = [
        s
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
        if s["Sid"] == "OnlyTheRotatorPublishes"
    ]
    assert render(resource["Properties"]["Role"]) in [
        render(r) for r in as_list(deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"])
    ]


# ------------------------------------------------------------------------------- Device Defender


def test_the_audit_trigger(pca_renewal_audit_synth: Synth, iot_renewal_synth: Synth) -> None:
    synth = pca_renewal_audit_synth
    topic_id = ref(synth, "AWS::SNS::Topic", "AuditNotifications")
    topic = synth.json["Resources"][topic_id]["Properties"]
    key_id = ref(synth, "AWS::KMS::Key")
    assert topic["KmsMasterKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    assert topic["TopicName"] == f"{synth.stack.stack_name}AuditNotifications"
    # the function is subscribed, and SNS may invoke it for this topic only
    function_id, _ = renewal_function(synth)
    (subscription,) = [s["Properties"] for s in synth.resources("AWS::SNS::Subscription").values()]
    assert subscription == {
        "Protocol": "lambda",
        "TopicArn": {"Ref": topic_id},
        "Endpoint": {"Fn::GetAtt": [function_id, "Arn"]},
    }
    (permission,) = [
        p["Properties"]
        for p in synth.resources("AWS::Lambda::Permission").values()
        if p["Properties"]["Principal"] == "sns.amazonaws.com"
    ]
    assert permission["SourceArn"] == {"Ref": topic_id}
    # Device Defender (this account's IoT) publishes with a role that may do only that
    role_id = role_id_of(synth.json["Outputs"]["AuditNotificationRoleArn"]["Value"])
    (trust,) = synth.json["Resources"][role_id]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "iot.amazonaws.com"}
    assert render(trust["Condition"]["StringEquals"]["aws:SourceAccount"]) == "${AWS::AccountId}"
    assert grants(role_statements(synth.json, role_id)) == {
        ("sns:Publish", "${" + topic_id + "}"),
        ("kms:GenerateDataKey", "${" + key_id + ".Arn}"),
        ("kms:Decrypt", "${" + key_id + ".Arn}"),
    }
    assert synth.json["Outputs"]["AuditNotificationTopicArn"]["Value"] == {"Ref": topic_id}
    # a schedule alone has none of it
    assert "AuditNotificationTopicArn" not in iot_renewal_synth.json["Outputs"]
    assert iot_renewal_synth.resources("AWS::SNS::Subscription") == {}


# --------------------------------------------------------------------------------- metrics, alarm


def test_the_metrics_namespace_is_configurable(iot_synth: Synth, iot_renewal_synth: Synth) -> None:
    for synth, namespace in ((iot_synth, "CertificateRotator"), (iot_renewal_synth, "Fleet/Rotator")):
        for function in Function:
            _, resource = function_by_name(synth.json, f"{synth.stack.stack_name}{function}")
            assert (
                resource["Properties"]["Environment"]["Variables"]["POWERTOOLS_METRICS_NAMESPACE"]
                == namespace
            )


def test_failed_or_timed_out_rotations_raise_an_alarm_on_the_topic(any_synth: Synth) -> None:
    (alarm,) = [
        a["Properties"]
        for a in any_synth.resources("AWS::CloudWatch::Alarm").values()
        if a["Properties"]["AlarmName"] == f"{any_synth.stack.stack_name}FailedRotations"
    ]
    namespace = any_synth.stack.config.metrics_namespace
    queries = {q["Id"]: q for q in alarm["Metrics"]}
    expression = queries.pop(next(k for k, q in queries.items() if "Expression" in q))
    assert expression["Expression"] == "FILL(m0, 0) + FILL(m1, 0)" and expression.get("ReturnData", True)
    stats = {q["MetricStat"]["Metric"]["MetricName"]: q["MetricStat"] for q in queries.values()}
    # the names and the dimension the terminal function publishes (backend/aws/lambdas.py)
    assert set(stats) == set(lambdas.FAILED_ROTATION_METRICS)
    for stat in stats.values():
        assert stat["Metric"]["Namespace"] == namespace
        assert stat["Metric"]["Dimensions"] == [{"Name": "service", "Value": lambdas.SERVICE}]
        assert (stat["Stat"], stat["Period"]) == ("Sum", 300)
    assert (alarm["ComparisonOperator"], alarm["Threshold"], alarm["EvaluationPeriods"]) == (
        "GreaterThanThreshold",
        0,
        1,
    )
    assert alarm["TreatMissingData"] == "notBreaching"
    assert alarm["AlarmActions"] == [{"Ref": ref(any_synth, "AWS::SNS::Topic", "Notifications")}]


# ---------------------------------------------------------------------------------------- context


@pytest.mark.parametrize(
    ("context", "says"),
    [
        ({"RenewalPolicy": "renew-before=30"}, "not a duration"),
        ({"RenewalPolicy": "renew-before=30d,every=1h"}, "KEY one of"),
        ({"RenewalSchedule": "rate(5 minutes)"}, "RenewalSchedule .* more often than hourly"),
        ({"RenewalAuditFindings": "yes"}, "true or false"),
        ({"MetricsNamespace": "AWS/IoT"}, "not starting with AWS/"),
    ],
)
def test_renewal_context_is_checked(context: dict[str, Any], says: str) -> None:
    with pytest.raises(ContextError, match=says):
        RotatorConfig.from_context(context.get)


def test_renewal_context_defaults_and_forms() -> None:
    config = RotatorConfig.from_context({}.get)
    assert (config.renewal, config.renewal_policy, config.metrics_namespace) == (
        False,
        "renew-before=30d",
        "CertificateRotator",
    )
    audit_only = RotatorConfig.from_context({"RenewalAuditFindings": True}.get)
    assert audit_only.renewal and audit_only.renewal_schedule is None
    assert (
        RotatorConfig.from_context({"RenewalPolicy": " renew-before=720h "}.get).renewal_policy
        == "renew-before=30d"
    )
