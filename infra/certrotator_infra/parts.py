"""What the per-construct modules (outputs, reconcile, renewal) take from the stack they add to. A
protocol, so that they depend on this leaf and the stack on them, never the other way round."""

from __future__ import annotations

from typing import Any, Protocol

from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs

from certrotator_infra.config import RotatorConfig
from certrotator_infra.permissions import Function, Grant


class RotatorStack(Protocol):
    """The parts of `stack.CertificateRotatorStack` other modules use; it is the construct scope they add
    to as well (an aws_cdk.Stack)."""

    config: RotatorConfig
    log_retention: logs.RetentionDays
    ca_arn: str | None
    state_key: secretsmanager.Secret
    topic_key: kms.Key
    topic: sns.Topic
    terminal_failures: sqs.Queue
    functions: dict[Function, Any]
    job_template: iot.CfnJobTemplate
    reconcile: Any  # reconcile.ScheduledReconcile | None
    renewal: Any  # renewal.Renewal | None

    def lambda_function(self, id_prefix: str, **props: Any) -> lambda_.Function: ...

    def grant(self, role: iam.Role, grants: list[Grant]) -> None: ...

