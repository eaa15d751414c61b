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

DEFAULT_STACK_NAME: Final = "AWSLabsCertificateRotator"
DEFAULT_PCA_VALIDITY_DAYS: Final = 7
DEFAULT_PCA_SIGNING_ALGORITHM: Final = "SHA256WITHRSA"
DEFAULT_LAMBDA_DEPENDENCIES_DIR: Final = "build/lambda-deps"

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
