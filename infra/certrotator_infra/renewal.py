"""Expiry-driven renewal (off by default): `certrotator schedule --aws`'s code in a Lambda function,
started by an EventBridge schedule (RenewalSchedule) and/or by Device Defender audit notifications
(RenewalAuditFindings), creating rotation jobs from the stack's job template for the things the renewal
policy (RenewalPolicy, e.g. renew-before=30d) finds due.

The audit trigger: the stack creates the topic Device Defender notifies and the role it publishes with,
and subscribes the function; pointing the account's audit configuration at them is left to the operator
(`aws iot update-account-audit-configuration`, see infra/README.md), because that configuration is
account-wide (which checks run, where every audit reports) and a stack must not take it over. The
function acts only on notifications whose DEVICE_CERTIFICATE_EXPIRING_CHECK found certificates, and only
on their things.

Runs never overlap (reserved concurrency 1): two runs could each plan a job for the same due thing. A
failed run is not retried (the next one plans again); the failure goes to the notification topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from aws_cdk import Aws, Duration, RemovalPolicy
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions

from certrotator.ops.schedule.aws import POLICY_ENV, TEMPLATE_ENV, scheduled_handler
from certrotator_infra.parts import RotatorStack
from certrotator_infra.permissions import IotResource, renewal_grants
from certrotator_infra.reconcile import TopicDestination

NAME_SUFFIX: Final = "Renewal"  # the function and the schedule rule: "<stack>Renewal"
HANDLER: Final = f"{scheduled_handler.__module__}.{scheduled_handler.__name__}"
TIMEOUT: Final = Duration.minutes(15)  # Lambda's maximum: a scheduled run visits every thing
RESERVED_CONCURRENCY: Final = 1
MAX_EVENT_AGE: Final = Duration.hours(1)
RETRY_ATTEMPTS: Final = 0
EVENT: Final = {"dryRun": False}
IOT: Final = "iot.amazonaws.com"


@dataclass(frozen=True, slots=True)
class Renewal:
    function: lambda_.Function
    role: iam.Role
    log_group: logs.LogGroup
    rule: events.Rule | None  # the schedule, when RenewalSchedule is set
    audit_topic: sns.Topic | None  # what Device Defender notifies, when RenewalAuditFindings is on
    audit_role: iam.Role | None  # the role Device Defender publishes with


def renewal(stack: RotatorStack, code: lambda_.Code, template_id: str) -> Renewal:
    config = stack.config
    name = f"{config.stack_name}{NAME_SUFFIX}"
    template = IotResource(f"jobtemplate/{template_id}")
    role = iam.Role(
        stack,
        "RenewalRole",
        assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
        description=f"{config.stack_name}: renewal function (creates rotation jobs for due things)",
    )
    log_group = logs.LogGroup(
        stack, "RenewalLogs", retention=stack.log_retention, removal_policy=RemovalPolicy.RETAIN
    )
    log_group.grant_write(role)
    stack.grant(role, renewal_grants(template=template, audit_findings=config.renewal_audit_findings))
    # Only sns:Publish on the notification topic, for the on-failure destination (Lambda sends the
    # invocation record with the function's role), and the topic's key.
    role.add_to_policy(
        iam.PolicyStatement(sid="Notify", actions=["sns:Publish"], resources=[stack.topic.topic_arn])
    )
    role.add_to_policy(
        iam.PolicyStatement(
            sid="NotificationKey",
            actions=["kms:GenerateDataKey", "kms:Decrypt"],
            resources=[stack.topic_key.key_arn],
        )
    )
    function = stack.lambda_function(
        NAME_SUFFIX,
        function_name=name,
        description="Certificate rotator: creates rotation jobs for the things whose certificates the"
        " renewal policy finds due",
        code=code,
        handler=HANDLER,
        timeout=TIMEOUT,
        environment={POLICY_ENV: config.renewal_policy, TEMPLATE_ENV: template_id},
        role=role,
        log_group=log_group,
        layers=[],  # it imports no Powertools (the asset test imports it without)
        reserved_concurrent_executions=RESERVED_CONCURRENCY,
        retry_attempts=RETRY_ATTEMPTS,
        max_event_age=MAX_EVENT_AGE,
        on_failure=TopicDestination(stack.topic),
    )
    rule = None
    if config.renewal_schedule is not None:
        rule = events.Rule(
            stack,
            "RenewalSchedule",
            rule_name=name,
            description="Certificate rotator: run the renewal policy over the fleet",
            schedule=events.Schedule.expression(config.renewal_schedule),
            targets=[
                targets.LambdaFunction(
                    function,
                    event=events.RuleTargetInput.from_object(EVENT),
                    retry_attempts=2,
                    max_event_age=MAX_EVENT_AGE,
                )
            ],
        )
    audit_topic = audit_role = None
    if config.renewal_audit_findings:
        audit_topic, audit_role = _audit_trigger(stack, function)
    return Renewal(function, role, log_group, rule, audit_topic, audit_role)


def _audit_trigger(stack: RotatorStack, function: lambda_.Function) -> tuple[sns.Topic, iam.Role]:
    """The topic Device Defender's audits notify (under the stack's key, TLS only), the role they publish
    with (only this account's IoT may assume it), and the function's subscription."""
    name = stack.config.stack_name
    topic = sns.Topic(
        stack,
        "AuditNotifications",
        topic_name=f"{name}AuditNotifications",
        display_name="Device Defender audit notifications for certificate renewal",
        master_key=stack.topic_key,
        enforce_ssl=True,
    )
    role = iam.Role(
        stack,
        "AuditNotificationsRole",
        assumed_by=iam.ServicePrincipal(
            IOT, conditions={"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}}
        ),
        description=f"{name}: Device Defender publishes audit notifications to the renewal topic",
    )
    role.add_to_policy(
        iam.PolicyStatement(sid="PublishAudits", actions=["sns:Publish"], resources=[topic.topic_arn])
    )
    role.add_to_policy(
        iam.PolicyStatement(
            sid="TopicKey",
            actions=["kms:GenerateDataKey", "kms:Decrypt"],
            resources=[stack.topic_key.key_arn],
        )
    )
    topic.add_subscription(subscriptions.LambdaSubscription(function))
    return topic, role
