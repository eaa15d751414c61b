"""The account's JOB_EXECUTION events, turned on by a custom resource: without them the terminal rule never
fires and old certificates are never cleaned up (seed #10)."""

from __future__ import annotations

from collections.abc import Callable

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import custom_resources as cr
from constructs import IConstruct

Acknowledge = Callable[[IConstruct, str, str], None]


def job_execution_events(
    stack: Stack, stack_name: str, retention: logs.RetentionDays, acknowledge: Acknowledge
) -> cr.AwsCustomResource:
    """Turn on JOB_EXECUTION events in the account (off by default). Left on when the stack is deleted:
    other applications in the account may rely on them."""
    role = iam.Role(
        stack,
        "JobExecutionEventsRole",
        assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
        description=f"{stack_name}: enables job execution events (custom resource)",
    )
    log_group = logs.LogGroup(
        stack, "JobExecutionEventsLogs", retention=retention, removal_policy=RemovalPolicy.DESTROY
    )
    log_group.grant_write(role)
    call = cr.AwsSdkCall(
        service="@aws-sdk/client-iot",
        action="UpdateEventConfigurations",
        parameters={"eventConfigurations": {"JOB_EXECUTION": {"Enabled": True}}},
        physical_resource_id=cr.PhysicalResourceId.of(f"{stack_name}-job-execution-events"),
    )
    events = cr.AwsCustomResource(
        stack,
        "JobExecutionEvents",
        on_create=call,
        on_update=call,
        policy=cr.AwsCustomResourcePolicy.from_statements(
            [iam.PolicyStatement(actions=["iot:UpdateEventConfigurations"], resources=["*"])]
        ),
        role=role,
        log_group=log_group,
        install_latest_aws_sdk=False,
        timeout=Duration.minutes(2),
    )
    acknowledge(
        events,
        "AwsSolutions-IAM5[Resource::*]",
        "iot:UpdateEventConfigurations supports no resource-level permissions (Service Authorization"
        " Reference): the event configuration is account-wide. It is the custom resource's only action.",
    )
    return events
