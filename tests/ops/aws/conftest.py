"""Fixtures for the `certrotator aws` operations: moto where it is faithful (IoT things, groups, jobs
and templates; S3; STS), botocore Stubber where it is not (greengrassv2 and CloudFormation, which this
moto install cannot serve, and iot describe_event_configurations, which moto lacks).

moto is imported before any boto3 client exists, and every test runs with fake credentials, no AWS
config files and proxies pointing at a dead local port, so a call that escapes the mocks fails at once
instead of reaching AWS."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import moto  # noqa: F401 -- must precede every boto3 client
import pytest
from botocore.stub import Stubber
from moto import mock_aws
from moto.iot.models import iot_backends

from certrotator.ops.aws import cli as aws_cli
from certrotator.ops.aws.clients import AwsClients
from certrotator.ops.aws.jobs import EXECUTION_COUNTERS
from certrotator.protocol import JOB_DOCUMENT

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
DEAD_PROXY = "http://127.0.0.1:9"
TEMPLATE = "AWSLabsCertificateRotator"


@pytest.fixture(autouse=True)
def aws_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, DEAD_PROXY)
    for name in ("NO_PROXY", "no_proxy", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    nowhere = tmp_path_factory.mktemp("aws") / "none"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata credential probing
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)


@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws():
        yield


def make_clients(**overrides: Any) -> AwsClients:
    """Clients on moto, except those given (e.g. greengrassv2=<a stubbed client>)."""

    def make(name: str) -> Any:
        return overrides.get(name) or boto3.client(name, region_name=REGION)  # type: ignore[call-overload]

    return AwsClients(make)


@pytest.fixture
def clients(aws: None) -> AwsClients:
    return make_clients()


@pytest.fixture
def iot(clients: AwsClients) -> Any:
    return clients.iot


@pytest.fixture
def greengrass_stub(aws: None) -> Iterator[Stubber]:
    """moto 5.2.5 has no greengrassv2 (only Greengrass v1)."""
    with Stubber(boto3.client("greengrassv2", region_name=REGION)) as stub:
        yield stub
        stub.assert_no_pending_responses()


@pytest.fixture
def use_clients(monkeypatch: pytest.MonkeyPatch) -> Callable[[AwsClients], None]:
    """Make the CLI use these clients instead of building its own from the environment."""

    def use(clients: AwsClients) -> None:
        monkeypatch.setattr(aws_cli, "connect", lambda region, profile: clients)

    return use


# ----------------------------------------------------------------------------------- moto helpers


def create_template(iot: Any, template: str = TEMPLATE, document: object = JOB_DOCUMENT) -> str:
    return str(
        iot.create_job_template(
            jobTemplateId=template,
            description="rotation",
            document=json.dumps(document),
            timeoutConfig={"inProgressTimeoutInMinutes": 5},
        )["jobTemplateArn"]
    )


def create_things(iot: Any, *names: str, group: str | None = None) -> None:
    if group is not None:
        iot.create_thing_group(thingGroupName=group)
    for name in names:
        iot.create_thing(thingName=name)
        if group is not None:
            iot.add_thing_to_thing_group(thingGroupName=group, thingName=name)


def moto_iot() -> Any:
    return iot_backends[ACCOUNT][REGION]


def set_execution(
    job_id: str, thing: str, status: str, details: dict[str, str] | None = None, job_status: str | None = None
) -> None:
    """What devices and AWS IoT would do (moto implements no iot-jobs-data): move an execution, and
    keep describe_job's counts in step (moto's are fixed at creation)."""
    backend = moto_iot()
    execution = backend.job_executions[(job_id, thing)]
    execution.status = status
    if details is not None:
        execution.status_details_map = details
    job = backend.jobs[job_id]
    statuses = [e.status for (j, _), e in backend.job_executions.items() if j == job_id]
    for execution_status, counter in EXECUTION_COUNTERS.items():
        job.job_process_details[counter] = statuses.count(execution_status)
    if job_status is not None:
        job.status = job_status
