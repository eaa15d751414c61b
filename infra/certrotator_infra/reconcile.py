"""The scheduled reconcile (off by default): an EventBridge schedule runs `certrotator reconcile --aws`'s
code in a Lambda function, so that what the terminal table keeps for later (two certificates, leftover
rotation state) is settled without an operator.

One run looks at every thing of the account, decides per thing from evidence (certrotator.ops.reconcile),
retires only a certificate the device is proven not to use, and notifies the topic of what needs a person.
Runs never overlap (reserved concurrency 1): two runs acting on one thing would each re-check before they
act, but one at a time keeps the API load of a run predictable. A failed run is not retried (the next
scheduled run looks again); the failure itself, or a run that could not start within an hour, goes to the
notification topic (the function's asynchronous on-failure destination).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import jsii
from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from constructs import Construct

from certrotator.backend.aws.adapters import STATE_KEY_SECRET_ARN_ENV
from certrotator.ops.reconcile.aws import TOPIC_ENV, scheduled_handler
from certrotator_infra.parts import RotatorStack
from certrotator_infra.permissions import reconcile_grants

NAME_SUFFIX: Final = "Reconcile"  # the function and the schedule rule: "<stack>Reconcile"
HANDLER: Final = f"{scheduled_handler.__module__}.{scheduled_handler.__name__}"
TIMEOUT: Final = Duration.minutes(15)  # Lambda's maximum: a run visits every thing of the account
RESERVED_CONCURRENCY: Final = 1
# A scheduled invocation that cannot start (a run still going, throttling) waits at most this long, then
# goes to the on-failure destination; the next scheduled run comes anyway.
MAX_EVENT_AGE: Final = Duration.hours(1)
RETRY_ATTEMPTS: Final = 0
# What the schedule sends: an explicit "act" (scheduled_handler also takes "things" and "dryRun").
EVENT: Final = {"dryRun": False}


@jsii.implements(lambda_.IDestination)
class TopicDestination:
    """The notification topic as an on-failure destination, without the grant aws_lambda_destinations'
    SnsDestination adds (`kms:GenerateDataKey*`, a wildcard action): the function's role already has
    sns:Publish on the topic and kms:GenerateDataKey/kms:Decrypt on its key (Lambda sends the invocation
    record with the function's role)."""

    def __init__(self, topic: sns.ITopic) -> None:
        self.topic = topic

    def bind(
        self, _scope: Construct, _fn: lambda_.IFunction, *, type: lambda_.DestinationType | None = None
    ) -> lambda_.DestinationConfig:
        return lambda_.DestinationConfig(destination=self.topic.topic_arn)


@dataclass(frozen=True, slots=True)
class ScheduledReconcile:
    function: lambda_.Function
    role: iam.Role
    log_group: logs.LogGroup
    rule: events.Rule


def scheduled_reconcile(
    stack: RotatorStack, code: lambda_.Code, schedule: str
) -> ScheduledReconcile:
    name = f"{stack.config.stack_name}{NAME_SUFFIX}"
    role = iam.Role(
        stack,
        "ReconcileRole",
        assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
        description=f"{stack.config.stack_name}: scheduled reconcile function",
    )
    log_group = logs.LogGroup(
        stack, "ReconcileLogs", retention=stack.log_retention, removal_policy=RemovalPolicy.RETAIN
    )
    log_group.grant_write(role)
    stack.grant(
        role,
        reconcile_grants(
            secret_arn=stack.state_key.secret_arn,
            topic_arn=stack.topic.topic_arn,
            topic_key_arn=stack.topic_key.key_arn,
        ),
    )
    function = stack.lambda_function(
        "Reconcile",
        function_name=name,
        description="Certificate rotator: settles things left with two certificates or leftover rotation"
        " state, from evidence of the certificate each device uses",
        code=code,
        handler=HANDLER,
        timeout=TIMEOUT,
        environment={TOPIC_ENV: stack.topic.topic_arn, STATE_KEY_SECRET_ARN_ENV: stack.state_key.secret_arn},
        role=role,
        log_group=log_group,
        layers=[],  # it imports no Powertools (the asset test imports it without)
        reserved_concurrent_executions=RESERVED_CONCURRENCY,
        retry_attempts=RETRY_ATTEMPTS,
        max_event_age=MAX_EVENT_AGE,
        on_failure=TopicDestination(stack.topic),
    )
    rule = events.Rule(
        stack,
        "ReconcileSchedule",
        rule_name=name,
        description="Certificate rotator: run the scheduled reconcile",
        schedule=events.Schedule.expression(schedule),
        targets=[
            targets.LambdaFunction(
                function,
                event=events.RuleTargetInput.from_object(EVENT),
                retry_attempts=2,  # EventBridge's delivery of the invocation, not the run
                max_event_age=MAX_EVENT_AGE,
            )
        ],
    )
    return ScheduledReconcile(function, role, log_group, rule)
