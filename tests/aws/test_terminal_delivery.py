"""The terminal function as AWS invokes it: what an unrelated job's events cost, and at-least-once
delivery (the same event twice, a throttled first attempt, a refusal that retrying cannot fix).

Counts are of API calls made through the container's boto3 clients (moto answers; the jobs data plane,
which moto lacks, is stubbed). docs/reliability.md, "What an unrelated job's events cost", quotes them.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto.sns.models import sns_backends

from certrotator.backend.aws import lambdas
from certrotator.backend.aws.clients import Clients
from certrotator.protocol import STATUS_DETAILS_KEY, JobExecutionStatus, Topics

from .support import (
    ACCOUNT,
    REGION,
    ROTATION_DOCUMENT,
    TestCa,
    execution_response,
    provision,
    sign_csrs_for_real,
)
from .test_lambdas import CONTEXT, TOPIC_ARN

S = JobExecutionStatus
SERVICES = ("iot", "iot_data", "iot_jobs_data", "sns", "secretsmanager")


class CallLog:
    """Every API call the container's clients make, as "service.Operation"."""

    def __init__(self, clients: Clients) -> None:
        self.calls: list[str] = []
        for name in SERVICES:
            client = getattr(clients, name)
            client.meta.events.register("before-call", self._record)

    def _record(self, model: Any, **_: Any) -> None:
        self.calls.append(f"{model.service_model.service_name}.{model.name}")

    def take(self) -> list[str]:
        taken, self.calls = self.calls, []
        return taken


@pytest.fixture
def backend(clients: Clients, monkeypatch: pytest.MonkeyPatch, test_ca: TestCa) -> Iterator[Stubber]:
    arn = clients.secretsmanager.create_secret(Name="state-key", SecretString=secrets.token_urlsafe(48))[
        "ARN"
    ]
    monkeypatch.setenv("STATE_KEY_SECRET_ARN", arn)
    clients.sns.create_topic(Name="AWSLabsCertificateRotatorNotification")
    monkeypatch.setenv("SNS_TOPIC_ARN", TOPIC_ARN)
    sign_csrs_for_real(clients, test_ca)
    with Stubber(clients.iot_jobs_data) as jobs:
        yield jobs


def event(
    thing: str, job_id: str, status: JobExecutionStatus, details: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "eventType": "JOB_EXECUTION",
        "eventId": secrets.token_hex(8),
        "timestamp": 1700000000,
        "operation": status.value.lower(),
        "jobId": job_id,
        "thingArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{thing}",
        "status": status.value,
        "statusDetails": details if details is not None else {},
    }


def job(clients: Clients, job_id: str, thing: str, document: str) -> None:
    arn = clients.iot.describe_thing(thingName=thing)["thingArn"]
    clients.iot.create_job(jobId=job_id, targets=[arn], document=document)


def notifications() -> list[dict[str, Any]]:
    topic = sns_backends[ACCOUNT][REGION].topics[TOPIC_ARN]
    return [json.loads(message) for _, message, *_ in topic.sent_notifications]


def rotate(clients: Clients, backend: Stubber, thing: str, job_id: str) -> tuple[str, str]:
    """A create through the Lambda: (old, new) certificate ids."""
    device = provision(clients, thing)
    job(clients, job_id, thing, ROTATION_DOCUMENT)
    for _ in range(2):
        backend.add_response("describe_job_execution", execution_response(thing, job_id))
    request = {
        "jobId": job_id,
        "csr": device.new_csr()[1],
        "thingName": thing,
        "clientId": thing,
        "principal": device.certificate_id,
        "topic": Topics.create(thing),
    }
    result = lambdas.create_certificate(request, CONTEXT)
    assert result["outcome"] == "accepted", result
    new_id = result["reason"].removeprefix("issued ")
    return device.certificate_id, new_id


def fail_once(clients: Clients, client_name: str, operation: str, code: str, status: int) -> list[int]:
    """The next `operation` call answers `code` (after botocore's own retries, as far as the handler can
    tell); later calls go through. Returns a list that counts the refusals."""
    refused: list[int] = []

    def answer(**_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        if refused:
            return None
        refused.append(1)
        body = {
            "Error": {"Code": code, "Message": "injected"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }
        return AWSResponse("https://injected", status, {}, None), body  # type: ignore[arg-type]

    client = getattr(clients, client_name)
    service = client.meta.service_model.service_id.hyphenize()
    client.meta.events.register(f"before-call.{service}.{operation}", answer)
    return refused


# ------------------------------------------------------------------------- an unrelated job's events


@pytest.mark.filterwarnings("ignore:No application metrics")
def test_what_an_unrelated_jobs_terminal_events_cost(clients: Clients, backend: Stubber) -> None:
    """One invocation each (the rule forwards every terminal event); API calls: the container's first
    event pays its one-off set-up (the state key), then one GetJobDocument per job and container, then
    nothing. Nothing is read from the thing, nothing written, nobody notified."""
    for thing in ("t1", "t2", "t3"):
        provision(clients, thing)
        job(clients, "ota-7", thing, '{"operation":"OTA","firmware":"2.1"}')
    job(clients, "reboot-2", "t1", '{"operation":"REBOOT"}')
    log = CallLog(clients)
    costs: list[list[str]] = []
    sequence = [
        ("t1", "ota-7", S.SUCCEEDED),
        ("t2", "ota-7", S.FAILED),
        ("t3", "ota-7", S.TIMED_OUT),
        ("t1", "reboot-2", S.SUCCEEDED),
        ("t1", "reboot-2", S.SUCCEEDED),  # a redelivery
    ]
    for thing, job_id, status in sequence:
        # statusDetails as another application's device may write them, even our key: it decides nothing
        result = lambdas.job_execution_terminal(
            event(thing, job_id, status, {STATUS_DETAILS_KEY: "x"}), CONTEXT
        )
        assert result["outcome"] == "ignored"
        costs.append(log.take())

    assert costs == [
        ["secretsmanager.GetSecretValue", "iot.GetJobDocument"],  # cold container: the state key, once
        [],
        [],
        ["iot.GetJobDocument"],  # another job: one look
        [],
    ]
    assert notifications() == []


@pytest.mark.filterwarnings("ignore:No application metrics")
def test_a_rotation_jobs_terminal_event_cost(clients: Clients, backend: Stubber) -> None:
    """For comparison: a FAILED rotation (new certificate to delete), warm container."""
    rotate(clients, backend, "dev1", "rot-1")
    log = CallLog(clients)
    result = lambdas.job_execution_terminal(event("dev1", "rot-1", S.FAILED), CONTEXT)
    assert result["outcome"] == "failed"
    assert Counter(log.take()) == Counter(
        {
            "iot.GetJobDocument": 1,  # first event of this job in the container; then cached
            "iot-data.GetThingShadow": 2,  # the state, and once more before marking it terminated
            "iot.UpdateCertificate": 1,
            "iot.DetachThingPrincipal": 1,
            "iot.DeleteCertificate": 1,
            "sns.Publish": 1,
            "iot-data.UpdateThingShadow": 1,
        }
    )


# --------------------------------------------------------------------------------- at least once


@pytest.mark.filterwarnings("ignore:No application metrics")
def test_the_same_terminal_event_twice_deletes_once_and_notifies_once(
    clients: Clients, backend: Stubber
) -> None:
    old_id, new_id = rotate(clients, backend, "dev1", "rot-1")
    log = CallLog(clients)
    failed = event("dev1", "rot-1", S.FAILED)

    first = lambdas.job_execution_terminal(failed, CONTEXT)
    log.take()
    second = lambdas.job_execution_terminal(failed, CONTEXT)

    assert (first["outcome"], second["outcome"]) == ("failed", "duplicate")
    assert log.take() == ["iot-data.GetThingShadow"]  # the record says it is done: nothing else
    registry = lambdas.container_ports(CONTEXT).registry
    assert registry.exclusive_principals("dev1") == [old_id]
    assert registry.describe_certificate(new_id) is None
    assert len(notifications()) == 1


@pytest.mark.filterwarnings("ignore:No application metrics")
@pytest.mark.parametrize(
    ("client_name", "operation", "code", "status"),
    [
        ("sns", "Publish", "Throttling", 400),
        ("iot", "DeleteCertificate", "ThrottlingException", 400),
        ("iot", "UpdateCertificate", "ServiceUnavailableException", 503),
        ("iot_data", "GetThingShadow", "InternalFailureException", 500),
        ("iot", "GetJobDocument", "ThrottlingException", 400),
    ],
)
def test_a_transient_error_fails_the_invocation_and_the_retry_finishes(
    clients: Clients, backend: Stubber, client_name: str, operation: str, code: str, status: int
) -> None:
    """The invocation raises, so Lambda retries it (MaximumRetryAttempts, then the failure queue); the
    retry deletes what is left, notifies, and marks the rotation terminated."""
    old_id, new_id = rotate(clients, backend, "dev1", "rot-1")
    lambdas.reset_container()  # a fresh container, so GetJobDocument is really called
    refused = fail_once(clients, client_name, operation, code, status)
    failed = event("dev1", "rot-1", S.FAILED)

    with pytest.raises(ClientError, match=code):
        lambdas.job_execution_terminal(failed, CONTEXT)
    assert refused == [1]
    retried = lambdas.job_execution_terminal(failed, CONTEXT)

    assert retried["outcome"] == "failed"
    registry = lambdas.container_ports(CONTEXT).registry
    assert registry.exclusive_principals("dev1") == [old_id]
    assert registry.describe_certificate(new_id) is None
    assert [n["status"] for n in notifications()] == ["FAILED"]
    assert lambdas.job_execution_terminal(failed, CONTEXT)["outcome"] == "duplicate"


@pytest.mark.filterwarnings("ignore:No application metrics")
def test_a_refusal_retrying_cannot_fix_is_reported_not_retried(clients: Clients, backend: Stubber) -> None:
    _, new_id = rotate(clients, backend, "dev1", "rot-1")
    fail_once(clients, "iot", "UpdateCertificate", "UnauthorizedException", 401)

    result = lambdas.job_execution_terminal(event("dev1", "rot-1", S.TIMED_OUT), CONTEXT)

    assert result["outcome"] == "timed_out"
    (note,) = notifications()
    assert f"could not delete certificate {new_id}" in note["outcome"]
    assert note["operatorAction"] == f"delete certificate {new_id} and detach it from dev1"
    # still there, for the operator to delete; marked, so a redelivery does not report it again
    assert lambdas.container_ports(CONTEXT).registry.describe_certificate(new_id) is not None
    assert (
        lambdas.job_execution_terminal(event("dev1", "rot-1", S.TIMED_OUT), CONTEXT)["outcome"] == "duplicate"
    )
