"""The stack's outputs: what an operator or `certrotator aws` reads after a deployment."""

from __future__ import annotations

from aws_cdk import CfnOutput

from certrotator_infra.parts import RotatorStack


def stack_outputs(stack: RotatorStack) -> None:
    CfnOutput(
        stack,
        "NotificationTopicArn",
        value=stack.topic.topic_arn,
        description="Subscribe for failed rotations",
    )
    CfnOutput(
        stack,
        "JobTemplateArn",
        value=stack.job_template.attr_arn,
        description="Create rotation jobs from it",
    )
    CfnOutput(
        stack,
        "CertificateIssuer",
        value=stack.ca_arn or "AWS IoT",
        description="What issues rotated certificates: AWS IoT, or this AWS Private CA",
    )
    CfnOutput(
        stack, "StateKeySecretArn", value=stack.state_key.secret_arn, description="Rotation-state HMAC key"
    )
    CfnOutput(
        stack,
        "TerminalFailureQueueUrl",
        value=stack.terminal_failures.queue_url,
        description="Terminal events that could not be handled; replay them (infra/README.md)",
    )
    for function, parts in stack.functions.items():
        CfnOutput(stack, f"{function}FunctionName", value=parts.function.function_name)
    if stack.renewal is not None:
        CfnOutput(
            stack,
            "RenewalFunctionName",
            value=stack.renewal.function.function_name,
            description='The renewal function; invoke it with {"dryRun": true} to see what it would do',
        )
    if stack.renewal is not None and stack.renewal.audit_topic is not None and stack.renewal.audit_role:
        CfnOutput(
            stack,
            "AuditNotificationTopicArn",
            value=stack.renewal.audit_topic.topic_arn,
            description="Set as the SNS target of the account's Device Defender audit configuration",
        )
        CfnOutput(
            stack,
            "AuditNotificationRoleArn",
            value=stack.renewal.audit_role.role_arn,
            description="The role Device Defender publishes audit notifications with",
        )
    if stack.reconcile is not None:
        CfnOutput(
            stack,
            "ReconcileFunctionName",
            value=stack.reconcile.function.function_name,
            description='The scheduled reconcile; invoke it with {"dryRun": true} to see what it would do',
        )
