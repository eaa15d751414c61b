"""boto3 plumbing shared by the `certrotator aws` operations: lazily made clients, the caller's
identity, and one-line explanations of the errors an operator can fix (credentials, region,
permissions, missing resources, the network)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
)

from certrotator.backend.aws import clients as backend_clients
from certrotator.backend.aws.clients import error_code as error_code  # noqa: PLC0414  (one spelling of it)

if TYPE_CHECKING:
    from mypy_boto3_cloudformation import CloudFormationClient
    from mypy_boto3_greengrassv2 import GreengrassV2Client
    from mypy_boto3_iot import IoTClient
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sts import STSClient

NOT_FOUND_CODES: Final = frozenset({"ResourceNotFoundException", "ResourceNotFound", "NotFound", "404"})
ACCESS_DENIED_CODES: Final = frozenset(
    {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedException", "403"}
)
BAD_CREDENTIALS_CODES: Final = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidToken",
    }
)

CLIENT_CONFIG: Final = Config(
    retries={"mode": "standard", "max_attempts": 5},
    connect_timeout=10,
    read_timeout=60,
    user_agent_extra="certrotator",
)


class OperationError(RuntimeError):
    """A refusal with a one-line reason naming the option or the resource; the CLI prints it (exit 2)."""


# -------------------------------------------------------------------------------------------- clients


class AwsClients:
    """boto3 clients made on first use (a command that needs only IoT never builds the others), plus
    the caller's account and partition, asked of STS once."""

    def __init__(self, factory: Callable[[str], Any]) -> None:
        self._factory = factory
        self._made: dict[str, Any] = {}
        self._identity: tuple[str, str] | None = None

    @classmethod
    def from_session(cls, region: str | None = None, profile: str | None = None) -> AwsClients:
        """Credentials and region from the usual chain (environment, profile, instance role)."""
        session = boto3.Session(profile_name=profile, region_name=region)  # ProfileNotFound
        if not session.region_name:
            raise NoRegionError()
        return cls(lambda name: session.client(name, config=CLIENT_CONFIG))  # type: ignore[call-overload]

    def _client(self, name: str) -> Any:
        if name not in self._made:
            self._made[name] = self._factory(name)
        return self._made[name]

    @property
    def iot(self) -> IoTClient:
        return cast("IoTClient", self._client("iot"))

    @property
    def greengrass(self) -> GreengrassV2Client:
        return cast("GreengrassV2Client", self._client("greengrassv2"))

    @property
    def s3(self) -> S3Client:
        return cast("S3Client", self._client("s3"))

    @property
    def cloudformation(self) -> CloudFormationClient:
        return cast("CloudFormationClient", self._client("cloudformation"))

    @property
    def sts(self) -> STSClient:
        return cast("STSClient", self._client("sts"))

    @property
    def region(self) -> str:
        return str(self.iot.meta.region_name)

    def identity(self) -> tuple[str, str]:
        """(account id, partition) of the credentials in use."""
        if self._identity is None:
            caller = self.sts.get_caller_identity()
            self._identity = (caller["Account"], caller["Arn"].split(":")[1])
        return self._identity


# --------------------------------------------------------------------------------------------- errors


def is_not_found(exc: ClientError) -> bool:
    return error_code(exc) in NOT_FOUND_CODES


T = TypeVar("T")


def unless_missing(call: Callable[[], T]) -> T | None:
    """`call()`'s answer, or None when AWS says its resource does not exist (`is_not_found`, the wider
    set of not-found codes of the services the operator's commands call); every other error propagates."""
    return backend_clients.unless_missing(call, is_not_found)


@contextmanager
def named(resource: str, region: str) -> Iterator[None]:
    """Report a not-found answer as `<resource> does not exist in <region>`."""
    try:
        yield
    except ClientError as exc:
        if is_not_found(exc):
            raise OperationError(f"{resource} does not exist in {region}") from None
        raise


def error_message(exc: BaseException) -> str | None:
    """One line for an error the operator can fix (credentials, region, permissions, a missing
    resource, the network); None for anything else, which is a bug worth a traceback."""
    if isinstance(exc, OperationError):
        return str(exc)
    if isinstance(exc, NoRegionError):
        return "no AWS region: pass --region, or set AWS_REGION or a region in your AWS profile"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return (
            "no AWS credentials found: run `aws configure` or `aws sso login`, pass --profile, "
            "or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, ProfileNotFound):
        return f"{exc} (check --profile / AWS_PROFILE against ~/.aws/config)"
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return f"cannot reach AWS: {exc}"
    if isinstance(exc, ClientError):
        code = error_code(exc)
        operation = exc.operation_name
        message = exc.response.get("Error", {}).get("Message") or code
        if code in ACCESS_DENIED_CODES:
            return f"access denied to {operation}: {message} (the credentials in use need this permission)"
        if code in BAD_CREDENTIALS_CODES:
            return f"AWS rejected the credentials ({code}): {message}; refresh them or pick another --profile"
        if code in NOT_FOUND_CODES:
            return f"not found ({operation}): {message}"
        return f"{operation} failed ({code}): {message}"
    if isinstance(exc, BotoCoreError):
        return str(exc)
    return None


# ------------------------------------------------------------------------------------------- lookups


def thing_arn(clients: AwsClients, thing: str) -> str:
    with named(f"thing {thing!r}", clients.region):
        return clients.iot.describe_thing(thingName=thing)["thingArn"]


def thing_group_arn(clients: AwsClients, group: str) -> str:
    with named(f"thing group {group!r}", clients.region):
        return clients.iot.describe_thing_group(thingGroupName=group)["thingGroupArn"]
