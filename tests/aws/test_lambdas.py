"""The Lambda entry points: configuration, the per-container ports, metrics and logs, whole rotations."""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto.iotdata.models import iotdata_backends
from moto.sns.models import sns_backends

from certrotator import crypto
from certrotator.backend.aws import lambdas
from certrotator.backend.aws.adapters import IotIssuer, PrivateCaIssuer, ShadowStateStore
from certrotator.backend.aws.clients import Clients, get_clients, reset_clients
from certrotator.backend.aws.lambdas import BackendConfig, ConfigError, FunctionIdentity
from certrotator.backend.ports import CertificateStatus, RotationState
from certrotator.protocol import (
    STATUS_DETAILS_KEY,
    JobExecutionStatus,
    RotationProgress,
    Topics,
)

from ..backend.fakes import World
from .support import (
    ACCOUNT,
    REGION,
    ROTATION_DOCUMENT,
    Device,
    TestCa,
    calls,
    execution_response,
    provision,
    sign_csrs_for_real,
)

TOPIC_ARN = f"arn:aws:sns:{REGION}:{ACCOUNT}:AWSLabsCertificateRotatorNotification"
SECRET_ARN = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:certrotator/state-key-AbCdEf"
REQUIRED = {"SNS_TOPIC_ARN": TOPIC_ARN, "STATE_KEY_SECRET_ARN": SECRET_ARN}
SHADOW = "AWSLabsCertificateRotator"
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
    config = BackendConfig.from_env(REQUIRED)
    assert config == BackendConfig(TOPIC_ARN, SECRET_ARN, "AWSLabsCertificateRotator", None)
    assert config.pca_signing_algorithm is crypto.CaSigningAlgorithm.SHA256WITHRSA
    assert config.pca_validity_days == 7


def test_config_reads_every_variable() -> None:
    config = BackendConfig.from_env(
        {
            "SNS_TOPIC_ARN": TOPIC_ARN,
            "STATE_KEY_SECRET_ARN": f" {SECRET_ARN} ",
            "SHADOW_NAME": "Rotator",
            "PCA_CA_ARN": PCA_ARN,
            "PCA_SIGNING_ALGORITHM": "SHA384WITHECDSA",
            "PCA_VALIDITY_IN_DAYS": "30",
            "JOB_DOCUMENT": '{ "operation" : "ROTATE_CERTIFICATE" }',
        }
    )
    assert config == BackendConfig(
        TOPIC_ARN, SECRET_ARN, "Rotator", PCA_ARN, crypto.CaSigningAlgorithm.SHA384WITHECDSA, 30
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SNS_TOPIC_ARN", ""),
        ("SNS_TOPIC_ARN", "AWSLabsCertificateRotatorNotification"),
        ("STATE_KEY_SECRET_ARN", ""),
        ("STATE_KEY_SECRET_ARN", "certrotator/state-key"),  # a name: the functions are granted the ARN
        ("STATE_KEY_SECRET_ARN", TOPIC_ARN),
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
    env = REQUIRED | {variable: value}
    with pytest.raises(ConfigError, match=variable):
        BackendConfig.from_env(env)


def test_the_state_key_secret_is_required() -> None:
    with pytest.raises(ConfigError, match="STATE_KEY_SECRET_ARN is not set"):
        BackendConfig.from_env({"SNS_TOPIC_ARN": TOPIC_ARN})


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
    iot_ports = lambdas.build_ports(BackendConfig(TOPIC_ARN, SECRET_ARN), identity, clients)
    pca_ports = lambdas.build_ports(
        BackendConfig(TOPIC_ARN, SECRET_ARN, pca_ca_arn=PCA_ARN), identity, clients
    )
    assert isinstance(iot_ports.issuer, IotIssuer)
    assert isinstance(pca_ports.issuer, PrivateCaIssuer)


@pytest.mark.filterwarnings("ignore:No application metrics")
def test_bad_configuration_fails_the_invocation(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNS_TOPIC_ARN", TOPIC_ARN)
    monkeypatch.setenv("STATE_KEY_SECRET_ARN", SECRET_ARN)
    monkeypatch.setenv("PCA_VALIDITY_IN_DAYS", "0")
    with pytest.raises(ConfigError, match="PCA_VALIDITY_IN_DAYS"):
        lambdas.commit_certificate({}, CONTEXT)


# ------------------------------------------------------------------------------------ the entry points


@pytest.fixture
def state_key_secret(clients: Clients, monkeypatch: pytest.MonkeyPatch) -> str:
    """The generated secret the stack provides, named by STATE_KEY_SECRET_ARN."""
    arn: str = clients.secretsmanager.create_secret(
        Name="certrotator/state-key", SecretString=secrets.token_urlsafe(48)
    )["ARN"]
    monkeypatch.setenv("STATE_KEY_SECRET_ARN", arn)
    return arn


@pytest.fixture
def backend(
    clients: Clients, monkeypatch: pytest.MonkeyPatch, test_ca: TestCa, state_key_secret: str
) -> Iterator[Stubber]:
    """moto + a stubbed jobs data plane + CreateCertificateFromCsr that signs the CSR's own key."""
    clients.sns.create_topic(Name="AWSLabsCertificateRotatorNotification")
    monkeypatch.setenv("SNS_TOPIC_ARN", TOPIC_ARN)
    sign_csrs_for_real(clients, test_ca)
    with Stubber(clients.iot_jobs_data) as jobs:
        yield jobs
        jobs.assert_no_pending_responses()


def in_progress(backend: Stubber, thing: str, job_id: str, times: int = 1) -> None:
    """The jobs data plane (stubbed: moto has none) says the execution is IN_PROGRESS, `times` times."""
    for _ in range(times):
        backend.add_response(
            "describe_job_execution",
            execution_response(thing, job_id),
            {"jobId": job_id, "thingName": thing, "includeJobDocument": True},
        )


def rotation_job(clients: Clients, job_id: str, *devices: Device, document: str = ROTATION_DOCUMENT) -> None:
    """The job in moto's control plane, where the terminal function looks its document up."""
    targets = [clients.iot.describe_thing(thingName=d.thing)["thingArn"] for d in devices]
    clients.iot.create_job(jobId=job_id, targets=targets, document=document)


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
    return execution_event(device.thing, job_id, status)


def execution_event(thing: str, job_id: str, status: JobExecutionStatus) -> dict[str, Any]:
    """A job execution event as AWS IoT publishes it and the terminal rule forwards it."""
    return {
        "eventType": "JOB_EXECUTION",
        "eventId": "e-1",
        "timestamp": 1700000000,
        "operation": status.value.lower(),
        "jobId": job_id,
        "thingArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{thing}",
        "status": status.value,
        "statusDetails": {STATUS_DETAILS_KEY: status.value},
    }




def write_reported(clients: Clients, thing: str, reported: dict[str, Any]) -> None:
    """What a device can do: publish any state to its own shadow."""
    payload = json.dumps({"state": {"reported": reported}}).encode()
    clients.iot_data.update_thing_shadow(thingName=thing, shadowName=SHADOW, payload=payload)


def read_reported(clients: Clients, thing: str) -> dict[str, Any]:
    shadow = clients.iot_data.get_thing_shadow(thingName=thing, shadowName=SHADOW)
    reported: dict[str, Any] = json.loads(shadow["payload"].read())["state"]["reported"]
    return reported


def tamper_warnings(records: list[dict[str, Any]], thing: str) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r.get("level") == "WARNING" and "tampered" in str(r.get("message")) and r.get("thing") == thing
    ]


@pytest.mark.parametrize("forged_state_before", [False, True])
def test_a_whole_rotation(
    clients: Clients, backend: Stubber, capsys: pytest.CaptureFixture[str], forged_state_before: bool
) -> None:
    device = provision(clients, "dev1")
    old_id = device.certificate_id
    if forged_state_before:  # a leftover or forged state does not stand in the way of a real rotation
        forged = RotationState("job1", "cc" * 32, "dd" * 32, RotationProgress.COMMITTED).to_dict()
        write_reported(clients, "dev1", forged | {"mac": "00" * 32})
    key_fetches = calls(clients.secretsmanager, "secretsmanager.GetSecretValue")
    key, csr = device.new_csr()
    rotation_job(clients, "job1", device)
    # create checks the execution before issuing and again after attaching, commit once
    in_progress(backend, "dev1", "job1", times=3)

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
    assert read_reported(clients, "dev1")["oldCertificateId"] == old_id
    assert len(read_reported(clients, "dev1")["mac"]) == 64

    committed = lambdas.commit_certificate(commit_event(device, "job1", new_id), CONTEXT)
    assert committed["outcome"] == "accepted", committed
    assert published()[-1] == ("awslabs/things/dev1/certificate/commit/accepted", {})

    ended = lambdas.job_execution_terminal(
        terminal_event(device, "job1", JobExecutionStatus.SUCCEEDED), CONTEXT
    )
    assert ended["outcome"] == "succeeded", ended
    assert registry.exclusive_principals("dev1") == [new_id]
    assert registry.describe_certificate(old_id) is None
    state = lambdas.container_ports(CONTEXT).state.load("dev1")
    assert state == RotationState("job1", old_id, new_id, RotationProgress.TERMINATED)
    assert notifications() == []
    # the three entry points share this container here: the key was fetched once for all of them
    assert len(key_fetches) == 1

    records = stdout_records(capsys)
    assert metric_names(records) == ["RotationsCreated", "RotationsCommitted", "RotationsSucceeded"]
    # create read the forged state once (it looks for a leftover), took it for none, and replaced it
    assert len(tamper_warnings(records, "dev1")) == int(forged_state_before)
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
    rotation_job(clients, "job1", device)
    in_progress(backend, "dev1", "job1", times=2)
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
    in_progress(backend, "dev1", "job1", times=2)
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
    rotation_job(clients, "job1", device)
    ended = lambdas.job_execution_terminal(terminal_event(device, "job1", status), CONTEXT)
    assert ended["outcome"] == status.value.lower()
    assert lambdas.container_ports(CONTEXT).registry.exclusive_principals("dev1") == [device.certificate_id]
    (notification,) = notifications()
    assert notification["status"] == status.value and notification["operatorAction"]
    assert metric_names(stdout_records(capsys)) == [metric]


# ------------------------------------------------------------------------- the authenticated state


def forged_state(victim_certificate: str, own_certificate: str) -> dict[str, str]:
    return RotationState("job1", victim_certificate, own_certificate, RotationProgress.COMMITTED).to_dict()


@pytest.mark.parametrize("mac", ["none", "wrong", "of the victim's state"])
def test_a_forged_state_cannot_get_another_things_certificate_deleted(
    clients: Clients, backend: Stubber, capsys: pytest.CaptureFixture[str], mac: str
) -> None:
    """The attack: dev1 names dev2's certificate as its "old" one, committed, then reports SUCCEEDED."""
    attacker, victim = provision(clients, "dev1"), provision(clients, "dev2")
    rotation_job(clients, "job1", attacker)
    forged = forged_state(victim.certificate_id, attacker.certificate_id)
    if mac == "wrong":
        forged |= {"mac": "ab" * 32}
    elif mac == "of the victim's state":
        # an authentic MAC the backend computed for the same fields, in the victim's shadow
        lambdas.container_ports(CONTEXT).state.save("dev2", RotationState.from_dict(forged))
        forged = read_reported(clients, "dev2")
    write_reported(clients, "dev1", forged)
    changes = [
        calls(clients.iot, f"iot.{operation}")
        for operation in ("UpdateCertificate", "DetachThingPrincipal", "DeleteCertificate")
    ]

    ended = lambdas.job_execution_terminal(
        terminal_event(attacker, "job1", JobExecutionStatus.SUCCEEDED), CONTEXT
    )

    assert ended["outcome"] == "succeeded"
    assert ended["reason"].startswith("contradiction: execution SUCCEEDED but rotation progress is none")
    assert changes == [[], [], []]
    for device in (victim, attacker):
        description = clients.iot.describe_certificate(certificateId=device.certificate_id)
        assert description["certificateDescription"]["status"] == CertificateStatus.ACTIVE.value
        principals = clients.iot.list_thing_principals_v2(thingName=device.thing)["thingPrincipalObjects"]
        assert [p["principal"].rsplit("/", 1)[1] for p in principals] == [device.certificate_id]
    (notification,) = notifications()
    assert (notification["thingName"], notification["jobId"]) == ("dev1", "job1")
    assert notification["status"] == "SUCCEEDED" and notification["operatorAction"]
    assert "oldCertificateId" not in notification["details"]  # nothing from the forged state
    assert len(tamper_warnings(stdout_records(capsys), "dev1")) == 1


def test_a_forged_state_is_not_committed(clients: Clients, backend: Stubber, test_ca: TestCa) -> None:
    """Commit would otherwise re-save the forged state under the backend's own MAC."""
    attacker, victim = provision(clients, "dev1"), provision(clients, "dev2")
    second = clients.iot.register_certificate_without_ca(
        certificatePem=test_ca.sign(attacker.new_csr()[1]), status="ACTIVE"
    )
    clients.iot.attach_thing_principal(
        thingName="dev1", principal=second["certificateArn"], thingPrincipalType="EXCLUSIVE_THING"
    )
    forged = RotationState("job1", victim.certificate_id, second["certificateId"], RotationProgress.CREATED)
    write_reported(clients, "dev1", forged.to_dict() | {"mac": "ab" * 32})
    backend.add_response("describe_job_execution", execution_response("dev1", "job1"))

    result = lambdas.commit_certificate(commit_event(attacker, "job1", second["certificateId"]), CONTEXT)

    assert result["outcome"] == "rejected"
    assert result["reason"] == "no certificate was created for job 'job1'"
    assert published()[-1] == (
        "awslabs/things/dev1/certificate/commit/rejected",
        {"errorMsg": result["reason"]},
    )
    assert read_reported(clients, "dev1")["progress"] == "created"  # untouched, still unauthenticated


@pytest.mark.filterwarnings("ignore:No application metrics")
def test_the_state_key_is_fetched_once_per_container(clients: Clients, backend: Stubber) -> None:
    device = provision(clients, "dev1")
    rotation_job(clients, "job1", device)
    fetches = calls(clients.secretsmanager, "secretsmanager.GetSecretValue")
    for _ in range(3):
        lambdas.job_execution_terminal(terminal_event(device, "job1", JobExecutionStatus.FAILED), CONTEXT)
        lambdas.job_execution_terminal({"jobId": "job1", "thingArn": "x"}, CONTEXT)  # ignored
    assert len(fetches) == 1

    reset_clients()  # a new container: new clients, new ports
    lambdas.reset_container()
    fresh = get_clients(REGION)
    assert fresh is not clients
    fresh_fetches = calls(fresh.secretsmanager, "secretsmanager.GetSecretValue")
    lambdas.job_execution_terminal(terminal_event(device, "job1", JobExecutionStatus.FAILED), CONTEXT)
    lambdas.job_execution_terminal(terminal_event(device, "job1", JobExecutionStatus.FAILED), CONTEXT)
    assert len(fresh_fetches) == 1 and len(fetches) == 1


@pytest.mark.filterwarnings("ignore:No application metrics")
def test_without_the_state_key_variable_nothing_runs(
    clients: Clients, backend: Stubber, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STATE_KEY_SECRET_ARN")
    device = provision(clients, "dev1")
    with pytest.raises(ConfigError, match="STATE_KEY_SECRET_ARN is not set"):
        lambdas.job_execution_terminal(terminal_event(device, "job1", JobExecutionStatus.FAILED), CONTEXT)
    assert notifications() == []


@pytest.mark.filterwarnings("ignore:No application metrics")
def test_a_short_state_key_stops_the_first_invocation_before_any_issuance(
    clients: Clients, backend: Stubber, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = clients.secretsmanager.create_secret(Name="short", SecretString="x" * 31)["ARN"]
    monkeypatch.setenv("STATE_KEY_SECRET_ARN", short)
    device = provision(clients, "dev1")
    with pytest.raises(ConfigError, match=r"STATE_KEY_SECRET_ARN .*31 bytes long; it must be at least 32"):
        lambdas.create_certificate(create_event(device, "job1", device.new_csr()[1]), CONTEXT)
    assert len(clients.iot.list_certificates()["certificates"]) == 1
    assert published() == []


@pytest.mark.filterwarnings("ignore:No application metrics")
def test_a_missing_secret_stops_the_first_invocation(
    clients: Clients, backend: Stubber, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE_KEY_SECRET_ARN", SECRET_ARN)  # well formed, but no such secret
    device = provision(clients, "dev1")
    with pytest.raises(ClientError, match="GetSecretValue"):
        lambdas.create_certificate(create_event(device, "job1", device.new_csr()[1]), CONTEXT)
    assert published() == []


def test_the_container_store_is_the_authenticated_shadow_store(clients: Clients, backend: Stubber) -> None:
    assert isinstance(lambdas.container_ports(CONTEXT).state, ShadowStateStore)


# ------------------------------------------------------------------------ event dicts -> typed requests
# The handlers take typed requests; these functions are the only place an event dict is parsed. They
# run here over the in-memory ports of tests/backend, which is all they touch.

CREATE = Topics.create(World.thing)
COMMIT = Topics.commit(World.thing)


def _without(event: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != key}


MALFORMED_CREATES: list[tuple[str, Any, str]] = [
    ("no jobId", lambda e: _without(e, "jobId"), "invalid jobId"),
    ("bad jobId", lambda e: e | {"jobId": "a/b"}, "invalid jobId"),
    ("no csr", lambda e: _without(e, "csr"), "'csr' must be a non-empty PEM string"),
    ("oversize csr", lambda e: e | {"csr": "A" * 17000}, "CSR exceeds 16384 bytes"),
    ("non-ASCII csr", lambda e: e | {"csr": "é"}, "'csr' must be ASCII"),
    ("no principal", lambda e: _without(e, "principal"), "lacks broker context: principal"),
    ("no clientId", lambda e: _without(e, "clientId"), "lacks broker context: clientId"),
]


@pytest.mark.parametrize(
    ("case", "change", "reason"), MALFORMED_CREATES, ids=[c[0] for c in MALFORMED_CREATES]
)
def test_a_create_event_that_does_not_parse_is_rejected_with_the_reason(
    case: str, change: Any, reason: str
) -> None:
    world = World()
    event = change(world.create_event(world.new_csr()[1]))
    result = lambdas.create_certificate_event(event, world.ports)
    assert (result.outcome, result.thing, result.job_id) == ("rejected", "dev1", None)
    assert reason in result.reason
    assert world.publisher.messages == [(f"{CREATE}/rejected", {"errorMsg": result.reason})]
    assert world.issuer.issued == [] and world.state.states == {}


def test_a_create_event_without_a_usable_thing_name_publishes_nothing() -> None:
    world = World()
    event = world.create_event(world.new_csr()[1]) | {"thingName": "bad/thing"}
    result = lambdas.create_certificate_event(event, world.ports)
    assert result.outcome == "rejected" and "invalid thing name" in result.reason
    assert world.publisher.messages == [] and world.issuer.issued == []


def test_a_create_event_that_parses_reaches_the_handler() -> None:
    world = World()
    result = lambdas.create_certificate_event(world.create_event(world.new_csr()[1]), world.ports)
    assert result.outcome == "accepted", result.reason
    assert world.publisher.messages[-1][0] == f"{CREATE}/accepted"


def test_a_commit_event_that_does_not_parse_is_rejected_with_the_reason() -> None:
    world = World()
    event = _without(world.commit_event(world.cert_id), "jobId")
    result = lambdas.commit_certificate_event(event, world.ports)
    assert result.outcome == "rejected" and "invalid jobId None" in result.reason
    assert world.publisher.messages == [(f"{COMMIT}/rejected", {"errorMsg": result.reason})]


def test_a_commit_event_that_parses_reaches_the_handler() -> None:
    world = World()
    # Over the old certificate: the handler (not the parser) refuses it.
    result = lambdas.commit_certificate_event(world.commit_event(world.cert_id), world.ports)
    assert result.outcome == "rejected" and "exactly two certificates" in result.reason
    assert world.publisher.messages == [(f"{COMMIT}/rejected", {"errorMsg": result.reason})]


@pytest.mark.parametrize("event", [{"thingArn": "nope", "jobId": "j", "status": "FAILED"}, {}])
def test_a_job_execution_event_that_does_not_parse_is_ignored(event: dict[str, Any]) -> None:
    world = World()
    result = lambdas.job_execution_terminal_event(event, world.ports)
    assert result.outcome == "ignored"
    assert world.notifier.notifications == [] and world.publisher.messages == []


def test_a_job_execution_event_that_parses_reaches_the_handler() -> None:
    world = World()
    result = lambdas.job_execution_terminal_event(
        execution_event(world.thing, world.job_id, JobExecutionStatus.FAILED), world.ports
    )
    assert result.outcome == "failed"
    assert [n.status for n in world.notifier.notifications] == ["FAILED"]
