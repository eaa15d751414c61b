"""At-least-once terminal handling: where a job execution's end goes when it could not be handled, and
how the operator hears of it.

The terminal event is the only word the backend gets that an execution ended (an old certificate to
delete, a new one to withdraw). The terminal function is retried by Lambda (`TERMINAL_RETRY_ATTEMPTS`,
for up to `TERMINAL_MAX_EVENT_AGE`); an event every attempt failed on, or one the terminal rule could not
deliver at all, lands in the failure queue; the queue's depth raises an alarm on the notification topic.
The handler is idempotent, so a queued event can simply be replayed (infra/README.md).

The notification topic is encrypted with a key of the stack's own because CloudWatch alarms cannot
publish to a topic under the AWS managed key `alias/aws/sns` (its key policy cannot be changed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from aws_cdk import Aws, Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import IConstruct

Acknowledge = Callable[[IConstruct, str, str], None]

# Lambda's asynchronous retries: at most 2, about a minute then two apart; a throttled invocation, or
# one that could not start, is retried for up to the event age, which is at most 6 hours.
TERMINAL_RETRY_ATTEMPTS: Final = 2
TERMINAL_MAX_EVENT_AGE: Final = Duration.hours(6)
FAILURE_RETENTION: Final = Duration.days(14)  # SQS's maximum: time for an operator to replay
ALARM_PERIOD: Final = Duration.minutes(5)  # SQS publishes its queue metrics every 5 minutes
CLOUDWATCH: Final = "cloudwatch.amazonaws.com"


def notification_key(stack: Stack, name: str) -> kms.Key:
    key = kms.Key(
        stack,
        "NotificationKey",
        description=f"{name}: encrypts the notification topic",
        enable_key_rotation=True,
        removal_policy=RemovalPolicy.DESTROY,
    )
    key.add_to_resource_policy(
        iam.PolicyStatement(
            sid="CloudWatchAlarmsPublish",
            principals=[iam.ServicePrincipal(CLOUDWATCH)],
            actions=["kms:GenerateDataKey", "kms:Decrypt"],
            resources=["*"],  # in a key policy, "*" is this key
            conditions={"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}},
        )
    )
    return key


def failure_queue(stack: Stack, acknowledge: Acknowledge) -> sqs.Queue:
    """Kept 14 days, encrypted, TLS only: the terminal function's on-failure destination and the
    terminal rule's error action."""
    queue = sqs.Queue(
        stack,
        "TerminalFailures",
        encryption=sqs.QueueEncryption.SQS_MANAGED,
        enforce_ssl=True,
        retention_period=FAILURE_RETENTION,
    )
    acknowledge(
        queue,
        "AwsSolutions-SQS3",
        "This queue is itself the dead-letter queue of the terminal function (its asynchronous"
        " on-failure destination and its rule's error action). Nothing consumes it automatically: an"
        " operator reads and replays its messages, and its depth raises an alarm, so a dead-letter"
        " queue behind it would never receive anything.",
    )
    return queue


def failure_alarm(stack: Stack, name: str, queue: sqs.Queue, topic: sns.Topic) -> cloudwatch.Alarm:
    """Any message in the failure queue (ApproximateNumberOfMessagesVisible > 0) notifies the topic."""
    alarm = cloudwatch.Alarm(
        stack,
        "TerminalFailuresAlarm",
        alarm_name=f"{name}TerminalFailures",
        alarm_description="Certificate rotator: the end of a job execution could not be handled (after"
        " retries); its event waits in the failure queue. Replay it, or run certrotator reconcile.",
        metric=queue.metric_approximate_number_of_messages_visible(
            period=ALARM_PERIOD, statistic=cloudwatch.Stats.MAXIMUM
        ),
        threshold=0,
        comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        evaluation_periods=1,
        treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
    )
    alarm.add_alarm_action(cloudwatch_actions.SnsAction(topic))
    return alarm


def restrict_topic(topic: sns.Topic, publishers: list[iam.Role], alarms: list[cloudwatch.Alarm]) -> None:
    """Only the given roles (terminal, and create when it withdraws a certificate, and the scheduled
    functions' failure records) and the stack's alarms (failure queue, failed rotations) may publish. The roles' own policies grant sns:Publish; the topic policy denies everyone else, which
    no identity policy in the account can override. (No Allow naming the roles: a resource policy naming
    a role created in the same deployment can fail IAM principal validation while the role propagates.)
    CloudWatch is a service principal, outside the account: it needs the Allow, for this alarm only, and
    is exempt from the Deny (a service's request carries aws:PrincipalServiceName, an IAM principal's
    does not, and a missing key makes StringNotEquals true). CloudWatch needs the Allow for these alarms
    only."""
    topic.add_to_resource_policy(
        iam.PolicyStatement(
            sid="OnlyTheRotatorPublishes",
            effect=iam.Effect.DENY,
            principals=[iam.AnyPrincipal()],
            actions=["sns:Publish"],
            resources=[topic.topic_arn],
            conditions={
                "ArnNotEquals": {"aws:PrincipalArn": [role.role_arn for role in publishers]},
                "StringNotEquals": {"aws:PrincipalServiceName": CLOUDWATCH},
            },
        )
    )
    topic.add_to_resource_policy(
        iam.PolicyStatement(
            sid="TheAlarmsPublish",
            principals=[iam.ServicePrincipal(CLOUDWATCH)],
            actions=["sns:Publish"],
            resources=[topic.topic_arn],
            conditions={
                "StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID},
                "ArnEquals": {"aws:SourceArn": [alarm.alarm_arn for alarm in alarms]},
            },
        )
    )


def rule_error_action(stack: Stack, rule_name: str, queue: sqs.Queue) -> iot.CfnTopicRule.ActionProperty:
    """The terminal rule sends an event it could not deliver to the failure queue (raw JSON: the rule's
    error message with the original payload in `base64OriginalPayload`), with a role only that rule
    may assume."""
    role = iam.Role(
        stack,
        "TerminalRuleErrorsRole",
        assumed_by=iam.ServicePrincipal(
            "iot.amazonaws.com",
            conditions={
                "StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID},
                "ArnEquals": {
                    "aws:SourceArn": stack.format_arn(service="iot", resource="rule", resource_name=rule_name)
                },
            },
        ),
        description=f"{stack.stack_name}: the terminal rule queues the events it failed to deliver",
    )
    queue.grant_send_messages(role)
    return iot.CfnTopicRule.ActionProperty(
        sqs=iot.CfnTopicRule.SqsActionProperty(
            queue_url=queue.queue_url, role_arn=role.role_arn, use_base64=False
        )
    )


# The terminal function's metrics (certrotator.backend.aws.lambdas.FAILED_ROTATION_METRICS) that mean a
# rotation did not end in SUCCEEDED, summed per period.
FAILED_ROTATION_METRICS: Final = ("RotationsFailed", "RotationsTimedOut")
ROTATION_ALARM_PERIOD: Final = Duration.minutes(5)


def failed_rotations_alarm(
    stack: Stack, name: str, namespace: str, service: str, topic: sns.Topic
) -> cloudwatch.Alarm:
    """Any failed or timed-out rotation in a 5-minute period notifies the topic (once, when the alarm
    goes into ALARM; the terminal function's own notification names the thing and the reason)."""
    using = {
        f"m{i}": cloudwatch.Metric(
            namespace=namespace,
            metric_name=metric,
            dimensions_map={"service": service},
            statistic=cloudwatch.Stats.SUM,
            period=ROTATION_ALARM_PERIOD,
        )
        for i, metric in enumerate(FAILED_ROTATION_METRICS)
    }
    alarm = cloudwatch.Alarm(
        stack,
        "FailedRotationsAlarm",
        alarm_name=f"{name}FailedRotations",
        alarm_description="Certificate rotator: a rotation job execution ended FAILED, TIMED_OUT, REJECTED,"
        " CANCELED or REMOVED (the topic's notifications name the things; `certrotator aws describe-job`"
        " lists the reasons).",
        # FILL: a period with failures but no timeouts (or the other way round) still adds up
        metric=cloudwatch.MathExpression(
            expression=" + ".join(f"FILL({m}, 0)" for m in using),
            using_metrics=using,
            label="failed or timed-out rotations",
            period=ROTATION_ALARM_PERIOD,
        ),
        threshold=0,
        comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        evaluation_periods=1,
        treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
    )
    alarm.add_alarm_action(cloudwatch_actions.SnsAction(topic))
    return alarm
