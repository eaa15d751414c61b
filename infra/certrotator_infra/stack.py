"""The certificate rotator's cloud backend as one CloudFormation stack."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aws_cdk import (
    Acknowledgment,
    Duration,
    RemovalPolicy,
    Stack,
    Validations,
)
from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_destinations as destinations
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from aws_cdk import aws_ssm as ssm
from constructs import Construct, IConstruct

from certrotator_infra import announce, failures, job_events, reconcile, renewal, rotation_rules
from certrotator_infra.config import RotatorConfig
from certrotator_infra.lambda_asset import LAMBDA_ARCHITECTURE, LAMBDA_PYTHON_VERSION, powertools_version
from certrotator_infra.outputs import stack_outputs
from certrotator_infra.permissions import ALL, SHADOW_NAME, Function, Grant, IotResource, function_grants
from certrotator_infra.rotation_rules import IOT_SQL_VERSION

# The rotation job document; = certrotator.protocol.JOB_DOCUMENT, compact as the devices compare it.
JOB_DOCUMENT: Final = json.dumps({"operation": "ROTATE_CERTIFICATE"}, separators=(",", ":"))

# Job template: rollout 100/min growing x1.2 per 100 successes up to 300/min, the ceiling the AWS quotas
# a rotation consumes allow (certrotator.ops.aws.quotas; infra/README.md "Rollout and quotas"), as the
# local IoT Core's default template; 5 minutes per execution in progress. PascalCase dicts:
# CloudFormation takes these properties as free-form JSON, and the generated *Property classes would emit
# camelCase keys it rejects.
ROLLOUT_CONFIG: Final[dict[str, Any]] = {
    "ExponentialRolloutRate": {
        "BaseRatePerMinute": 100,
        "IncrementFactor": 1.2,
        "RateIncreaseCriteria": {"NumberOfSucceededThings": 100},
    },
    "MaximumPerMinute": 300,
}
TIMEOUT_CONFIG: Final[dict[str, Any]] = {"InProgressTimeoutInMinutes": 5}

# Timeouts (seed #51: short timeouts failed at fleet scale). Create with a private CA polls
# GetCertificate for up to 60 s on top of the IoT calls; terminal's certificate deletion retries a
# DeleteConflict for about 15 s while a detach propagates.
CREATE_TIMEOUT: Final = Duration.seconds(60)
CREATE_TIMEOUT_PRIVATE_CA: Final = Duration.seconds(90)
COMMIT_TIMEOUT: Final = Duration.seconds(30)
TERMINAL_TIMEOUT: Final = Duration.seconds(30)
MEMORY_MB: Final = 256  # Lambda CPU scales with memory: 256 MB halves the cold start of 128 MB
MAX_EVENT_AGE: Final = Duration.seconds(60)
LOG_RETENTION: Final = logs.RetentionDays.ONE_YEAR

RUNTIME: Final = lambda_.Runtime.PYTHON_3_14
ARCHITECTURE: Final = lambda_.Architecture.ARM_64
HANDLERS: Final = {
    Function.CREATE: "certrotator.backend.aws.lambdas.create_certificate",
    Function.COMMIT: "certrotator.backend.aws.lambdas.commit_certificate",
    Function.TERMINAL: "certrotator.backend.aws.lambdas.job_execution_terminal",
}
DESCRIPTIONS: Final = {
    Function.CREATE: "Certificate rotator: validates a create request and issues the new certificate",
    Function.COMMIT: "Certificate rotator: confirms the device connected with its new certificate",
    Function.TERMINAL: "Certificate rotator: cleans up and notifies when a rotation job execution ends",
}
POWERTOOLS_SERVICE_NAME: Final = "certificate-rotator"
# The public Powertools for AWS Lambda (Python) v3 layer ARNs, one SSM public parameter per
# architecture, Python version and release (published by the Powertools project in every commercial
# region and resolved by CloudFormation at deploy time).
POWERTOOLS_SSM_PARAMETER: Final = "/aws/service/powertools/python/{arch}/python{python}/{version}"


def ack(scope: IConstruct, rule: str, reason: str) -> None:
    """Acknowledge one cdk-nag finding (e.g. "AwsSolutions-IAM5[Resource::*]") on `scope` and below."""
    Validations.of(scope).acknowledge(Acknowledgment(id=rule, reason=reason))


@dataclass(frozen=True, slots=True)
class RotatorFunction:
    function: lambda_.Function
    role: iam.Role
    log_group: logs.LogGroup
    rule: iot.CfnTopicRule


class CertificateRotatorStack(Stack):
    """Three Lambda functions behind three IoT rules, the announcement rule, the rotation job template,
    the notification topic, the rotation-state key, the account's job execution events, and the scheduled
    reconcile when the context asks for it."""

    log_retention: Final = LOG_RETENTION

    def __init__(self, scope: Construct, config: RotatorConfig, *, code_dir: Path, **kwargs: Any) -> None:
        super().__init__(
            scope,
            config.stack_name,
            stack_name=config.stack_name,
            description="Certificate rotator: cloud backend for device certificate and private key rotation"
            " with AWS IoT Jobs",
            **kwargs,
        )
        self.config = config
        name = config.stack_name
        self.ca_arn: str | None = None
        if config.private_ca is not None:
            self.ca_arn = config.private_ca.arn or self.format_arn(
                service="acm-pca", resource="certificate-authority", resource_name=config.private_ca.ca_id
            )

        self.state_key = secretsmanager.Secret(
            self,
            "StateKey",
            description=f"{name}: HMAC key that authenticates the rotation state kept in thing shadows",
            # 64 characters of [A-Za-z0-9]: 381 random bits, well over the 32 bytes the functions require
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=64, exclude_punctuation=True, include_space=False
            ),
            # The key only authenticates in-flight rotation states: losing it fails those safely.
            removal_policy=RemovalPolicy.DESTROY,
        )
        ack(
            self.state_key,
            "AwsSolutions-SMG4",
            "The state key is an HMAC key read once per Lambda container, not a credential for another"
            " service, so there is nothing for a rotation function to rotate it against; rotating it"
            " fails in-flight rotations safely (their state no longer authenticates). Rotate it by hand"
            " between rotation waves if policy demands (infra/README.md).",
        )

        # A key of the stack's own, so that the failure alarm can publish (failures.py).
        self.topic_key = failures.notification_key(self, name)
        self.topic = sns.Topic(
            self,
            "Notifications",
            topic_name=f"{name}Notification",
            display_name="Certificate rotator notifications",
            master_key=self.topic_key,
            enforce_ssl=True,
        )
        self.terminal_failures = failures.failure_queue(self, ack)

        self.powertools_layer = lambda_.LayerVersion.from_layer_version_arn(
            self, "PowertoolsLayer", config.powertools_layer_arn or self._powertools_layer_arn()
        )
        # Where the create, commit and announcement rules log a failed action; the terminal rule queues
        # its failures instead (see `_rule_error_action`).
        self.rule_errors_log, self.rule_errors_role = rotation_rules.rule_errors(
            self,
            name,
            [self.rule_name(r) for r in (Function.CREATE, Function.COMMIT, announce.RULE_SUFFIX)],
            LOG_RETENTION,
        )
        code = lambda_.Code.from_asset(str(code_dir))
        environment = self._environment()
        self.functions = {function: self._function(function, code, environment) for function in Function}
        self.announce_rule = announce.announcement_rule(
            self, self.rule_name(announce.RULE_SUFFIX), IOT_SQL_VERSION, self._log_rule_errors(), ack
        )
        self.reconcile = (
            reconcile.scheduled_reconcile(self, code, config.reconcile_schedule)
            if config.reconcile_schedule
            else None
        )
        self.renewal = renewal.renewal(self, code, name) if config.renewal else None
        self.terminal_failures_alarm = failures.failure_alarm(self, name, self.terminal_failures, self.topic)
        self.failed_rotations_alarm = failures.failed_rotations_alarm(
            self, name, config.metrics_namespace, POWERTOOLS_SERVICE_NAME, self.topic
        )
        publishers = [self.functions[Function.CREATE].role, self.functions[Function.TERMINAL].role]
        if self.reconcile is not None:
            publishers.append(self.reconcile.role)
        if self.renewal is not None:
            publishers.append(self.renewal.role)  # its on-failure records
        failures.restrict_topic(
            self.topic, publishers, [self.terminal_failures_alarm, self.failed_rotations_alarm]
        )
        self.job_template = iot.CfnJobTemplate(
            self,
            "JobTemplate",
            job_template_id=name,
            description="Certificate rotator: rotate the device certificate and private key",
            document=JOB_DOCUMENT,
            job_executions_rollout_config=ROLLOUT_CONFIG,
            timeout_config=TIMEOUT_CONFIG,
        )
        self.job_execution_events = job_events.job_execution_events(self, name, LOG_RETENTION, ack)
        stack_outputs(self)

    # ------------------------------------------------------------------------------------ functions

    def _powertools_layer_arn(self) -> str:
        parameter = POWERTOOLS_SSM_PARAMETER.format(
            arch=LAMBDA_ARCHITECTURE, python=LAMBDA_PYTHON_VERSION, version=powertools_version()
        )
        return ssm.StringParameter.value_for_string_parameter(self, parameter)

    def _environment(self) -> dict[str, str]:
        environment = {
            "SNS_TOPIC_ARN": self.topic.topic_arn,
            "STATE_KEY_SECRET_ARN": self.state_key.secret_arn,
            "SHADOW_NAME": SHADOW_NAME,
            "JOB_DOCUMENT": JOB_DOCUMENT,
            "POWERTOOLS_SERVICE_NAME": POWERTOOLS_SERVICE_NAME,
            "POWERTOOLS_METRICS_NAMESPACE": self.config.metrics_namespace,
        }
        if self.ca_arn is not None:
            environment |= {
                "PCA_CA_ARN": self.ca_arn,
                "PCA_SIGNING_ALGORITHM": self.config.pca_signing_algorithm,
                "PCA_VALIDITY_IN_DAYS": str(self.config.pca_validity_days),
            }
        return environment

    def _function(
        self, function: Function, code: lambda_.Code, environment: dict[str, str]
    ) -> RotatorFunction:
        role = iam.Role(
            self,
            f"{function}Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"{self.config.stack_name}: {function} function",
        )
        log_group = logs.LogGroup(
            self, f"{function}Logs", retention=LOG_RETENTION, removal_policy=RemovalPolicy.RETAIN
        )
        log_group.grant_write(role)
        grants = function_grants(
            function,
            secret_arn=self.state_key.secret_arn,
            topic_arn=self.topic.topic_arn,
            topic_key_arn=self.topic_key.key_arn,
            ca_arn=self.ca_arn,
        )
        self.grant(role, grants)
        timeout = {
            Function.CREATE: CREATE_TIMEOUT if self.ca_arn is None else CREATE_TIMEOUT_PRIVATE_CA,
            Function.COMMIT: COMMIT_TIMEOUT,
            Function.TERMINAL: TERMINAL_TIMEOUT,
        }[function]
        fn = self.lambda_function(
            function,
            function_name=f"{self.config.stack_name}{function}",
            description=DESCRIPTIONS[function],
            code=code,
            handler=HANDLERS[function],
            timeout=timeout,
            environment=environment,
            role=role,
            log_group=log_group,
            layers=[self.powertools_layer],
            **self._async_invocation(function),
        )
        rule = rotation_rules.function_rule(
            self, function, fn, self.rule_name(function), self._rule_error_action(function)
        )
        return RotatorFunction(fn, role, log_group, rule)

    def lambda_function(self, id_prefix: str, **props: Any) -> lambda_.Function:
        """A function on the stack's runtime, architecture, memory size and JSON logging; `props` are the
        rest of lambda_.Function's properties (name, code, handler, timeout, role, ...)."""
        return lambda_.Function(
            self,
            f"{id_prefix}Function",
            runtime=RUNTIME,
            architecture=ARCHITECTURE,
            memory_size=MEMORY_MB,
            logging_format=lambda_.LoggingFormat.JSON,
            application_log_level_v2=lambda_.ApplicationLogLevel.INFO,
            system_log_level_v2=lambda_.SystemLogLevel.WARN,
            **props,
        )

    def _async_invocation(self, function: Function) -> dict[str, Any]:
        """IoT rules invoke asynchronously. A retried or long-queued create/commit would arrive after the
        device stopped waiting (30 s per step) and act on a rotation it already gave up on; the device
        itself retries (it re-runs the job). The terminal event is the only word the backend gets that an
        execution ended: it is retried, and kept in the failure queue if every attempt failed."""
        if function is not Function.TERMINAL:
            return {"retry_attempts": 0, "max_event_age": MAX_EVENT_AGE}
        return {
            "retry_attempts": failures.TERMINAL_RETRY_ATTEMPTS,
            "max_event_age": failures.TERMINAL_MAX_EVENT_AGE,
            "on_failure": destinations.SqsDestination(self.terminal_failures),
        }

    def grant(self, role: iam.Role, grants: list[Grant]) -> None:
        """Add the statements to the role, and acknowledge each cdk-nag wildcard finding once, with the
        reasons of every statement that contributes to it."""
        reasons: dict[str, list[str]] = {}
        for grant in grants:
            resources = [r.arn(self) if isinstance(r, IotResource) else r for r in grant.resources]
            role.add_to_policy(
                iam.PolicyStatement(sid=grant.sid, actions=list(grant.actions), resources=resources)
            )
            if not grant.has_wildcard():
                continue
            if not grant.wildcard_reason:
                raise ValueError(f"grant {grant.sid} has a wildcard resource but no reason for it")
            for resource in grant.resources:
                if resource == ALL:
                    finding = "Resource::*"
                elif isinstance(resource, IotResource) and "*" in resource.path:
                    finding = f"Resource::{resource.nag_name()}"
                else:
                    continue
                reasons.setdefault(finding, []).append(
                    f"{grant.sid} ({', '.join(grant.actions)}): {grant.wildcard_reason}"
                )
        for finding, why in reasons.items():
            ack(role, f"AwsSolutions-IAM5[{finding}]", "; ".join(why))

    # ---------------------------------------------------------------------------------------- rules

    def rule_name(self, suffix: str) -> str:
        """`suffix` is a Function or the announcement rule's. Rule names allow [a-zA-Z0-9_] only; stack
        names may contain hyphens."""
        return f"{self.config.stack_name.replace('-', '_')}{suffix}"

    def _rule_error_action(self, function: Function) -> iot.CfnTopicRule.ActionProperty:
        """Create and commit log a failed action (the device times out and fails the job anyway); the
        terminal rule queues the event, where it raises the alarm and waits to be replayed."""
        if function is Function.TERMINAL:
            return failures.rule_error_action(self, self.rule_name(function), self.terminal_failures)
        return self._log_rule_errors()

    def _log_rule_errors(self) -> iot.CfnTopicRule.ActionProperty:
        return rotation_rules.log_action(self.rule_errors_log, self.rule_errors_role)
