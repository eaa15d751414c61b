"""The stack's configuration: CDK context variables, parsed and checked before anything is built.

Every value a user can set with `cdk deploy -c NAME=VALUE` (or in cdk.json) passes through
`RotatorConfig.from_context`; a wrong value stops synthesis with a `ContextError` that names the
variable, says what it got and what it accepts. Values given with `-c` arrive as strings, values
from cdk.json with their JSON type, so both are accepted where they mean the same thing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

# The context keys (cdk.json and `-c`).
STACK_NAME_KEY: Final = "StackName"
PCA_CA_ID_KEY: Final = "PcaCaId"
PCA_VALIDITY_KEY: Final = "PcaValidityInDays"
PCA_SIGNING_ALGORITHM_KEY: Final = "PcaSigningAlgorithm"
POWERTOOLS_LAYER_ARN_KEY: Final = "PowertoolsLayerArn"
LAMBDA_DEPENDENCIES_KEY: Final = "LambdaDependenciesDir"
RECONCILE_SCHEDULE_KEY: Final = "ReconcileSchedule"
RENEWAL_SCHEDULE_KEY: Final = "RenewalSchedule"
RENEWAL_POLICY_KEY: Final = "RenewalPolicy"
RENEWAL_AUDIT_KEY: Final = "RenewalAuditFindings"
METRICS_NAMESPACE_KEY: Final = "MetricsNamespace"

DEFAULT_STACK_NAME: Final = "AWSLabsCertificateRotator"
DEFAULT_PCA_VALIDITY_DAYS: Final = 7
DEFAULT_PCA_SIGNING_ALGORITHM: Final = "SHA256WITHRSA"
DEFAULT_LAMBDA_DEPENDENCIES_DIR: Final = "build/lambda-deps"
DEFAULT_RENEWAL_POLICY: Final = "renew-before=30d"
DEFAULT_METRICS_NAMESPACE: Final = "CertificateRotator"

# AWS Private CA's IssueCertificate signing algorithms; the same six as
# certrotator.crypto.CaSigningAlgorithm (a test keeps the two lists equal).
PCA_SIGNING_ALGORITHMS: Final = (
    "SHA256WITHECDSA",
    "SHA384WITHECDSA",
    "SHA512WITHECDSA",
    "SHA256WITHRSA",
    "SHA384WITHRSA",
    "SHA512WITHRSA",
)

# Function names are "<stack name><role>" and must fit Lambda's 64 characters; the longest role is
# "JobExecutionTerminal" (20), so a stack name may have at most 44.
MAX_STACK_NAME_LENGTH: Final = 44
# Private CA validity: at least a day; at most 100 years, far beyond any sane device certificate
# (the CA itself caps it at its own expiry, which IssueCertificate reports at run time).
MAX_PCA_VALIDITY_DAYS: Final = 36_500

_STACK_NAME_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")
_CA_ID_RE: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_CA_ARN_RE: Final = re.compile(
    r"^arn:aws(-[a-z]+)*:acm-pca:[a-z]{2}(-[a-z]+)+-\d:\d{12}:certificate-authority/"
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
)
# EventBridge schedule expressions (rate and cron, as EventBridge rules take them). A scheduled reconcile
# visits every thing of the account (about seven API calls each) and acts only on rotation states older
# than its grace period, and one run may take up to the function's 15 minutes: runs at most hourly.
_RATE_RE: Final = re.compile(r"^rate\(([0-9]+) (minutes?|hours?|days?)\)$")
_RATE_UNIT_MINUTES: Final = {"minute": 1, "hour": 60, "day": 24 * 60}
MIN_RECONCILE_INTERVAL_MINUTES: Final = 60
_CRON_RE: Final = re.compile(r"^cron\((.*)\)$")
_CRON_FIELD_RE: Final = re.compile(r"^[0-9A-Za-z*?,/#-]+$")
# CloudWatch namespaces: 1-255 of alphanumerics and . - _ / # : (space too, left out here), not "AWS/...".
_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9._/#:-]{1,255}$")
_LAYER_ARN_RE: Final = re.compile(
    r"^arn:aws(-[a-z]+)*:lambda:[a-z]{2}(-[a-z]+)+-\d:\d{12}:layer:[A-Za-z0-9_-]{1,140}:[1-9]\d*$"
)


class ContextError(ValueError):
    """A context variable has a value the stack cannot use; the text says which and why."""


@dataclass(frozen=True, slots=True)
class PrivateCa:
    """The AWS Private CA that issues device certificates: by id (same account and region as the
    stack) or by full ARN (any account or region the CA is shared with)."""

    ca_id: str
    arn: str | None = None  # None: build it from the stack's partition, region and account


@dataclass(frozen=True, slots=True)
class RotatorConfig:
    stack_name: str = DEFAULT_STACK_NAME
    private_ca: PrivateCa | None = None  # None: AWS IoT issues the certificates
    pca_validity_days: int = DEFAULT_PCA_VALIDITY_DAYS
    pca_signing_algorithm: str = DEFAULT_PCA_SIGNING_ALGORITHM
    powertools_layer_arn: str | None = None  # None: the public layer, looked up at deploy time
    lambda_dependencies_dir: str = DEFAULT_LAMBDA_DEPENDENCIES_DIR
    reconcile_schedule: str | None = None  # None: no scheduled reconcile (the default)
    renewal_schedule: str | None = None  # None: no scheduled renewal (the default)
    renewal_policy: str = DEFAULT_RENEWAL_POLICY  # the `local up --schedule` spec, without every
    renewal_audit_findings: bool = False  # Device Defender's expiring-certificate findings trigger renewal
    metrics_namespace: str = DEFAULT_METRICS_NAMESPACE

    @property
    def renewal(self) -> bool:
        """Whether the stack has the renewal function (a schedule, the audit trigger, or both)."""
        return self.renewal_schedule is not None or self.renewal_audit_findings

    @classmethod
    def from_context(cls, get: Callable[[str], Any]) -> RotatorConfig:
        """Read and check every context variable; `get` is e.g. `app.node.try_get_context`."""
        return cls(
            stack_name=parse_stack_name(get(STACK_NAME_KEY)),
            private_ca=parse_private_ca(get(PCA_CA_ID_KEY)),
            pca_validity_days=parse_validity_days(get(PCA_VALIDITY_KEY)),
            pca_signing_algorithm=parse_signing_algorithm(get(PCA_SIGNING_ALGORITHM_KEY)),
            powertools_layer_arn=parse_layer_arn(get(POWERTOOLS_LAYER_ARN_KEY)),
            lambda_dependencies_dir=_text(get(LAMBDA_DEPENDENCIES_KEY), LAMBDA_DEPENDENCIES_KEY)
            or DEFAULT_LAMBDA_DEPENDENCIES_DIR,
            reconcile_schedule=parse_reconcile_schedule(get(RECONCILE_SCHEDULE_KEY)),
            renewal_schedule=parse_schedule(
                get(RENEWAL_SCHEDULE_KEY), RENEWAL_SCHEDULE_KEY, "scheduled renewal"
            ),
            renewal_policy=parse_renewal_policy(get(RENEWAL_POLICY_KEY)),
            renewal_audit_findings=parse_flag(get(RENEWAL_AUDIT_KEY), RENEWAL_AUDIT_KEY),
            metrics_namespace=parse_metrics_namespace(get(METRICS_NAMESPACE_KEY)),
        )


def _text(value: Any, key: str) -> str:
    """A context value that must be a string (or absent); surrounding whitespace is dropped."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ContextError(f"context variable {key} must be a string, got {value!r} ({type(value).__name__})")
    return value.strip()


def parse_stack_name(value: Any) -> str:
    name = _text(value, STACK_NAME_KEY) or DEFAULT_STACK_NAME
    if not _STACK_NAME_RE.match(name) or len(name) > MAX_STACK_NAME_LENGTH:
        raise ContextError(
            f"context variable {STACK_NAME_KEY} must start with a letter, contain only letters, digits and"
            f" hyphens, and be at most {MAX_STACK_NAME_LENGTH} characters long (it prefixes the Lambda"
            f" function names); got {name!r}"
        )
    return name


def parse_private_ca(value: Any) -> PrivateCa | None:
    text = _text(value, PCA_CA_ID_KEY)
    if not text:
        return None
    if _CA_ID_RE.match(text):
        return PrivateCa(ca_id=text)
    if _CA_ARN_RE.match(text):
        return PrivateCa(ca_id=text.rsplit("/", 1)[1], arn=text)
    raise ContextError(
        f"context variable {PCA_CA_ID_KEY} must be empty (AWS IoT issues the certificates), an AWS Private CA"
        " id such as 0123abcd-4567-89ef-0123-456789abcdef, or a CA ARN such as"
        " arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/0123abcd-4567-89ef-0123-456789abcdef;"
        f" got {text!r}"
    )


def parse_validity_days(value: Any) -> int:
    days: int | None = None
    if value is None or value == "":
        days = DEFAULT_PCA_VALIDITY_DAYS
    elif isinstance(value, int) and not isinstance(value, bool):
        days = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        days = int(value.strip())
    if days is None or not 1 <= days <= MAX_PCA_VALIDITY_DAYS:
        raise ContextError(
            f"context variable {PCA_VALIDITY_KEY} must be a whole number of days from 1 to"
            f" {MAX_PCA_VALIDITY_DAYS}; got {value!r}"
        )
    return days


def parse_signing_algorithm(value: Any) -> str:
    algorithm = _text(value, PCA_SIGNING_ALGORITHM_KEY) or DEFAULT_PCA_SIGNING_ALGORITHM
    if algorithm not in PCA_SIGNING_ALGORITHMS:
        raise ContextError(
            f"context variable {PCA_SIGNING_ALGORITHM_KEY} must be one of {', '.join(PCA_SIGNING_ALGORITHMS)};"
            f" got {algorithm!r}"
        )
    return algorithm


def parse_layer_arn(value: Any) -> str | None:
    arn = _text(value, POWERTOOLS_LAYER_ARN_KEY)
    if not arn:
        return None
    if not _LAYER_ARN_RE.match(arn):
        raise ContextError(
            f"context variable {POWERTOOLS_LAYER_ARN_KEY} must be empty (the public Powertools layer for the"
            " stack's region) or a Lambda layer version ARN such as"
            " arn:aws:lambda:eu-west-1:017000801446:layer:AWSLambdaPowertoolsPythonV3-python314-arm64:1;"
            f" got {arn!r}"
        )
    return arn


def _schedule_help(key: str, what: str) -> str:
    return (
        f"context variable {key} must be empty (no {what}, the default) or an"
        " EventBridge schedule expression that runs at most hourly: rate(N hours) or rate(N days) (singular"
        " unit for 1, e.g. rate(1 hour), rate(6 hours)), or cron(minute hour day-of-month month day-of-week"
        " year) with a single minute and '?' in one of the two day fields, e.g. cron(0 3 * * ? *)"
    )


def parse_schedule(value: Any, key: str, what: str) -> str | None:
    """An EventBridge schedule expression that runs at most hourly, or None (off)."""
    expression = _text(value, key)
    if not expression:
        return None
    problem = _rate_problem(expression) if expression.startswith("rate(") else _cron_problem(expression)
    if problem is not None:
        raise ContextError(f"{_schedule_help(key, what)}; got {expression!r} ({problem})")
    return expression


def parse_reconcile_schedule(value: Any) -> str | None:
    """The EventBridge schedule of the scheduled reconcile, or None (off)."""
    return parse_schedule(value, RECONCILE_SCHEDULE_KEY, "scheduled reconcile")


def parse_renewal_policy(value: Any) -> str:
    """The renewal function's policy, in `certrotator local up --schedule`'s form (without every=):
    checked by the same parser the function uses, and returned normalised."""
    from certrotator.ops.schedule.settings import parse_spec

    text = _text(value, RENEWAL_POLICY_KEY) or DEFAULT_RENEWAL_POLICY
    try:
        return parse_spec(text).settings.describe()
    except ValueError as exc:
        raise ContextError(
            f"context variable {RENEWAL_POLICY_KEY} must be a renewal policy such as 'renew-before=30d' or"
            f" 'renew-at-fraction=0.66', optionally with ',group=G', ',max-per-job=N', ',jitter=2d'; {exc}"
        ) from None


def parse_flag(value: Any, key: str) -> bool:
    if value is None or value == "" or value is False or value == "false":
        return False
    if value is True or value == "true":
        return True
    raise ContextError(f"context variable {key} must be true or false; got {value!r}")


def parse_metrics_namespace(value: Any) -> str:
    namespace = _text(value, METRICS_NAMESPACE_KEY) or DEFAULT_METRICS_NAMESPACE
    if not _NAMESPACE_RE.match(namespace) or namespace.startswith("AWS/"):
        raise ContextError(
            f"context variable {METRICS_NAMESPACE_KEY} must be a CloudWatch namespace: 1-255 letters, digits"
            f" and . - _ / # :, not starting with AWS/; got {namespace!r}"
        )
    return namespace


def _rate_problem(expression: str) -> str | None:
    match = _RATE_RE.match(expression)
    if match is None:
        return "not rate(<whole number> <unit>)"
    count, unit = int(match[1]), match[2]
    if count < 1:
        return "the value must be at least 1"
    # EventBridge's rule: singular unit for 1, plural for more (rate(1 hours) is refused at deploy time)
    if (count == 1) == unit.endswith("s"):
        return f"use {'the singular' if count == 1 else 'a plural'} unit with {count}"
    minutes = count * _RATE_UNIT_MINUTES[unit.removesuffix("s")]
    if minutes < MIN_RECONCILE_INTERVAL_MINUTES:
        return f"every {minutes} minutes is more often than hourly"
    return None


def _cron_problem(expression: str) -> str | None:
    match = _CRON_RE.match(expression)
    if match is None:
        return "neither rate(...) nor cron(...)"
    fields = match[1].split(" ")
    if len(fields) != 6 or not all(_CRON_FIELD_RE.match(f) for f in fields):
        return "a cron expression has six fields separated by single spaces"
    minute, _, day_of_month, _, day_of_week, _ = fields
    if not (minute.isascii() and minute.isdigit() and int(minute) <= 59):
        return "the minute field must be one minute, 0-59, so that runs are at least an hour apart"
    if (day_of_month == "?") == (day_of_week == "?"):
        return "exactly one of day-of-month and day-of-week must be '?'"
    return None
