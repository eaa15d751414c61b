"""boto3 clients for the Lambda functions: created on first use, kept for the container's life.

One `Clients` per region and container. Creating a client costs tens of milliseconds and the IoT
data-plane endpoints cost a `DescribeEndpoint` call each, so both are paid once per cold start. The
same holds for secrets (the rotation-state key): one `GetSecretValue` per secret and container.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any, Final, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotocoreConnectionError

if TYPE_CHECKING:
    from mypy_boto3_acm_pca import ACMPCAClient
    from mypy_boto3_iot import IoTClient
    from mypy_boto3_iot_data import IoTDataPlaneClient
    from mypy_boto3_iot_jobs_data import IoTJobsDataPlaneClient
    from mypy_boto3_secretsmanager import SecretsManagerClient
    from mypy_boto3_sns import SNSClient

# Adaptive mode adds client-side rate limiting on top of retries: a rotation wave across a fleet
# hits per-account TPS limits (e.g. CreateCertificateFromCsr ~15 TPS), and throttling should slow
# the Lambdas down rather than fail rotations.
CLIENT_CONFIG: Final = Config(
    retries={"mode": "adaptive", "max_attempts": 10},
    user_agent_extra="certrotator",
)

# Overrides for the account-specific data-plane endpoints (host or https URL). Useful where
# DescribeEndpoint is not wanted (VPC endpoints, custom domains) and for emulators.
IOT_DATA_ENDPOINT_ENV: Final = "IOT_DATA_ENDPOINT"
IOT_JOBS_ENDPOINT_ENV: Final = "IOT_JOBS_ENDPOINT"


T = TypeVar("T")
NOT_FOUND: Final = "ResourceNotFoundException"


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def is_not_found(exc: ClientError) -> bool:
    return error_code(exc) == NOT_FOUND


def unless_missing(call: Callable[[], T], missing: Callable[[ClientError], bool] = is_not_found) -> T | None:
    """`call()`'s answer, or None when the error says its resource does not exist (`missing`: by default
    AWS's ResourceNotFoundException); every other error propagates."""
    try:
        return call()
    except ClientError as exc:
        if missing(exc):
            return None
        raise


# Error codes that say "not now" rather than "no": throttling and service-side failures. botocore's own
# retries (CLIENT_CONFIG) have already been spent when one of these reaches a handler.
TRANSIENT_ERROR_CODES: Final = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "InternalError",
        "InternalException",
        "InternalServerException",
        "InternalServerError",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
    }
)


def is_transient(exc: BaseException) -> bool:
    """Whether running the same call again later may succeed: throttling, a 5xx, a lost connection.

    Access denied, a malformed request, a resource in the wrong state are not: they need a person.
    """
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error_code(exc) in TRANSIENT_ERROR_CODES or status == 429 or status >= 500
    return isinstance(exc, BotocoreConnectionError | HTTPClientError)


def _endpoint_url(address: str) -> str:
    return address if address.startswith(("https://", "http://")) else f"https://{address}"


class Clients:
    """The clients the adapters need, each created on first access."""

    def __init__(self, region: str, session: boto3.session.Session | None = None) -> None:
        self.region = region
        self._session = session or boto3.session.Session()
        self._secrets: dict[str, bytes] = {}

    def _client(self, service: str, endpoint_url: str | None = None) -> Any:
        return self._session.client(
            service,  # type: ignore[call-overload]
            region_name=self.region,
            endpoint_url=endpoint_url,
            config=CLIENT_CONFIG,
        )

    def _data_endpoint(self, env_name: str, endpoint_type: str) -> str:
        override = os.environ.get(env_name, "").strip()
        if override:
            return _endpoint_url(override)
        # iot-data and iot-jobs-data must use the account's own endpoint: boto3's default host
        # serves only some operations.
        address = self.iot.describe_endpoint(endpointType=endpoint_type)["endpointAddress"]
        return _endpoint_url(address)

    @cached_property
    def iot(self) -> IoTClient:
        client: IoTClient = self._client("iot")
        return client

    @cached_property
    def iot_data(self) -> IoTDataPlaneClient:
        url = self._data_endpoint(IOT_DATA_ENDPOINT_ENV, "iot:Data-ATS")
        client: IoTDataPlaneClient = self._client("iot-data", url)
        return client

    @cached_property
    def iot_jobs_data(self) -> IoTJobsDataPlaneClient:
        url = self._data_endpoint(IOT_JOBS_ENDPOINT_ENV, "iot:Jobs")
        client: IoTJobsDataPlaneClient = self._client("iot-jobs-data", url)
        return client

    @cached_property
    def acm_pca(self) -> ACMPCAClient:
        client: ACMPCAClient = self._client("acm-pca")
        return client

    @cached_property
    def sns(self) -> SNSClient:
        client: SNSClient = self._client("sns")
        return client

    @cached_property
    def secretsmanager(self) -> SecretsManagerClient:
        client: SecretsManagerClient = self._client("secretsmanager")
        return client

    def secret_value(self, secret_id: str) -> bytes:
        """The secret's current value (AWSCURRENT), fetched on first use and kept for the container's life.

        A `SecretString` is returned as its UTF-8 bytes, a `SecretBinary` as it is. Because of the
        cache, a secret rotated in Secrets Manager is seen only by containers started after that.
        """
        value = self._secrets.get(secret_id)
        if value is None:
            response = self.secretsmanager.get_secret_value(SecretId=secret_id)
            if "SecretString" in response:
                value = response["SecretString"].encode("utf-8")
            elif "SecretBinary" in response:
                value = bytes(response["SecretBinary"])
            else:
                raise ValueError(f"secret {secret_id!r} has neither a SecretString nor a SecretBinary")
            self._secrets[secret_id] = value
        return value


_cache: dict[str, Clients] = {}


def get_clients(region: str) -> Clients:
    """The container's clients for `region`, created on the first call."""
    clients = _cache.get(region)
    if clients is None:
        clients = _cache[region] = Clients(region)
    return clients


def use_clients(clients: Clients) -> None:
    """Make `clients` the container's clients for their region (a custom session, a benchmark)."""
    _cache[clients.region] = clients


def reset_clients() -> None:
    """Forget every cached client (tests; a new moto mock needs new clients)."""
    _cache.clear()
