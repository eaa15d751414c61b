"""The AWS pieces the terminal handler's redesign added: which errors are worth retrying, the job
document look-up, and an execution the jobs data plane no longer describes because it has ended."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)
from botocore.stub import Stubber

from certrotator.backend.aws.adapters import IotJobDocuments, IotJobsData
from certrotator.backend.aws.clients import Clients, is_transient
from certrotator.protocol import JOB_DOCUMENT, JobExecutionStatus

from .support import ROTATION_DOCUMENT, provision


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (client_error("ThrottlingException", 400), True),
        (client_error("TooManyRequestsException", 429), True),
        (client_error("Throttling", 400), True),  # the query protocols' spelling (SNS)
        (client_error("ServiceUnavailableException", 503), True),
        (client_error("InternalFailure", 500), True),
        (client_error("SomethingNew", 502), True),  # any 5xx
        (client_error("RequestTimeoutException", 408), True),
        (EndpointConnectionError(endpoint_url="https://iot"), True),
        (ConnectTimeoutError(endpoint_url="https://iot"), True),
        (ReadTimeoutError(endpoint_url="https://iot"), True),
        (client_error("AccessDeniedException", 403), False),
        (client_error("UnauthorizedException", 401), False),
        (client_error("InvalidRequestException", 400), False),
        (client_error("DeleteConflictException", 409), False),
        (client_error("ResourceNotFoundException", 404), False),
        (client_error("KMSAccessDeniedException", 400), False),
        (NoCredentialsError(), False),
        (ParamValidationError(report="bad"), False),
        (ValueError("a bug"), False),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, bool) else str(v),
)
def test_which_errors_are_worth_retrying(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


# ------------------------------------------------------------------------------------ job documents


def test_job_document_by_job_id(clients: Clients) -> None:
    device = provision(clients, "dev1")
    arn = clients.iot.describe_thing(thingName=device.thing)["thingArn"]
    clients.iot.create_job(jobId="rot-1", targets=[arn], document=ROTATION_DOCUMENT)
    clients.iot.create_job(jobId="ota-1", targets=[arn], document='{"operation":"OTA","url":"x"}')
    clients.iot.create_job(jobId="raw-1", targets=[arn], document="not json")
    documents = IotJobDocuments(clients)
    assert documents.document("dev1", "rot-1") == JOB_DOCUMENT
    assert documents.document("dev1", "ota-1") == {"operation": "OTA", "url": "x"}
    assert documents.document("dev1", "raw-1") == "not json"  # certainly not a rotation, and known


def test_job_document_of_a_deleted_job_is_none(clients: Clients) -> None:
    with Stubber(clients.iot) as stub:  # moto answers an unknown job id with a 500
        stub.add_client_error("get_job_document", "ResourceNotFoundException", http_status_code=404)
        assert IotJobDocuments(clients).document("dev1", "deleted") is None


def test_job_document_does_not_hide_throttling(clients: Clients) -> None:
    with Stubber(clients.iot) as stub:
        stub.add_client_error("get_job_document", "ThrottlingException", http_status_code=400)
        with pytest.raises(ClientError, match="ThrottlingException"):
            IotJobDocuments(clients).document("dev1", "rot-1")


# ---------------------------------------------------------------------------- an execution that ended


def test_an_ended_execution_the_data_plane_refuses_is_described_by_the_control_plane(
    clients: Clients, jobs_stub: Stubber
) -> None:
    device = provision(clients, "dev1")
    arn = clients.iot.describe_thing(thingName=device.thing)["thingArn"]
    clients.iot.create_job(jobId="rot-1", targets=[arn], document=ROTATION_DOCUMENT)
    clients.iot.cancel_job_execution(jobId="rot-1", thingName="dev1", force=True)
    jobs_stub.add_client_error("describe_job_execution", "TerminalStateException", http_status_code=410)

    execution = IotJobsData(clients).describe_execution("dev1", "rot-1")

    assert execution is not None
    assert execution.status is JobExecutionStatus.CANCELED
    assert execution.document is None  # not needed: only an IN_PROGRESS execution is acted on


def test_an_ended_execution_that_is_gone_altogether_is_none(clients: Clients, jobs_stub: Stubber) -> None:
    jobs_stub.add_client_error("describe_job_execution", "TerminalStateException", http_status_code=410)
    assert IotJobsData(clients).describe_execution("dev1", "deleted-job") is None


def test_rotation_document_constant_matches_the_protocol() -> None:
    assert json.loads(ROTATION_DOCUMENT) == JOB_DOCUMENT
