"""The synthesised stack, in both issuer modes, with and without the scheduled reconcile: every resource
and property the backend relies on. (The announcement rule and the scheduled reconcile themselves:
test_reconcile.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.infra.support import (
    ACCOUNT,
    CA_ID,
    CDK_MISSING,
    LAYER_ARN,
    PCA_CONTEXT,
    REGION,
    Synth,
    as_list,
    function_by_name,
    grants,
    make_app,
    only,
    render,
    role_statements,
    substitute,
)

pytest.importorskip("aws_cdk", reason=CDK_MISSING)

from aws_cdk.assertions import Match
from certrotator_infra import rotation_rules
from certrotator_infra.application import build
from certrotator_infra.lambda_asset import powertools_version
from certrotator_infra.permissions import Function

from certrotator.protocol import BrokerContext, CommitCertificateRequest, CreateCertificateRequest, Topics

DEFAULT_STACK = "AWSLabsCertificateRotator"
PCA_STACK = PCA_CONTEXT["StackName"]
FUNCTIONS = ("CreateCertificate", "CommitCertificate", "JobExecutionTerminal")
HANDLERS = {
    "CreateCertificate": "certrotator.backend.aws.lambdas.create_certificate",
    "CommitCertificate": "certrotator.backend.aws.lambdas.commit_certificate",
    "JobExecutionTerminal": "certrotator.backend.aws.lambdas.job_execution_terminal",
}
CREATE_SQL = (
    "SELECT jobId, csr, topic(3) AS thingName, topic() AS topic, clientid() AS clientId,"
    " principal() AS principal FROM 'awslabs/things/+/certificate/create'"
)
COMMIT_SQL = (
    "SELECT jobId, topic(3) AS thingName, topic() AS topic, clientid() AS clientId, principal() AS principal"
    " FROM 'awslabs/things/+/certificate/commit'"
)
TERMINAL_SQL = (
    "SELECT * FROM '$aws/events/jobExecution/+/+' WHERE topic(5) = 'succeeded' OR topic(5) = 'failed'"
    " OR topic(5) = 'timed_out' OR topic(5) = 'rejected' OR topic(5) = 'removed' OR topic(5) = 'canceled'"
)
SQL = {"CreateCertificate": CREATE_SQL, "CommitCertificate": COMMIT_SQL, "JobExecutionTerminal": TERMINAL_SQL}
JOB_DOCUMENT = '{"operation":"ROTATE_CERTIFICATE"}'

ARN_PREFIX = "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:"
THINGS = ARN_PREFIX + "thing/*"
CERTS = ARN_PREFIX + "cert/*"
SHADOWS = ARN_PREFIX + "thing/*/AWSLabsCertificateRotator"
JOBS = ARN_PREFIX + "job/*"
PCA_ARN = (
    f"arn:${{AWS::Partition}}:acm-pca:${{AWS::Region}}:${{AWS::AccountId}}:certificate-authority/{CA_ID}"
)


@pytest.fixture(params=["iot", "pca", "iot_reconcile", "pca_reconcile"])
def synth(request: pytest.FixtureRequest) -> Synth:
    """The four configurations, each synthesised once per session."""
    result: Synth = request.getfixturevalue(f"{request.param}_synth")
    return result


def stack_name(synth: Synth) -> str:
    return synth.stack.stack_name


def is_pca(synth: Synth) -> bool:
    return synth.stack.ca_arn is not None


def has_reconcile(synth: Synth) -> bool:
    return synth.stack.reconcile is not None


def with_reconcile(synth: Synth) -> tuple[str, ...]:
    """The functions of the configuration: the three handlers, and the scheduled reconcile if it is on."""
    return (*FUNCTIONS, "Reconcile") if has_reconcile(synth) else FUNCTIONS


def role_of(synth: Synth, function: str) -> str:
    """The role's logical id."""
    _, resource = function_by_name(synth.json, f"{stack_name(synth)}{function}")
    return render(resource["Properties"]["Role"]).strip("${}").removesuffix(".Arn")


def logical_id(synth: Synth, kind: str) -> str:
    return only(synth.resources(kind))[0]


# ----------------------------------------------------------------------------------- the synthesis


def test_synthesis_passes_the_nag_checks_with_nothing_left_unacknowledged(synth: Synth) -> None:
    # The fixture ran app.synth(), which raises on an unacknowledged AwsSolutions error; the report
    # it leaves behind lists no violation at all (errors or warnings).
    report = json.loads((synth.outdir / "validation-report.json").read_text())
    assert [r for r in report["pluginReports"] if r.get("violations")] == []


def test_stack_names(iot_synth: Synth, pca_synth: Synth) -> None:
    assert iot_synth.stack.stack_name == DEFAULT_STACK
    assert pca_synth.stack.stack_name == PCA_STACK


# ------------------------------------------------------------------------------------ the functions


def test_three_functions_packaged_from_our_package(synth: Synth) -> None:
    # + the custom resource's provider, + the scheduled reconcile if it is on
    synth.template.resource_count_is("AWS::Lambda::Function", 5 if has_reconcile(synth) else 4)
    layer = LAYER_ARN if is_pca(synth) else None
    for function in FUNCTIONS:
        _, resource = function_by_name(synth.json, f"{stack_name(synth)}{function}")
        props = resource["Properties"]
        assert props["Runtime"] == "python3.14"
        assert props["Architectures"] == ["arm64"]
        assert props["Handler"] == HANDLERS[function]
        assert props["MemorySize"] == 256
        assert props["Code"]["S3Key"].endswith(".zip")
        if layer is not None:
            assert props["Layers"] == [layer]
        else:
            (parameter,) = [render(x) for x in props["Layers"]]
            name = parameter.removeprefix("${").removesuffix("}")
            assert synth.json["Parameters"][name] == {
                "Type": "AWS::SSM::Parameter::Value<String>",
                "Default": f"/aws/service/powertools/python/arm64/python3.14/{powertools_version()}",
            }


def test_one_code_asset_shared_by_the_functions_holds_the_handlers(synth: Synth) -> None:
    keys = {
        function_by_name(synth.json, f"{stack_name(synth)}{f}")[1]["Properties"]["Code"]["S3Key"]
        for f in with_reconcile(synth)
    }
    (key,) = keys
    asset = synth.outdir / f"asset.{key.removesuffix('.zip')}"
    assert (asset / "certrotator" / "backend" / "aws" / "lambdas.py").is_file()
    assert (asset / "certrotator" / "backend" / "handlers.py").is_file()
    assert (asset / "certrotator" / "ops" / "reconcile" / "aws.py").is_file()


def test_timeouts(synth: Synth) -> None:
    expected = {
        "CreateCertificate": 90 if is_pca(synth) else 60,
        "CommitCertificate": 30,
        "JobExecutionTerminal": 30,
    }
    for function, seconds in expected.items():
        _, resource = function_by_name(synth.json, f"{stack_name(synth)}{function}")
        assert resource["Properties"]["Timeout"] == seconds, function


def event_invoke_configs(synth: Synth) -> dict[str, dict[str, Any]]:
    """Function name -> its asynchronous invocation configuration."""
    by_function = {}
    for config in synth.resources("AWS::Lambda::EventInvokeConfig").values():
        props = config["Properties"]
        assert props["Qualifier"] == "$LATEST"
        target = render(props["FunctionName"])
        (name,) = [
            f
            for f in with_reconcile(synth)
            if target == "${" + function_by_name(synth.json, f"{stack_name(synth)}{f}")[0] + "}"
        ]
        by_function[name] = props
    assert sorted(by_function) == sorted(with_reconcile(synth))
    return by_function


def test_create_and_commit_are_not_retried_and_drop_events_older_than_60_seconds(synth: Synth) -> None:
    """A late create or commit would act on a rotation the device already gave up on."""
    configs = event_invoke_configs(synth)
    for function in ("CreateCertificate", "CommitCertificate"):
        assert configs[function] == {
            "FunctionName": configs[function]["FunctionName"],
            "Qualifier": "$LATEST",
            "MaximumRetryAttempts": 0,
            "MaximumEventAgeInSeconds": 60,
        }


def test_terminal_is_retried_and_what_still_fails_is_queued(synth: Synth) -> None:
    """At least once: two retries, events kept up to 6 hours (the maximum), then the failure queue."""
    props = event_invoke_configs(synth)["JobExecutionTerminal"]
    assert props["MaximumRetryAttempts"] == 2
    assert props["MaximumEventAgeInSeconds"] == 6 * 3600
    queue_id = logical_id(synth, "AWS::SQS::Queue")
    destination = props["DestinationConfig"]
    assert destination == {"OnFailure": {"Destination": {"Fn::GetAtt": [queue_id, "Arn"]}}}
    # the function may send there (Lambda sends as the function's role), and nothing more on the queue
    _, terminal = function_by_name(synth.json, f"{stack_name(synth)}JobExecutionTerminal")
    role_id = render(terminal["Properties"]["Role"]).strip("${}").removesuffix(".Arn")
    queue_arn = "${" + queue_id + ".Arn}"
    assert {a for a, r in grants(role_statements(synth.json, role_id)) if r == queue_arn} == {
        "sqs:SendMessage",
        "sqs:GetQueueAttributes",
        "sqs:GetQueueUrl",
    }


def test_the_failure_queue_is_encrypted_tls_only_and_kept_14_days(synth: Synth) -> None:
    queue_id, queue = only(synth.resources("AWS::SQS::Queue"))
    assert queue["Properties"]["SqsManagedSseEnabled"] is True
    assert queue["Properties"]["MessageRetentionPeriod"] == 14 * 24 * 3600
    _, policy = only(synth.resources("AWS::SQS::QueuePolicy"))
    (statement,) = policy["Properties"]["PolicyDocument"]["Statement"]
    assert statement["Effect"] == "Deny"
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert statement["Principal"] == {"AWS": "*"}
    assert render(policy["Properties"]["Queues"][0]) == "${" + queue_id + "}"


def alarm_named(synth: Synth, suffix: str) -> tuple[str, dict[str, Any]]:
    return only(
        {
            k: v
            for k, v in synth.resources("AWS::CloudWatch::Alarm").items()
            if v["Properties"]["AlarmName"] == f"{stack_name(synth)}{suffix}"
        }
    )


def test_a_message_in_the_failure_queue_raises_the_alarm_on_the_notification_topic(synth: Synth) -> None:
    _, alarm = alarm_named(synth, "TerminalFailures")
    props = alarm["Properties"]
    queue_id = logical_id(synth, "AWS::SQS::Queue")
    assert props["AlarmName"] == f"{stack_name(synth)}TerminalFailures"
    assert props["Namespace"] == "AWS/SQS"
    assert props["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert props["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": [queue_id, "QueueName"]}}]
    assert (props["ComparisonOperator"], props["Threshold"]) == ("GreaterThanThreshold", 0)
    assert (props["Statistic"], props["Period"], props["EvaluationPeriods"]) == ("Maximum", 300, 1)
    assert props["TreatMissingData"] == "notBreaching"
    assert props["AlarmActions"] == [{"Ref": logical_id(synth, "AWS::SNS::Topic")}]


def test_structured_json_logs_in_a_log_group_kept_a_year(synth: Synth) -> None:
    for function in with_reconcile(synth):
        _, resource = function_by_name(synth.json, f"{stack_name(synth)}{function}")
        logging = resource["Properties"]["LoggingConfig"]
        assert logging["LogFormat"] == "JSON"
        assert logging["ApplicationLogLevel"] == "INFO"
        assert logging["SystemLogLevel"] == "WARN"
        group = synth.json["Resources"][render(logging["LogGroup"]).strip("${}")]
        assert group["Type"] == "AWS::Logs::LogGroup"
        assert group["Properties"]["RetentionInDays"] == 365


def test_environment_as_the_handlers_expect(synth: Synth) -> None:
    topic = logical_id(synth, "AWS::SNS::Topic")
    secret = logical_id(synth, "AWS::SecretsManager::Secret")
    expected = {
        "SNS_TOPIC_ARN": "${" + topic + "}",
        "STATE_KEY_SECRET_ARN": "${" + secret + "}",
        "SHADOW_NAME": "AWSLabsCertificateRotator",
        "JOB_DOCUMENT": JOB_DOCUMENT,
        "POWERTOOLS_SERVICE_NAME": "certificate-rotator",
        "POWERTOOLS_METRICS_NAMESPACE": "CertificateRotator",
    }
    if is_pca(synth):
        expected |= {
            "PCA_CA_ARN": PCA_ARN,
            "PCA_SIGNING_ALGORITHM": "SHA384WITHECDSA",
            "PCA_VALIDITY_IN_DAYS": "30",
        }
    for function in FUNCTIONS:
        _, resource = function_by_name(synth.json, f"{stack_name(synth)}{function}")
        variables = resource["Properties"]["Environment"]["Variables"]
        assert {k: render(v) for k, v in variables.items()} == expected, function


def test_the_handlers_accept_the_environment(synth: Synth) -> None:
    """The deployed variables (references resolved as CloudFormation would) pass the functions' own
    configuration check, and configure the issuer the context asked for."""
    from certrotator.backend.aws.lambdas import BackendConfig

    name = stack_name(synth)
    values = {
        "AWS::Partition": "aws",
        "AWS::Region": REGION,
        "AWS::AccountId": ACCOUNT,
        logical_id(synth, "AWS::SNS::Topic"): f"arn:aws:sns:{REGION}:{ACCOUNT}:{name}Notification",
        logical_id(synth, "AWS::SecretsManager::Secret"): (
            f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:StateKey1A488514-AbCdEf"
        ),
    }
    for function in FUNCTIONS:
        _, resource = function_by_name(synth.json, f"{name}{function}")
        env = {
            k: substitute(render(v), values)
            for k, v in resource["Properties"]["Environment"]["Variables"].items()
        }
        config = BackendConfig.from_env(env)
        assert config.sns_topic_arn.endswith(f":{name}Notification")
        if is_pca(synth):
            assert config.pca_ca_arn == f"arn:aws:acm-pca:{REGION}:{ACCOUNT}:certificate-authority/{CA_ID}"
            assert config.pca_signing_algorithm.value == "SHA384WITHECDSA"
            assert config.pca_validity_days == 30
        else:
            assert config.pca_ca_arn is None


# ---------------------------------------------------------------------------------------- the rules


def select_list(sql: str) -> list[str]:
    """The items between SELECT and FROM (none of ours has a comma inside an item)."""
    assert sql.startswith("SELECT ") and sql.count(" FROM ") == 1, sql
    return [item.strip() for item in sql.removeprefix("SELECT ").split(" FROM ")[0].split(",")]


@pytest.mark.parametrize(
    ("sql", "message", "topic"),
    [
        (rotation_rules.CREATE_SQL, CreateCertificateRequest("job", "csr"), Topics.create("+")),
        (rotation_rules.COMMIT_SQL, CommitCertificateRequest("job"), Topics.commit("+")),
    ],
    ids=["create", "commit"],
)
def test_request_rules_select_the_request_by_name_and_only_the_broker_adds_context(
    sql: str, message: CreateCertificateRequest | CommitCertificateRequest, topic: str
) -> None:
    """No `*`: a device's payload reaches the function only as the request's own fields, and every field
    the handlers trust as broker context (BrokerContext) is a function of the connection, never a
    field a payload could also carry and AWS IoT SQL might let win."""
    items = select_list(sql)
    assert "*" not in sql
    assert sql.endswith(f" FROM '{topic}'")
    fields = [item for item in items if " AS " not in item]
    assert fields == list(message.to_payload())
    aliases = {alias: expr for expr, alias in (item.split(" AS ") for item in items if " AS " in item)}
    context = BrokerContext(thing="t", client_id="c", principal="p", topic="x").to_event_fields()
    assert set(aliases) == set(context)
    assert aliases == {
        "thingName": "topic(3)",  # awslabs/things/{thing}/...
        "topic": "topic()",
        "clientId": "clientid()",
        "principal": "principal()",
    }
    assert not set(fields) & set(aliases)


def test_three_function_rules_with_the_exact_sql_and_an_error_action(synth: Synth) -> None:
    rules = synth.resources("AWS::IoT::TopicRule")
    assert len(rules) == 4  # + the announcement rule
    prefix = stack_name(synth).replace("-", "_")
    for function in FUNCTIONS:
        fn_id, _ = function_by_name(synth.json, f"{stack_name(synth)}{function}")
        rule = only({k: v for k, v in rules.items() if v["Properties"]["RuleName"] == f"{prefix}{function}"})[
            1
        ]
        payload = rule["Properties"]["TopicRulePayload"]
        assert payload["Sql"] == SQL[function]
        if function != "JobExecutionTerminal":  # a device's request: no field of its own beyond the request's
            assert "*" not in select_list(payload["Sql"])
        assert payload["AwsIotSqlVersion"] == "2016-03-23"
        assert payload["RuleDisabled"] is False
        assert payload["Actions"] == [{"Lambda": {"FunctionArn": {"Fn::GetAtt": [fn_id, "Arn"]}}}]
        if function == "JobExecutionTerminal":
            continue  # its error action queues the event: test_the_terminal_rule_queues_what_it_cannot_deliver
        error = payload["ErrorAction"]["CloudwatchLogs"]
        group = synth.json["Resources"][render(error["LogGroupName"]).strip("${}")]
        assert group["Type"] == "AWS::Logs::LogGroup"
        role_id = render(error["RoleArn"]).strip("${}").removesuffix(".Arn")
        assert (
            "logs:PutLogEvents",
            "${" + render(error["LogGroupName"]).strip("${}") + ".Arn}",
        ) in grants(role_statements(synth.json, role_id))


def rule_payload(synth: Synth, function: str) -> dict[str, Any]:
    name = f"{stack_name(synth).replace('-', '_')}{function}"
    rules = synth.resources("AWS::IoT::TopicRule")
    (rule,) = [r for r in rules.values() if r["Properties"]["RuleName"] == name]
    payload: dict[str, Any] = rule["Properties"]["TopicRulePayload"]
    return payload


def trust_statement(synth: Synth, role_id: str) -> dict[str, Any]:
    (statement,) = synth.json["Resources"][role_id]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    return dict(statement)


def test_rule_error_role_is_for_this_accounts_rules_only(synth: Synth) -> None:
    logging_rules = ("CreateCertificate", "CommitCertificate", "CertificateAnnounce")
    role_ids = {
        render(rule_payload(synth, f)["ErrorAction"]["CloudwatchLogs"]["RoleArn"]).strip("${}")
        for f in logging_rules
    }
    (role_id,) = {r.removesuffix(".Arn") for r in role_ids}
    statement = trust_statement(synth, role_id)
    assert statement["Principal"] == {"Service": "iot.amazonaws.com"}
    assert render(statement["Condition"]["StringEquals"]["aws:SourceAccount"]) == "${AWS::AccountId}"
    prefix = stack_name(synth).replace("-", "_")
    assert [render(a) for a in statement["Condition"]["ArnEquals"]["aws:SourceArn"]] == [
        f"arn:${{AWS::Partition}}:iot:${{AWS::Region}}:${{AWS::AccountId}}:rule/{prefix}{function}"
        for function in logging_rules
    ]
    (group,) = {
        r.removeprefix("${").removesuffix(".Arn}") for _, r in grants(role_statements(synth.json, role_id))
    }
    assert synth.json["Resources"][group]["Type"] == "AWS::Logs::LogGroup"
    assert grants(role_statements(synth.json, role_id)) == {
        ("logs:CreateLogStream", "${" + group + ".Arn}"),
        ("logs:PutLogEvents", "${" + group + ".Arn}"),
    }


def test_the_terminal_rule_queues_what_it_cannot_deliver(synth: Synth) -> None:
    """A terminal event the rule could not hand to the function (e.g. invoke throttled) goes to the
    failure queue, raw JSON, with a role only that rule of this account may assume and that may only send
    to that queue."""
    action = rule_payload(synth, "JobExecutionTerminal")["ErrorAction"]
    assert list(action) == ["Sqs"]
    queue_id = logical_id(synth, "AWS::SQS::Queue")
    assert action["Sqs"]["QueueUrl"] == {"Ref": queue_id}
    assert action["Sqs"]["UseBase64"] is False
    role_id = render(action["Sqs"]["RoleArn"]).strip("${}").removesuffix(".Arn")
    statement = trust_statement(synth, role_id)
    assert statement["Principal"] == {"Service": "iot.amazonaws.com"}
    assert render(statement["Condition"]["StringEquals"]["aws:SourceAccount"]) == "${AWS::AccountId}"
    prefix = stack_name(synth).replace("-", "_")
    assert render(statement["Condition"]["ArnEquals"]["aws:SourceArn"]) == (
        f"arn:${{AWS::Partition}}:iot:${{AWS::Region}}:${{AWS::AccountId}}:rule/{prefix}JobExecutionTerminal"
    )
    queue_arn = "${" + queue_id + ".Arn}"
    assert grants(role_statements(synth.json, role_id)) == {
        ("sqs:SendMessage", queue_arn),
        ("sqs:GetQueueAttributes", queue_arn),
        ("sqs:GetQueueUrl", queue_arn),
    }


def test_each_rule_may_invoke_only_its_function_from_this_account(synth: Synth) -> None:
    permissions = {
        k: v
        for k, v in synth.resources("AWS::Lambda::Permission").items()
        if v["Properties"]["Principal"] != "events.amazonaws.com"  # the schedule's: test_reconcile.py
    }
    rules = {
        k: v
        for k, v in synth.resources("AWS::IoT::TopicRule").items()
        if "Lambda" in v["Properties"]["TopicRulePayload"]["Actions"][0]
    }
    assert len(permissions) == len(rules) == 3
    pairs = set()
    for permission in permissions.values():
        props = permission["Properties"]
        assert props["Action"] == "lambda:InvokeFunction"
        assert props["Principal"] == "iot.amazonaws.com"
        assert props["SourceAccount"] == {"Ref": "AWS::AccountId"}
        rule_id = props["SourceArn"]["Fn::GetAtt"][0]
        assert props["SourceArn"] == {"Fn::GetAtt": [rule_id, "Arn"]}
        pairs.add((rule_id, props["FunctionName"]["Fn::GetAtt"][0]))
    expected = set()
    for rule_id, rule in rules.items():
        (action,) = rule["Properties"]["TopicRulePayload"]["Actions"]
        expected.add((rule_id, action["Lambda"]["FunctionArn"]["Fn::GetAtt"][0]))
    assert pairs == expected


# ----------------------------------------------------------------------------------- job template


def test_job_template(synth: Synth) -> None:
    synth.template.has_resource_properties(
        "AWS::IoT::JobTemplate",
        Match.object_equals(
            {
                "JobTemplateId": stack_name(synth),
                "Description": Match.any_value(),
                "Document": JOB_DOCUMENT,
                "JobExecutionsRolloutConfig": {
                    "ExponentialRolloutRate": {
                        "BaseRatePerMinute": 100,
                        "IncrementFactor": 1.2,
                        "RateIncreaseCriteria": {"NumberOfSucceededThings": 100},
                    },
                    "MaximumPerMinute": 300,  # certrotator.ops.aws.quotas.rollout_ceiling_per_minute()
                },
                "TimeoutConfig": {"InProgressTimeoutInMinutes": 5},
            }
        ),
    )


# ------------------------------------------------------------------------------------- SNS topic


def test_topic_encrypted_with_a_rotating_key_the_alarm_may_use(synth: Synth) -> None:
    """Not the AWS managed alias/aws/sns: CloudWatch alarms cannot publish to a topic under it."""
    _, topic = only(synth.resources("AWS::SNS::Topic"))
    assert topic["Properties"]["TopicName"] == f"{stack_name(synth)}Notification"
    key_id, key = only(synth.resources("AWS::KMS::Key"))
    assert topic["Properties"]["KmsMasterKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    assert key["Properties"]["EnableKeyRotation"] is True
    statements = key["Properties"]["KeyPolicy"]["Statement"]
    (cloudwatch,) = [s for s in statements if s.get("Sid") == "CloudWatchAlarmsPublish"]
    assert cloudwatch["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    assert sorted(as_list(cloudwatch["Action"])) == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert render(cloudwatch["Condition"]["StringEquals"]["aws:SourceAccount"]) == "${AWS::AccountId}"


def test_only_the_rotator_and_its_alarm_may_publish(synth: Synth) -> None:
    """Create, terminal, and the scheduled reconcile if it is on."""
    topic_id, _ = only(synth.resources("AWS::SNS::Topic"))
    _, policy = only(synth.resources("AWS::SNS::TopicPolicy"))
    role_arns = {f: "${" + role_of(synth, f) + ".Arn}" for f in with_reconcile(synth)}
    allowed = [role_arns["CreateCertificate"], role_arns["JobExecutionTerminal"]]
    if has_reconcile(synth):
        allowed.append(role_arns["Reconcile"])
    statements = {s["Sid"]: s for s in policy["Properties"]["PolicyDocument"]["Statement"]}
    assert statements.keys() == {
        "AllowPublishThroughSSLOnly",
        "OnlyTheRotatorPublishes",
        "TheAlarmsPublish",
    }
    deny = statements["OnlyTheRotatorPublishes"]
    assert (deny["Effect"], deny["Principal"], deny["Action"]) == ("Deny", {"AWS": "*"}, "sns:Publish")
    assert [render(r) for r in deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"]] == allowed
    assert deny["Condition"]["StringNotEquals"] == {"aws:PrincipalServiceName": "cloudwatch.amazonaws.com"}
    assert render(deny["Resource"]) == "${" + topic_id + "}"
    alarm = statements["TheAlarmsPublish"]
    assert (alarm["Effect"], alarm["Principal"], alarm["Action"]) == (
        "Allow",
        {"Service": "cloudwatch.amazonaws.com"},
        "sns:Publish",
    )
    alarm_ids = [alarm_named(synth, suffix)[0] for suffix in ("TerminalFailures", "FailedRotations")]
    assert alarm["Condition"]["ArnEquals"]["aws:SourceArn"] == [{"Fn::GetAtt": [a, "Arn"]} for a in alarm_ids]
    assert render(alarm["Condition"]["StringEquals"]["aws:SourceAccount"]) == "${AWS::AccountId}"
    tls = statements["AllowPublishThroughSSLOnly"]
    assert (tls["Effect"], tls["Condition"]) == ("Deny", {"Bool": {"aws:SecureTransport": "false"}})
    # and those roles are the only ones granted sns:Publish (and the key to encrypt with)
    publishers = sorted(
        role_id
        for role_id in synth.resources("AWS::IAM::Role")
        if any(a == "sns:Publish" for a, _ in grants(role_statements(synth.json, role_id)))
    )
    assert sorted("${" + r + ".Arn}" for r in publishers) == sorted(allowed)


# --------------------------------------------------------------------------------- state key secret


def test_state_key_secret_is_generated_and_long_enough(synth: Synth) -> None:
    _, secret = only(synth.resources("AWS::SecretsManager::Secret"))
    generator = secret["Properties"]["GenerateSecretString"]
    assert generator["PasswordLength"] >= 32  # the functions require at least 32 bytes
    assert generator["ExcludePunctuation"] is True  # one byte per character as UTF-8
    assert "SecretString" not in secret["Properties"]


def test_only_the_functions_read_the_secret_and_only_its_value(synth: Synth) -> None:
    secret_ref = "${" + logical_id(synth, "AWS::SecretsManager::Secret") + "}"
    readers = {}
    for role_id in synth.resources("AWS::IAM::Role"):
        actions = {a for a, r in grants(role_statements(synth.json, role_id)) if r == secret_ref}
        if actions:
            readers[role_id] = actions
    function_roles = {role_of(synth, f) for f in with_reconcile(synth)}
    assert readers == {role: {"secretsmanager:GetSecretValue"} for role in function_roles}


# ------------------------------------------------------------------------------ least-privilege IAM


def expected_grants(synth: Synth, function: str, log_group_arn: str) -> set[tuple[str, str]]:
    topic = "${" + logical_id(synth, "AWS::SNS::Topic") + "}"
    key = "${" + logical_id(synth, "AWS::KMS::Key") + ".Arn}"
    notify = {("sns:Publish", topic), ("kms:GenerateDataKey", key), ("kms:Decrypt", key)}
    secret = "${" + logical_id(synth, "AWS::SecretsManager::Secret") + "}"
    common = {
        ("logs:CreateLogStream", log_group_arn),
        ("logs:PutLogEvents", log_group_arn),
        ("iot:DescribeEndpoint", "*"),
        ("secretsmanager:GetSecretValue", secret),
    }
    custody = {
        ("iotjobsdata:DescribeJobExecution", THINGS),
        ("iot:DescribeJobExecution", THINGS),  # an execution the data plane no longer describes
        ("iot:DescribeJobExecution", JOBS),
        ("iot:ListThingPrincipals", THINGS),
        ("iot:ListThingPrincipalsV2", THINGS),
    }
    remove = {(f"iot:{a}", CERTS) for a in ("UpdateCertificate", "DetachThingPrincipal", "DeleteCertificate")}

    def replies(request: str) -> set[tuple[str, str]]:
        return {
            ("iot:Publish", f"{ARN_PREFIX}topic/awslabs/things/*/certificate/{request}/{reply}")
            for reply in ("accepted", "rejected")
        }

    def shadow(*actions: str) -> set[tuple[str, str]]:
        return {(f"iot:{a}ThingShadow", SHADOWS) for a in actions}

    if function == "CreateCertificate":
        if is_pca(synth):
            issuer = {
                ("acm-pca:IssueCertificate", PCA_ARN),
                ("acm-pca:GetCertificate", PCA_ARN),
                ("iot:RegisterCertificateWithoutCA", "*"),
            }
        else:
            issuer = {("iot:CreateCertificateFromCsr", "*")}
        return (
            common
            | custody
            | issuer
            | remove
            | shadow("Get", "Update", "Delete")
            | replies("create")
            | notify  # a certificate withdrawn because the execution ended meanwhile
            | {
                ("iot:DescribeCertificate", CERTS),
                ("iot:ListAttachedPolicies", "*"),
                ("iot:AttachPolicy", CERTS),
                ("iot:AttachThingPrincipal", CERTS),
            }
        )
    if function == "CommitCertificate":
        return common | custody | shadow("Get", "Update") | replies("commit")
    terminal = common | remove | shadow("Get", "Update") | notify | {("iot:GetJobDocument", JOBS)}
    queue = "${" + logical_id(synth, "AWS::SQS::Queue") + ".Arn}"  # its on-failure destination
    return terminal | {(a, queue) for a in ("sqs:SendMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl")}


@pytest.mark.parametrize("function", FUNCTIONS)
def test_least_privilege_per_function(synth: Synth, function: str) -> None:
    _, resource = function_by_name(synth.json, f"{stack_name(synth)}{function}")
    role_id = render(resource["Properties"]["Role"]).strip("${}").removesuffix(".Arn")
    log_group_arn = "${" + render(resource["Properties"]["LoggingConfig"]["LogGroup"]).strip("${}") + ".Arn}"
    assert grants(role_statements(synth.json, role_id)) == expected_grants(synth, function, log_group_arn)
    trust = synth.json["Resources"][role_id]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert [s["Principal"] for s in trust] == [{"Service": "lambda.amazonaws.com"}]


def test_no_wildcard_actions_and_no_managed_policies_anywhere(synth: Synth) -> None:
    for role_id, role in synth.resources("AWS::IAM::Role").items():
        assert "ManagedPolicyArns" not in role["Properties"], role_id
        for action, _ in grants(role_statements(synth.json, role_id)):
            assert "*" not in action, (role_id, action)


# ------------------------------------------------------------------------- job execution events


def test_custom_resource_enables_job_execution_events(synth: Synth) -> None:
    (custom,) = synth.resources("Custom::AWS").values()
    for phase in ("Create", "Update"):
        call: dict[str, Any] = json.loads(custom["Properties"][phase])
        assert call["service"] == "@aws-sdk/client-iot"
        assert call["action"] == "UpdateEventConfigurations"
        assert call["parameters"] == {"eventConfigurations": {"JOB_EXECUTION": {"Enabled": True}}}
    assert "Delete" not in custom["Properties"]  # other applications may rely on the events
    assert custom["Properties"]["InstallLatestAwsSdk"] is False  # no download at deploy time
    provider_id = custom["Properties"]["ServiceToken"]["Fn::GetAtt"][0]
    provider = synth.json["Resources"][provider_id]["Properties"]
    role_id = provider["Role"]["Fn::GetAtt"][0]
    log_group = "${" + render(provider["LoggingConfig"]["LogGroup"]).strip("${}") + ".Arn}"
    assert grants(role_statements(synth.json, role_id)) == {
        ("iot:UpdateEventConfigurations", "*"),
        ("logs:CreateLogStream", log_group),
        ("logs:PutLogEvents", log_group),
    }


def test_outputs_for_operators(synth: Synth) -> None:
    outputs = synth.json["Outputs"]
    assert (
        render(outputs["NotificationTopicArn"]["Value"]) == "${" + logical_id(synth, "AWS::SNS::Topic") + "}"
    )
    assert outputs["JobTemplateArn"]["Value"] == {
        "Fn::GetAtt": [logical_id(synth, "AWS::IoT::JobTemplate"), "Arn"]
    }
    for function in FUNCTIONS:
        assert f"{function}FunctionName" in outputs
    assert outputs["TerminalFailureQueueUrl"]["Value"] == {"Ref": logical_id(synth, "AWS::SQS::Queue")}
    assert ("ReconcileFunctionName" in outputs) == has_reconcile(synth)


def test_private_ca_given_by_arn_is_used_as_given(tmp_path: Path, code_dir: Path) -> None:
    """A CA shared from another account or region: its ARN goes into the environment and the grant
    unchanged (constructing the stack is enough; the two synthesised modes cover the rest)."""

    arn = f"arn:aws:acm-pca:us-east-1:210987654321:certificate-authority/{CA_ID}"
    stack = build(make_app(tmp_path, {"PcaCaId": arn}), code_dir=code_dir)
    assert stack.resolve(stack.ca_arn) == arn
    role = stack.functions[Function.CREATE].role
    document = stack.resolve(role.node.find_child("DefaultPolicy").document)  # type: ignore[attr-defined]
    (statement,) = [s for s in document["Statement"] if s.get("Sid") == "IssueWithPrivateCa"]
    assert as_list(statement["Resource"]) == [arn]
