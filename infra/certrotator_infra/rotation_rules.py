"""The create, commit and terminal rules: the SQL each selects with, the IoT rule that invokes its function,
and where a failed action of the create and commit rules is logged (the terminal rule's failures are
queued: failures.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from aws_cdk import Aws, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs

from certrotator.protocol import TERMINAL_EXECUTION_STATUSES
from certrotator_infra.permissions import Function

# What only the broker knows of a request (certrotator.protocol.BrokerContext's event fields).
BROKER_CONTEXT_SQL: Final = (
    "topic(3) AS thingName, topic() AS topic, clientid() AS clientId, principal() AS principal"
)
# The request's own fields by name (protocol.CreateCertificateRequest / CommitCertificateRequest), never
# `*`: a payload carrying its own `principal`, `thingName`, `clientId` or `topic` never reaches the
# function, so whether AWS IoT SQL would let it shadow the alias is no longer a question.
CREATE_SQL: Final = f"SELECT jobId, csr, {BROKER_CONTEXT_SQL} FROM 'awslabs/things/+/certificate/create'"
COMMIT_SQL: Final = f"SELECT jobId, {BROKER_CONTEXT_SQL} FROM 'awslabs/things/+/certificate/commit'"
# Every job's terminal execution events ($aws/events/jobExecution/{jobId}/{status}): the terminal function
# decides from its own rotation state and the job's document, never from the device's statusDetails, so
# the rule cannot filter on them. Not `deleted` (a DeleteJobExecution of an execution that had ended).
TERMINAL_SQL: Final = "SELECT * FROM '$aws/events/jobExecution/+/+' WHERE " + " OR ".join(
    f"topic(5) = '{status.value.lower()}'" for status in TERMINAL_EXECUTION_STATUSES
)
IOT_SQL_VERSION: Final = "2016-03-23"
RULE_SQL: Final = {Function.CREATE: CREATE_SQL, Function.COMMIT: COMMIT_SQL, Function.TERMINAL: TERMINAL_SQL}


def rule_errors(
    stack: Stack, stack_name: str, rule_names: Sequence[str], retention: logs.RetentionDays
) -> tuple[logs.LogGroup, iam.Role]:
    """Where the rules named `rule_names` (create, commit, announcement) log a failed action (e.g. the
    function could not be invoked, the shadow update was refused), and the role they log with: rule
    failures are otherwise silent."""
    log_group = logs.LogGroup(stack, "RuleErrors", retention=retention, removal_policy=RemovalPolicy.RETAIN)
    role = iam.Role(
        stack,
        "RuleErrorsRole",
        assumed_by=iam.ServicePrincipal(
            "iot.amazonaws.com",
            conditions={
                "StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID},
                # the rules by name (their ARN attributes would make a dependency cycle)
                "ArnEquals": {
                    "aws:SourceArn": [
                        stack.format_arn(service="iot", resource="rule", resource_name=name)
                        for name in rule_names
                    ]
                },
            },
        ),
        description=f"{stack_name}: IoT rules log their action failures",
    )
    log_group.grant_write(role)
    return log_group, role


def log_action(log_group: logs.LogGroup, role: iam.Role) -> iot.CfnTopicRule.ActionProperty:
    """A rule's error action that writes the failure to `log_group` as `role`."""
    return iot.CfnTopicRule.ActionProperty(
        cloudwatch_logs=iot.CfnTopicRule.CloudwatchLogsActionProperty(
            log_group_name=log_group.log_group_name, role_arn=role.role_arn
        )
    )


def function_rule(
    stack: Stack,
    function: Function,
    fn: lambda_.Function,
    rule_name: str,
    error_action: iot.CfnTopicRule.ActionProperty,
) -> iot.CfnTopicRule:
    """The rule that invokes `fn` with RULE_SQL[function], and the function's permission for it."""
    rule = iot.CfnTopicRule(
        stack,
        f"{function}Rule",
        rule_name=rule_name,
        topic_rule_payload=iot.CfnTopicRule.TopicRulePayloadProperty(
            description=f"Certificate rotator: invoke the {function} function",
            sql=RULE_SQL[function],
            aws_iot_sql_version=IOT_SQL_VERSION,
            rule_disabled=False,
            actions=[
                iot.CfnTopicRule.ActionProperty(
                    lambda_=iot.CfnTopicRule.LambdaActionProperty(function_arn=fn.function_arn)
                )
            ],
            error_action=error_action,
        ),
    )
    fn.add_permission(
        f"{function}RuleInvokes",
        principal=iam.ServicePrincipal("iot.amazonaws.com"),
        action="lambda:InvokeFunction",
        source_arn=rule.attr_arn,
        source_account=Aws.ACCOUNT_ID,
    )
    return rule
