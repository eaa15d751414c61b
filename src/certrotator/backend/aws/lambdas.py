"""AWS Lambda entry points for the three handlers, and the one place that parses AWS's event dicts.

The IoT rules hand each function a dict (the request's fields plus the broker context the rule's
SELECT adds, or a job execution event); the functions here turn it into the handlers' typed requests.
A request that does not parse is still answered on its `/rejected` topic when its thing is known.

The ports are built on the first invocation and kept for the container's life (clients, endpoint
look-ups, configuration), so a warm invocation makes only the API calls its handler needs.

Configuration (environment):
  SNS_TOPIC_ARN           required; where terminal notifications go
  STATE_KEY_SECRET_ARN    required; Secrets Manager secret whose SecretString (at least 32 bytes as
                          UTF-8) is the HMAC key authenticating the rotation state in the shadow.
                          The functions need secretsmanager:GetSecretValue on it (and kms:Decrypt if
                          it is encrypted with a customer-managed key); it is read once per container.
  SHADOW_NAME             named shadow keeping the rotation state (default AWSLabsCertificateRotator)
  PCA_CA_ARN              empty: AWS IoT issues certificates; else this AWS Private CA does
  PCA_SIGNING_ALGORITHM   the private CA's signing algorithm (default SHA256WITHRSA)
  PCA_VALIDITY_IN_DAYS    validity of private-CA certificates (default 7)
  JOB_DOCUMENT            optional consistency check, see `BackendConfig`
  IOT_DATA_ENDPOINT / IOT_JOBS_ENDPOINT   optional data-plane endpoints (else DescribeEndpoint)
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit

from certrotator import crypto, protocol
from certrotator.backend import handlers
from certrotator.backend.aws.adapters import (
    DEFAULT_SHADOW_NAME,
    STATE_KEY_SECRET_ARN_ENV,
    IotDataPublisher,
    IotIssuer,
    IotJobDocuments,
    IotJobsData,
    IotRegistry,
    PrivateCaIssuer,
    SecretStateKey,
    ShadowStateStore,
    SnsNotifier,
)
from certrotator.backend.aws.clients import Clients, get_clients
from certrotator.backend.ports import Issuer, Ports
from certrotator.backend.rotation_jobs import RotationJobs
from certrotator.compat import StrEnum
from certrotator.protocol import (
    UNSUCCESSFUL_EXECUTION_STATUSES,
    BrokerContext,
    CommitCertificateRequest,
    CreateCertificateRequest,
    JobExecutionEvent,
    JobExecutionStatus,
    ProtocolError,
    TopicKind,
    validate_thing_name,
)

SERVICE: Final = os.environ.get("POWERTOOLS_SERVICE_NAME") or "certificate-rotator"
logger = Logger(service=SERVICE)
# The namespace is the stack's MetricsNamespace context (POWERTOOLS_METRICS_NAMESPACE); every metric
# carries the `service` dimension, which the stack's alarm names.
metrics = Metrics(
    namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or "CertificateRotator", service=SERVICE
)


class ConfigError(ValueError):
    """The function's environment is wrong; the text names the variable."""


_SHADOW_NAME_RE: Final = re.compile(r"^[a-zA-Z0-9:_-]{1,64}$")
_SNS_ARN_RE: Final = re.compile(r"^arn:[a-z-]+:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?$")
_SECRET_ARN_RE: Final = re.compile(
    r"^arn:[a-z-]+:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]+$"
)
_PCA_ARN_RE: Final = re.compile(r"^arn:[a-z-]+:acm-pca:[a-z0-9-]+:\d{12}:certificate-authority/[0-9a-f-]+$")
_LAMBDA_ARN_RE: Final = re.compile(
    r"^arn:(?P<partition>[a-z-]+):lambda:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    sns_topic_arn: str
    state_key_secret_arn: str
    shadow_name: str = DEFAULT_SHADOW_NAME
    pca_ca_arn: str | None = None
    pca_signing_algorithm: crypto.CaSigningAlgorithm = crypto.CaSigningAlgorithm.SHA256WITHRSA
    pca_validity_days: int = 7

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BackendConfig:
        def get(name: str) -> str:
            return env.get(name, "").strip()

        topic = get("SNS_TOPIC_ARN")
        if not _SNS_ARN_RE.match(topic):
            raise ConfigError(f"SNS_TOPIC_ARN must be an SNS topic ARN, got {topic!r}")
        secret_arn = get(STATE_KEY_SECRET_ARN_ENV)
        if not secret_arn:
            raise ConfigError(
                f"{STATE_KEY_SECRET_ARN_ENV} is not set: it must be the ARN of the Secrets Manager secret"
                " holding the key that authenticates the rotation state"
            )
        if not _SECRET_ARN_RE.match(secret_arn):
            raise ConfigError(
                f"{STATE_KEY_SECRET_ARN_ENV} must be a Secrets Manager secret ARN, got {secret_arn!r}"
            )
        shadow = get("SHADOW_NAME") or DEFAULT_SHADOW_NAME
        if not _SHADOW_NAME_RE.match(shadow):
            raise ConfigError(f"SHADOW_NAME must be 1-64 of [a-zA-Z0-9:_-], got {shadow!r}")
        ca_arn = get("PCA_CA_ARN") or None
        if ca_arn is not None and not _PCA_ARN_RE.match(ca_arn):
            raise ConfigError(f"PCA_CA_ARN must be empty or an AWS Private CA ARN, got {ca_arn!r}")
        try:
            algorithm = crypto.parse_ca_signing_algorithm(get("PCA_SIGNING_ALGORITHM") or "SHA256WITHRSA")
        except crypto.CryptoError as exc:
            raise ConfigError(f"PCA_SIGNING_ALGORITHM: {exc}") from None
        days_text = get("PCA_VALIDITY_IN_DAYS") or "7"
        if not days_text.isdigit() or int(days_text) < 1:
            raise ConfigError(
                f"PCA_VALIDITY_IN_DAYS must be a positive whole number of days, got {days_text!r}"
            )
        _check_job_document(get("JOB_DOCUMENT"))
        return cls(topic, secret_arn, shadow, ca_arn, algorithm, int(days_text))


def _check_job_document(text: str) -> None:
    """JOB_DOCUMENT is not an override: the device agent and the handlers recognise a rotation by the
    protocol's fixed document, so a different one would only make every rotation fail. The variable
    lets the deployment state the document its job template uses, and a mismatch stops the function
    at its first invocation instead of failing rotations one by one.
    """
    if not text:
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"JOB_DOCUMENT is not valid JSON ({exc})") from None
    if not protocol.is_rotation_document(document):
        expected = json.dumps(protocol.JOB_DOCUMENT, separators=(",", ":"))
        raise ConfigError(f"JOB_DOCUMENT must be the rotation document {expected}, got {text}")


@dataclass(frozen=True, slots=True)
class FunctionIdentity:
    """Partition, region and account of the running function, from its ARN."""

    partition: str
    region: str
    account: str

    @classmethod
    def from_context(cls, context: Any) -> FunctionIdentity:
        arn = str(getattr(context, "invoked_function_arn", ""))
        match = _LAMBDA_ARN_RE.match(arn)
        if match is None:
            raise ConfigError(f"context.invoked_function_arn is not a Lambda function ARN: {arn!r}")
        return cls(match["partition"], match["region"], match["account"])


def build_ports(config: BackendConfig, identity: FunctionIdentity, clients: Clients) -> Ports:
    """The AWS adapters. Clients, endpoint look-ups and the state key are fetched when first needed."""
    issuer: Issuer
    if config.pca_ca_arn is None:
        issuer = IotIssuer(clients)
    else:
        issuer = PrivateCaIssuer(
            clients,
            ca_arn=config.pca_ca_arn,
            signing_algorithm=config.pca_signing_algorithm,
            validity_days=config.pca_validity_days,
        )
    return Ports(
        registry=IotRegistry(clients, account=identity.account, partition=identity.partition),
        jobs=IotJobsData(clients),
        issuer=issuer,
        state=ShadowStateStore(
            clients, key=SecretStateKey(clients, config.state_key_secret_arn), shadow_name=config.shadow_name
        ),
        publisher=IotDataPublisher(clients),
        notifier=SnsNotifier(clients, config.sns_topic_arn),
    )


@dataclass(frozen=True, slots=True)
class Container:
    """What a Lambda container keeps between invocations."""

    ports: Ports
    rotation_jobs: RotationJobs  # job id -> rotation job or not (the terminal function's filter)


_container: Container | None = None


def container(context: Any) -> Container:
    """The container's ports and caches, built on the first invocation.

    The state key is fetched (and checked) here, once per container: a missing or unusable secret
    fails the first invocation with a ConfigError instead of surfacing in the middle of a handler
    (where create would already have issued a certificate and would turn it into a device rejection).
    """
    global _container  # noqa: PLW0603 -- the per-container cache is the point
    if _container is None:
        config = BackendConfig.from_env(os.environ)
        identity = FunctionIdentity.from_context(context)
        _configure_logging()
        clients = get_clients(identity.region)
        _check_state_key(clients, config.state_key_secret_arn)
        _container = Container(
            build_ports(config, identity, clients), RotationJobs(IotJobDocuments(clients).document)
        )
    return _container


def container_ports(context: Any) -> Ports:
    """The container's ports (see `container`)."""
    return container(context).ports


def _check_state_key(clients: Clients, secret_arn: str) -> None:
    """Fetch the state key into the clients' cache and check it. API errors (access denied, no such
    secret, throttling) propagate unchanged: their text names GetSecretValue and the secret."""
    try:
        SecretStateKey(clients, secret_arn)()
    except ValueError as exc:
        raise ConfigError(f"{STATE_KEY_SECRET_ARN_ENV} ({secret_arn}): {exc}") from None


def reset_container() -> None:
    """Forget the cached ports and caches (tests: a new environment or moto mock)."""
    global _container  # noqa: PLW0603
    _container = None


def _configure_logging() -> None:
    # The handlers log with the standard library under "certrotator"; give those records the
    # powertools handler and formatter so they come out as structured JSON with the Lambda context.
    logging.getLogger("certrotator")
    copy_config_to_registered_loggers(source_logger=logger, include={"certrotator"})


# Metrics (EMF, namespace POWERTOOLS_METRICS_NAMESPACE, dimension `service`): one count per handler
# outcome, the outcome parsed into an enum first (never the handler's free text). Each metric is also
# published with the dimensions Handler and Outcome: the same counters the local IoT Core exports to
# Prometheus (certrotator_rotations_total{outcome}, certrotator_requests_total{handler,outcome}).
# A job execution that ends REJECTED, CANCELED or REMOVED is handled as FAILED (decisions.terminal_plan)
# and counted as RotationsFailed with its own Outcome; "Rejections" are the backend's own refusals of
# create/commit requests. Outcomes that are no rotation's end (ignored, duplicate) count nothing.
# Handler time is Lambda's own Duration metric (AWS/Lambda, per function).
HANDLER_DIMENSION: Final = "Handler"
OUTCOME_DIMENSION: Final = "Outcome"


class RequestOutcome(StrEnum):
    """A create or commit request's outcome (= certrotator.local.metrics.RequestOutcome)."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


ROTATION_METRICS: Final[dict[JobExecutionStatus, str]] = {
    **{status: "RotationsFailed" for status in UNSUCCESSFUL_EXECUTION_STATUSES},
    JobExecutionStatus.SUCCEEDED: "RotationsSucceeded",
    JobExecutionStatus.TIMED_OUT: "RotationsTimedOut",
}
REQUEST_METRICS: Final[dict[tuple[str, RequestOutcome], str]] = {
    (handlers.CREATE, RequestOutcome.ACCEPTED): "RotationsCreated",
    (handlers.COMMIT, RequestOutcome.ACCEPTED): "RotationsCommitted",
    (handlers.CREATE, RequestOutcome.REJECTED): "Rejections",
    (handlers.COMMIT, RequestOutcome.REJECTED): "Rejections",
}
# What the stack's alarm watches: a rotation that did not end in SUCCEEDED.
FAILED_ROTATION_METRICS: Final = ("RotationsFailed", "RotationsTimedOut")


def outcome_metric(result: handlers.HandlerResult) -> tuple[str, str] | None:
    """(metric name, Outcome dimension) for a handler's result; None if it counts nothing."""
    if result.handler == handlers.TERMINAL:
        try:
            status = JobExecutionStatus(result.outcome.upper())  # the terminal outcome is the status
        except ValueError:
            return None
        name = ROTATION_METRICS.get(status)
        return None if name is None else (name, status.value)
    try:
        outcome = RequestOutcome(result.outcome)
    except ValueError:
        return None
    request = REQUEST_METRICS.get((result.handler, outcome))
    return None if request is None else (request, outcome.value)


# ------------------------------------------------------------------------------- event dicts -> typed


Request = TypeVar("Request", CreateCertificateRequest, CommitCertificateRequest)


def _reply_thing(event: dict[str, Any]) -> str | None:
    """The thing a malformed request came from, if the rule's thingName is usable for a reply."""
    try:
        return validate_thing_name(str(event.get("thingName", "")))
    except ProtocolError:
        return None


def _request_event(
    event: dict[str, Any],
    ports: Ports,
    kind: TopicKind,
    parse: Callable[[dict[str, Any]], Request],
    handle: Callable[[BrokerContext, Request, Ports], handlers.HandlerResult],
) -> handlers.HandlerResult:
    """A create or commit request as its rule selects it: the broker's context and the request parsed
    from the event and handled, or the device told on `/rejected` why it did not parse."""
    try:
        context = BrokerContext.from_event(event)
        request = parse(event)
    except ProtocolError as exc:
        return handlers.reject_malformed_request(kind, _reply_thing(event), str(exc), ports)
    return handle(context, request, ports)


def create_certificate_event(event: dict[str, Any], ports: Ports) -> handlers.HandlerResult:
    return _request_event(
        event, ports, TopicKind.CREATE, CreateCertificateRequest.parse, handlers.handle_create_certificate
    )


def commit_certificate_event(event: dict[str, Any], ports: Ports) -> handlers.HandlerResult:
    return _request_event(
        event, ports, TopicKind.COMMIT, CommitCertificateRequest.parse, handlers.handle_commit_certificate
    )


def job_execution_terminal_event(
    event: dict[str, Any], ports: Ports, rotation_jobs: RotationJobs | None = None
) -> handlers.HandlerResult:
    try:
        execution = JobExecutionEvent.parse(event)
    except ProtocolError as exc:
        return handlers.ignore_malformed_event(str(exc))
    return handlers.handle_job_execution_terminal(execution, ports, rotation_jobs)


def _terminal_event(event: dict[str, Any], parts: Container) -> handlers.HandlerResult:
    return job_execution_terminal_event(event, parts.ports, parts.rotation_jobs)


def _run(
    handler: Callable[[dict[str, Any], Container], handlers.HandlerResult],
    event: dict[str, Any],
    context: Any,
) -> dict[str, Any]:
    # Exceptions propagate: Lambda then retries an asynchronous invocation (the terminal function has
    # retries and an on-failure queue; create and commit have none, the device's timeouts cover them).
    result = handler(event, container(context))
    counted = outcome_metric(result)
    if counted is not None:
        name, outcome = counted
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)
        metrics.add_dimensions(**{HANDLER_DIMENSION: result.handler, OUTCOME_DIMENSION: outcome})
    return result.to_dict()


@metrics.log_metrics
@logger.inject_lambda_context
def create_certificate(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return _run(lambda e, parts: create_certificate_event(e, parts.ports), event, context)


@metrics.log_metrics
@logger.inject_lambda_context
def commit_certificate(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return _run(lambda e, parts: commit_certificate_event(e, parts.ports), event, context)


@metrics.log_metrics
@logger.inject_lambda_context
def job_execution_terminal(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return _run(_terminal_event, event, context)
