"""The Lambda entry points: configuration, the per-container ports, metrics and logs, whole rotations."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from botocore.stub import Stubber
from moto.iotdata.models import iotdata_backends
from moto.sns.models import sns_backends

from certrotator import crypto
from certrotator.backend.aws import lambdas
from certrotator.backend.aws.adapters import IotIssuer, PrivateCaIssuer
from certrotator.backend.aws.clients import Clients, get_clients
from certrotator.backend.aws.lambdas import BackendConfig, ConfigError, FunctionIdentity
from certrotator.protocol import STATUS_DETAILS_KEY, JobExecutionEvent, JobExecutionStatus, Topics

from .support import ACCOUNT, REGION, Device, TestCa, execution_response, provision, sign_csrs_for_real

TOPIC_ARN = f"arn:aws:sns:{REGION}:{ACCOUNT}:AWSLabsCertificateRotatorNotification"
PCA_ARN = f"arn:aws:acm-pca:{REGION}:{ACCOUNT}:certificate-authority/11111111-2222-3333-4444-555555555555"


@dataclass
class FakeContext:
    """The attributes of a Lambda context that the entry points and powertools read."""

    function_name: str = "CertificateRotatorCreate"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:CertificateRotatorCreate"
    aws_request_id: str = "c6af9ac6-7b61-11e6-9a41-93e812345678"


CONTEXT = FakeContext()


# -------------------------------------------------------------------------------------- configuration


def test_config_defaults() -> None:
    config = BackendConfig.from_env({"SNS_TOPIC_ARN": TOPIC_ARN})
    assert config == BackendConfig(TOPIC_ARN, "AWSLabsCertificateRotator", None)
    assert config.pca_signing_algorithm is crypto.CaSigningAlgorithm.SHA256WITHRSA
    assert config.pca_validity_days == 7


def test_config_reads_every_variable() -> None:
    config = BackendConfig.from_env(
        {
            "SNS_TOPIC_ARN": TOPIC_ARN,
            "SHADOW_NAME": "Rotator",
            "PCA_CA_ARN": PCA_ARN,
            "PCA_SIGNING_ALGORITHM": "SHA384WITHECDSA",
            "PCA_VALIDITY_IN_DAYS": "30",
            "JOB_DOCUMENT": '{ "operation" : "ROTATE_CERTIFICATE" }',
        }
    )
    assert config == BackendConfig(
        TOPIC_ARN, "Rotator", PCA_ARN, crypto.CaSigningAlgorithm.SHA384WITHECDSA, 30
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SNS_TOPIC_ARN", ""),
        ("SNS_TOPIC_ARN", "AWSLabsCertificateRotatorNotification"),
        ("SHADOW_NAME", "has space"),
        ("SHADOW_NAME", "x" * 65),
        ("PCA_CA_ARN", "arn:aws:iam::123456789012:role/x"),
        ("PCA_SIGNING_ALGORITHM", "SHA1WITHRSA"),
        ("PCA_SIGNING_ALGORITHM", "ECDSA-WITH-SHA256"),  # a CSR algorithm, not a CA one
        ("PCA_VALIDITY_IN_DAYS", "0"),
        ("PCA_VALIDITY_IN_DAYS", "-3"),
        ("PCA_VALIDITY_IN_DAYS", "seven"),
        ("JOB_DOCUMENT", "{not json"),
        ("JOB_DOCUMENT", '{"operation":"ROTATE_KEYS"}'),
        ("JOB_DOCUMENT", '{"operation":"ROTATE_CERTIFICATE","extra":1}'),
    ],
)
def test_bad_configuration_names_the_variable(variable: str, value: str) -> None:
    env = {"SNS_TOPIC_ARN": TOPIC_ARN, variable: value}
    with pytest.raises(ConfigError, match=variable):
        BackendConfig.from_env(env)


@pytest.mark.parametrize(
    ("arn", "identity"),
    [
        (CONTEXT.invoked_function_arn, FunctionIdentity("aws", REGION, ACCOUNT)),
        (
            "arn:aws-cn:lambda:cn-north-1:111122223333:function:f:live",
            FunctionIdentity("aws-cn", "cn-north-1", "111122223333"),
        ),
    ],
)
def test_function_identity_from_the_invoked_arn(arn: str, identity: FunctionIdentity) -> None:
    assert FunctionIdentity.from_context(FakeContext(invoked_function_arn=arn)) == identity


def test_function_identity_needs_a_lambda_arn() -> None:
    with pytest.raises(ConfigError, match="invoked_function_arn"):
        FunctionIdentity.from_context(FakeContext(invoked_function_arn="local"))


def test_issuer_follows_pca_ca_arn(clients: Clients) -> None:
    identity = FunctionIdentity("aws", REGION, ACCOUNT)
    iot_ports = lambdas.build_ports(BackendConfig(TOPIC_ARN), identity, clients)
    pca_ports = lambdas.build_ports(BackendConfig(TOPIC_ARN, pca_ca_arn=PCA_ARN), identity, clients)
    assert isinstance(iot_ports.issuer, IotIssuer)
    assert isinstance(pca_ports.issuer, PrivateCaIssuer)


@pytest.mark.filterwarnings("ignore:No application metrics")
def test_bad_configuration_fails_the_invocation(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNS_TOPIC_ARN", TOPIC_ARN)
    monkeypatch.setenv("PCA_VALIDITY_IN_DAYS", "0")
    with pytest.raises(ConfigError, match="PCA_VALIDITY_IN_DAYS"):
        lambdas.commit_certificate({}, CONTEXT)


# ------------------------------------------------------------------------------------ the entry points


@pytest.fixture
def backend(clients: Clients, monkeypatch: pytest.MonkeyPatch, test_ca: TestCa) -> Iterator[Stubber]:
    """moto + a stubbed jobs data plane + CreateCertificateFromCsr that signs the CSR's own key."""
    clients.sns.create_topic(Name="AWSLabsCertificateRotatorNotification")
    monkeypatch.setenv("SNS_TOPIC_ARN", TOPIC_ARN)
    sign_csrs_for_real(clients, test_ca)
    with Stubber(clients.iot_jobs_data) as jobs:
        yield jobs
        jobs.assert_no_pending_responses()


def published() -> list[tuple[str, dict[str, Any]]]:
    return [
        (topic, json.loads(payload))
        for topic, payload in iotdata_backends[ACCOUNT][REGION].published_payloads
    ]


def notifications() -> list[dict[str, Any]]:
    topic = sns_backends[ACCOUNT][REGION].topics[TOPIC_ARN]
    return [json.loads(message) for _, message, *_ in topic.sent_notifications]


class _CurrentStdout:
    """Writes to whatever sys.stdout is at the time (pytest swaps it between test phases)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@pytest.fixture(autouse=True)
def logs_to_capsys(monkeypatch: pytest.MonkeyPatch) -> None:
    # powertools' handler holds the sys.stdout of import time; make it follow capsys
    monkeypatch.setattr(lambdas.logger.registered_handler, "stream", _CurrentStdout())


def stdout_records(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    records = []
    for line in capsys.readouterr().out.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def metric_names(records: list[dict[str, Any]]) -> list[str]:
    names = []
    for record in records:
        for directive in record.get("_aws", {}).get("CloudWatchMetrics", []):
            assert directive["Namespace"] == "CertificateRotator"
            names += [metric["Name"] for metric in directive["Metrics"]]
    return names


def create_event(device: Device, job_id: str, csr: str, principal: str | None = None) -> dict[str, Any]:
    return {
        "jobId": job_id,
        "csr": csr,
        "thingName": device.thing,
        "clientId": device.thing,
        "principal": principal or device.certificate_id,
        "topic": Topics.create(device.thing),
    }


def commit_event(device: Device, job_id: str, principal: str) -> dict[str, Any]:
    return {
        "jobId": job_id,
        "thingName": device.thing,
        "clientId": device.thing,
        "principal": principal,
        "topic": Topics.commit(device.thing),
    }


def terminal_event(device: Device, job_id: str, status: JobExecutionStatus) -> dict[str, Any]:
    event = JobExecutionEvent(device.thing, job_id, status, {STATUS_DETAILS_KEY: status.value})
    return event.to_event(thing_arn_prefix=f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/")


def test_a_whole_rotation(clients: Clients, backend: Stubber, capsys: pytest.CaptureFixture[str]) -> None:
    device = provision(clients, "dev1")
    old_id = device.certificate_id
    key, csr = device.new_csr()
    for _ in range(2):  # create, then commit, each checks the execution
        backend.add_response(
            "describe_job_execution",
            execution_response("dev1", "job1"),
            {"jobId": "job1", "thingName": "dev1", "includeJobDocument": True},
        )

    created = lambdas.create_certificate(create_event(device, "job1", csr), CONTEXT)
    assert created["outcome"] == "accepted", created
    ((topic, reply),) = published()
    assert topic == "awslabs/things/dev1/certificate/create/accepted"
    # the device side: the certificate is for its new key, and that is what it connects with now
    new_pem = reply["certificatePem"]
    assert crypto.certificate_matches_key(new_pem, key)
    new_id = crypto.certificate_id(new_pem)
    registry = lambdas.container_ports(CONTEXT).registry
    assert sorted(registry.exclusive_principals("dev1")) == sorted([old_id, new_id])
    assert registry.certificate_policies(new_id) == ["DevicePolicy"]

    committed = lambdas.commit_certificate(commit_event(device, "job1", new_id), CONTEXT)
    assert committed["outcome"] == "accepted", committed
    assert published()[-1] == ("awslabs/things/dev1/certificate/commit/accepted", {})

    ended = lambdas.job_execution_terminal(
        terminal_event(device, "job1", JobExecutionStatus.SUCCEEDED), CONTEXT
    )
    assert ended["outcome"] == "succeeded", ended
    assert registry.exclusive_principals("dev1") == [new_id]
    assert registry.describe_certificate(old_id) is None
    assert lambdas.container_ports(CONTEXT).state.load("dev1") is None
    assert notifications() == []

    records = stdout_records(capsys)
    assert metric_names(records) == ["RotationsCreated", "RotationsCommitted", "RotationsSucceeded"]
    # the handlers' standard-library records come out as powertools JSON with the Lambda context
    handler_logs = [r for r in records if r.get("name", "").startswith("certrotator")]
    assert handler_logs, records
    assert all(r["function_request_id"] == CONTEXT.aws_request_id for r in handler_logs)


def test_a_rejected_request_publishes_the_reason_and_issues_nothing(
    clients: Clients, backend: Stubber, capsys: pytest.CaptureFixture[str]
) -> None:
    device = provision(clients, "dev1")
    other = provision(clients, "dev2")
    backend.add_response("describe_job_execution", execution_response("dev1", "job1"))
    result = lambdas.create_certificate(
        create_event(device, "job1", device.new_csr()[1], principal=other.certificate_id), CONTEXT
    )
    assert result["outcome"] == "rejected"
    ((topic, reply),) = published()
    assert topic == "awslabs/things/dev1/certificate/create/rejected"
    assert reply["errorMsg"] == result["reason"]
    assert len(clients.iot.list_certificates()["certificates"]) == 2
    assert metric_names(stdout_records(capsys)) == ["Rejections"]


def test_a_failed_execution_deletes_the_new_certificate_and_notifies(
    clients: Clients, backend: Stubber, capsys: pytest.CaptureFixture[str]
) -> None:
    device = provision(clients, "dev1")
    backend.add_response("describe_job_execution", execution_response("dev1", "job1"))
    created = lambdas.create_certificate(create_event(device, "job1", device.new_csr()[1]), CONTEXT)
    assert created["outcome"] == "accepted"
    new_id = crypto.certificate_id(published()[0][1]["certificatePem"])

    ended = lambdas.job_execution_terminal(terminal_event(device, "job1", JobExecutionStatus.FAILED), CONTEXT)
    assert ended["outcome"] == "failed"
    registry = lambdas.container_ports(CONTEXT).registry
    assert registry.exclusive_principals("dev1") == [device.certificate_id]
    assert registry.describe_certificate(new_id) is None
    (notification,) = notifications()
    assert notification["thingName"] == "dev1" and notification["status"] == "FAILED"
    assert metric_names(stdout_records(capsys)) == ["RotationsCreated", "RotationsFailed"]


def test_a_private_ca_issues_when_configured(
    clients: Clients, backend: Stubber, private_ca: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PCA_CA_ARN", private_ca)
    monkeypatch.setenv("PCA_SIGNING_ALGORITHM", "SHA256WITHECDSA")
    device = provision(clients, "dev1")
    key, csr = device.new_csr()
    backend.add_response("describe_job_execution", execution_response("dev1", "job1"))
    created = lambdas.create_certificate(create_event(device, "job1", csr), CONTEXT)
    assert created["outcome"] == "accepted", created
    pem = published()[0][1]["certificatePem"]
    assert crypto.certificate_matches_key(pem, key)
    assert crypto.load_certificate(pem).issuer.rfc4514_string() == "CN=fleet CA"


@pytest.mark.filterwarnings("ignore:No application metrics")
def test_ports_are_built_once_per_container(clients: Clients, backend: Stubber) -> None:
    ports = lambdas.container_ports(CONTEXT)
    result = lambdas.job_execution_terminal({"jobId": "job1", "thingArn": "x"}, CONTEXT)
    assert result["outcome"] == "ignored"
    assert lambdas.container_ports(CONTEXT) is ports
    assert get_clients(REGION) is clients


@pytest.mark.parametrize(
    ("status", "metric"),
    [
        (JobExecutionStatus.TIMED_OUT, "RotationsTimedOut"),
        (JobExecutionStatus.FAILED, "RotationsFailed"),
        (JobExecutionStatus.REJECTED, "RotationsFailed"),  # the device refused the job: no Rejection
        (JobExecutionStatus.CANCELED, "RotationsFailed"),
    ],
)
def test_an_execution_ending_before_any_certificate_notifies(
    clients: Clients,
    backend: Stubber,
    capsys: pytest.CaptureFixture[str],
    status: JobExecutionStatus,
    metric: str,
) -> None:
    device = provision(clients, "dev1")
    ended = lambdas.job_execution_terminal(terminal_event(device, "job1", status), CONTEXT)
    assert ended["outcome"] == status.value.lower()
    assert lambdas.container_ports(CONTEXT).registry.exclusive_principals("dev1") == [device.certificate_id]
    (notification,) = notifications()
    assert notification["status"] == status.value and notification["operatorAction"]
    assert metric_names(stdout_records(capsys)) == [metric]
