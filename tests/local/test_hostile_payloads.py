"""Hostile payloads against the whole local IoT Core (engine + broker over real mTLS, a paho device):
every malformed request gets its `/rejected` reply with the reason, nothing is issued or changed, no
handler fails with a traceback, and the engine keeps serving."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from certrotator.local.engine import EngineConfig, LocalIoTCore
from certrotator.local.handles.thread import EngineThread
from certrotator.local.operations import JobRequest
from certrotator.local.provision import CERT_FILE, KEY_FILE, ROOT_CA_FILE, provision_thing
from certrotator.protocol import STATUS_DETAILS_KEY, JobExecutionStatus, Topics

from .mqtt_clients import Device, PahoClient, Received

pytestmark = pytest.mark.timeout(60)

THING, JOB = "hostile1", "job1"
HUGE = "9" * 5000  # over CPython's 4300-digit int(str) limit: json.loads raises a bare ValueError


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EngineThread]:
    with EngineThread(EngineConfig(tmp_path / "data", port=0)) as running:
        yield running


@pytest.fixture
def device(engine: EngineThread, tmp_path: Path) -> Iterator[PahoClient]:
    directory = tmp_path / THING

    def provision(e: LocalIoTCore) -> str:
        return provision_thing(e.registry, e.ca, THING, directory, group="g", port=e.port).certificate_id

    principal = engine.call(provision)
    client = PahoClient(
        engine.port,
        Device(THING, directory / CERT_FILE, directory / KEY_FILE, directory / ROOT_CA_FILE, principal),
    )
    assert client.connect() == 0
    assert all(not r.is_failure for r in client.subscribe(*Topics.device_subscriptions(THING)))
    yield client
    client.close()


@pytest.fixture
def in_progress(engine: EngineThread, device: PahoClient) -> PahoClient:
    """The device holds an IN_PROGRESS rotation execution, so only the payload can be wrong."""
    engine.create_job(JobRequest(JOB, things=(THING,), unlimited_rollout=True))
    assert device.next_message().topic == Topics.notify_next(THING)
    reply = ask(device, Topics.job_update(THING, JOB), b'{"status":"IN_PROGRESS"}')
    assert reply.topic == Topics.accepted(Topics.job_update(THING, JOB))
    return device


def ask(client: PahoClient, topic: str, payload: bytes) -> Received:
    client.publish(topic, payload)
    return client.next_message()


def _execution_version(engine: EngineThread) -> tuple[JobExecutionStatus, int]:
    def read(e: LocalIoTCore) -> tuple[JobExecutionStatus, int]:
        execution = e.jobs.execution(THING, JOB)
        assert execution is not None
        return execution.status, execution.version

    return engine.call(read)


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if anything logged at ERROR: the engine logs a handler that raised that way
    (with its traceback) and then answers nothing."""
    caplog.set_level(logging.INFO)
    yield
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (
            Topics.create(THING),
            f'{{"jobId":"{JOB}","csr":"x","n":{HUGE}}}',
            "create-certificate request: payload has an unacceptable number: an integer of 5000 digits",
        ),
        (
            Topics.create(THING),
            f'{{"jobId":"{JOB}","csr":"x","n":-{HUGE}}}',
            "create-certificate request: payload has an unacceptable number: an integer of 5000 digits",
        ),
        (
            Topics.create(THING),
            f'{{"jobId":"{JOB}","csr":"x","n":NaN}}',
            "create-certificate request: payload has an unacceptable number: NaN is not a JSON value",
        ),
        (
            Topics.commit(THING),
            f'{{"jobId":"{JOB}","n":[{HUGE}]}}',
            "commit-certificate request: payload has an unacceptable number: an integer of 5000 digits",
        ),
        (
            Topics.commit(THING),
            f'{{"jobId":"{JOB}","n":1e999}}',
            "commit-certificate request: payload has an unacceptable number: the number 1e999 is out of range",
        ),
    ],
)
def test_certificate_requests_with_unparseable_numbers_are_rejected_with_the_reason(
    engine: EngineThread,
    in_progress: PahoClient,
    no_tracebacks: None,
    topic: str,
    payload: str,
    reason: str,
) -> None:
    reply = ask(in_progress, topic, payload.encode())
    assert reply.topic == Topics.rejected(topic)
    assert json.loads(reply.payload)["errorMsg"].startswith(reason)
    assert len(engine.call(lambda e: e.registry.certificates())) == 1  # nothing issued
    assert _execution_version(engine) == (JobExecutionStatus.IN_PROGRESS, 2)
    _still_serving(in_progress)


@pytest.mark.parametrize(
    "payload",
    [
        f'{{"status":"SUCCEEDED","expectedVersion":{HUGE}}}',
        f'{{"status":"SUCCEEDED","statusDetails":{{"{STATUS_DETAILS_KEY}":{HUGE}}}}}',
        '{"status":"SUCCEEDED","stepTimeoutInMinutes":Infinity}',
    ],
)
def test_jobs_updates_with_unparseable_numbers_are_rejected_and_change_nothing(
    engine: EngineThread, in_progress: PahoClient, no_tracebacks: None, payload: str
) -> None:
    update = Topics.job_update(THING, JOB)
    reply = ask(in_progress, update, payload.encode())
    assert reply.topic == Topics.rejected(update)
    body = json.loads(reply.payload)
    assert body["code"] == "InvalidRequest"
    assert body["message"].startswith("jobs request: payload has an unacceptable number")
    assert _execution_version(engine) == (JobExecutionStatus.IN_PROGRESS, 2)
    _still_serving(in_progress)


def test_a_flood_of_huge_numbers_is_answered_and_the_engine_keeps_serving(
    engine: EngineThread, device: PahoClient, no_tracebacks: None
) -> None:
    """Near the 128 KiB payload limit, every message one huge integer: each answered, none crashes."""
    payload = b'{"jobId":"' + JOB.encode() + b'","csr":"x","n":' + b"9" * 120_000 + b"}"
    for _ in range(5):
        device.publish(Topics.create(THING), payload)
    for _ in range(5):
        reply = device.next_message()
        assert reply.topic == Topics.rejected(Topics.create(THING))
        assert "an integer of 120000 digits" in json.loads(reply.payload)["errorMsg"]
    _still_serving(device)


def test_the_seeds_boolean_status_details_are_accepted_and_stored_as_strings(
    engine: EngineThread, device: PahoClient
) -> None:
    """The seed's component sends {"CertificateRotator": true}; AWS IoT accepts it (FACTS.md)."""
    engine.create_job(JobRequest(JOB, things=(THING,), unlimited_rollout=True))
    assert device.next_message().topic == Topics.notify_next(THING)
    update = Topics.job_update(THING, JOB)
    payload = json.dumps({"status": "IN_PROGRESS", "statusDetails": {STATUS_DETAILS_KEY: True}}).encode()
    assert ask(device, update, payload).topic == Topics.accepted(update)

    def details(e: LocalIoTCore) -> dict[str, str]:
        execution = e.jobs.execution(THING, JOB)
        assert execution is not None
        return dict(execution.status_details)

    assert engine.call(details) == {STATUS_DETAILS_KEY: "true"}


def _still_serving(client: PahoClient) -> None:
    """A well-formed request right after still gets its normal answer."""
    get = Topics.next_get(THING)
    assert ask(client, get, b"{}").topic == Topics.accepted(get)
