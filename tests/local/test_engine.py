"""The engine over real mTLS with scripted devices (paho): Jobs API, rules, bad input, timeouts,
certificate status changes and restarts."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from certrotator import crypto
from certrotator.backend.ports import CertificateStatus
from certrotator.local.adapters import Outbox
from certrotator.local.db import Database
from certrotator.local.engine import EngineConfig, LocalIoTCore
from certrotator.local.handles.thread import EngineThread
from certrotator.local.operations import JobRequest
from certrotator.local.provision import CERT_FILE, KEY_FILE, ROOT_CA_FILE, provision_thing
from certrotator.local.registry import LocalRegistry
from certrotator.protocol import JOB_DOCUMENT, JobExecutionStatus, Topics

from .mqtt_clients import Device, PahoClient, Received

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EngineThread]:
    with EngineThread(EngineConfig(tmp_path / "data", port=0)) as running:
        yield running


def provision(engine: EngineThread, root: Path, thing: str, group: str = "g") -> Device:
    directory = root / thing

    def make(e: LocalIoTCore) -> str:
        return provision_thing(e.registry, e.ca, thing, directory, group=group, port=e.port).certificate_id

    cert_id = engine.call(make)
    return Device(thing, directory / CERT_FILE, directory / KEY_FILE, directory / ROOT_CA_FILE, cert_id)


@pytest.fixture
def device(engine: EngineThread, tmp_path: Path) -> Iterator[PahoClient]:
    client = connected(engine, provision(engine, tmp_path, "dev1"))
    yield client
    client.close()


def connected(engine: EngineThread, device: Device) -> PahoClient:
    client = PahoClient(engine.port, device)
    assert client.connect() == 0
    assert all(not r.is_failure for r in client.subscribe(*Topics.device_subscriptions(device.thing)))
    return client


def ask(client: PahoClient, topic: str, body: object) -> Received:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    client.publish(topic, payload)
    return client.next_message()


def test_jobs_api_over_mqtt(engine: EngineThread, device: PahoClient) -> None:
    engine.call(lambda e: e.create_job(JobRequest("job1", things=("dev1",), unlimited_rollout=True)))
    notify = device.next_message()
    assert notify.topic == Topics.notify_next("dev1")
    assert json.loads(notify.payload)["execution"]["jobId"] == "job1"

    got = ask(device, Topics.next_get("dev1"), {"clientToken": "t"})
    assert got.topic == Topics.accepted(Topics.next_get("dev1"))
    execution = json.loads(got.payload)["execution"]
    assert (execution["status"], execution["jobDocument"]) == ("QUEUED", JOB_DOCUMENT)

    update = Topics.job_update("dev1", "job1")
    reply = ask(device, update, {"status": "IN_PROGRESS", "statusDetails": {"CertificateRotator": "x"}})
    assert reply.topic == Topics.accepted(update)
    reply = ask(device, update, {"status": "QUEUED"})
    assert reply.topic == Topics.rejected(update)
    assert json.loads(reply.payload)["code"] == "InvalidStateTransition"

    reply = ask(device, update, {"status": "SUCCEEDED", "statusDetails": {"CertificateRotator": "done"}})
    assert reply.topic == Topics.accepted(update)
    after = device.next_message()
    assert after.topic == Topics.notify_next("dev1")
    assert "execution" not in json.loads(after.payload)
    job = engine.call(lambda e: e.jobs.job("job1"))
    assert job is not None and job["status"] == "COMPLETED"
    # SUCCEEDED without a committed rotation is a contradiction the terminal rule reports
    notes = engine.call(lambda e: e.registry.notifications())
    assert [n["status"] for n in notes] == ["SUCCEEDED"]
    assert "contradiction" in notes[0]["outcome"]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{nope", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"jobId": "job1"}).encode(), "'csr' must be a non-empty PEM string"),
        (json.dumps({"jobId": "nosuchjob", "csr": "x"}).encode(), "has no execution of job 'nosuchjob'"),
        (json.dumps({"jobId": "job1", "csr": "A" * 100_000}).encode(), "CSR exceeds 16384 bytes"),
    ],
)
def test_bad_create_requests_get_reasons_and_issue_nothing(
    engine: EngineThread, device: PahoClient, payload: bytes, reason: str
) -> None:
    reply = ask(device, Topics.create("dev1"), payload)
    assert reply.topic == Topics.rejected(Topics.create("dev1"))
    assert reason in json.loads(reply.payload)["errorMsg"]
    assert len(engine.call(lambda e: e.registry.certificates())) == 1


def test_a_payload_over_the_mqtt_limit_disconnects_and_issues_nothing(
    engine: EngineThread, device: PahoClient
) -> None:
    device.publish(Topics.create("dev1"), b"x" * 200_000)  # AWS IoT's limit is 128 KiB
    assert device.disconnected.wait(10)
    assert len(engine.call(lambda e: e.registry.certificates())) == 1


def test_unknown_jobs_and_other_things_topics(
    engine: EngineThread, device: PahoClient, tmp_path: Path
) -> None:
    other = connected(engine, provision(engine, tmp_path, "dev2"))
    try:
        reply = ask(device, Topics.job_update("dev1", "ghost"), {"status": "IN_PROGRESS"})
        assert json.loads(reply.payload)["code"] == "ResourceNotFound"
        # publishing on another thing's topic disconnects the publisher, as AWS IoT does
        device.publish(Topics.job_update("dev2", "ghost"), b"{}")
        assert device.disconnected.wait(10)
        # ... and the engine keeps serving everyone else
        reply = ask(other, Topics.next_get("dev2"), {})
        assert reply.topic == Topics.accepted(Topics.next_get("dev2"))
    finally:
        other.close()


def test_disabled_create_rule_drops_requests(engine: EngineThread, device: PahoClient) -> None:
    engine.call(lambda e: e.set_rule_enabled("create", False))
    device.publish(Topics.create("dev1"), json.dumps({"jobId": "job1", "csr": "x"}).encode())
    # a marker request proves the create was processed (and dropped) before it
    reply = ask(device, Topics.next_get("dev1"), {})
    assert reply.topic == Topics.accepted(Topics.next_get("dev1"))
    assert engine.call(lambda e: e.rule_enabled("create")) is False
    assert engine.call(lambda e: e.registry.rule_enabled("create")) is False


def test_in_progress_timeout_times_out_and_notifies(engine: EngineThread, device: PahoClient) -> None:
    engine.call(
        lambda e: e.create_job(
            JobRequest("slow", things=("dev1",), unlimited_rollout=True, in_progress_timeout_minutes=0.5 / 60)
        )
    )
    device.next_message()  # notify-next
    ask(
        device,
        Topics.job_update("dev1", "slow"),
        {"status": "IN_PROGRESS", "statusDetails": {"CertificateRotator": "UpdatingJob"}},
    )

    def timed_out(e: LocalIoTCore) -> bool:
        execution = e.jobs.execution("dev1", "slow")
        return execution is not None and execution.status is JobExecutionStatus.TIMED_OUT

    assert engine.wait_until(timed_out, 10)
    notes = engine.call(lambda e: e.registry.notifications())
    assert [(n["status"], n["thingName"]) for n in notes] == [("TIMED_OUT", "dev1")]
    lines = (engine.config.data_dir / "notifications.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["jobId"] == "slow"


def test_rollout_rate_is_honoured(engine: EngineThread, tmp_path: Path) -> None:
    for thing in ("r1", "r2", "r3"):
        provision(engine, tmp_path, thing, group="rollout")
    engine.call(lambda e: e.create_job(JobRequest("rated", groups=("rollout",), max_per_minute=1)))
    counts = engine.call(lambda e: e.jobs.status_counts("rated"))
    assert counts == {"QUEUED": 1, "PENDING_ROLLOUT": 2}


def test_deactivating_a_certificate_disconnects_and_refuses_it(engine: EngineThread, tmp_path: Path) -> None:
    dev = provision(engine, tmp_path, "dev3")
    client = connected(engine, dev)
    try:
        engine.call(lambda e: e.set_certificate_status(dev.principal, CertificateStatus.INACTIVE))
        assert client.disconnected.wait(10)
    finally:
        client.close()
    again = PahoClient(engine.port, dev)
    try:
        assert str(again.connect()) == "Not authorized"
    finally:
        again.close()


def test_state_survives_an_engine_restart(tmp_path: Path) -> None:
    config = EngineConfig(tmp_path / "data", port=0)
    with EngineThread(config) as first:
        dev = provision(first, tmp_path, "keeper")
        client = connected(first, dev)
        first.call(
            lambda e: e.create_job(
                JobRequest("kept", things=("keeper",), unlimited_rollout=True, in_progress_timeout_minutes=1)
            )
        )
        client.next_message()
        ask(
            client,
            Topics.job_update("keeper", "kept"),
            {"status": "IN_PROGRESS", "statusDetails": {"CertificateRotator": "x"}},
        )
        client.close()
    with EngineThread(config) as second:
        things = second.call(lambda e: e.registry.things())
        execution = second.call(lambda e: e.jobs.execution("keeper", "kept"))
        cert = second.call(lambda e: e.registry.certificate(dev.principal))
        assert things == ["keeper"]
        assert execution is not None and execution.status is JobExecutionStatus.IN_PROGRESS
        assert execution.version == 2 and execution.status_details == {"CertificateRotator": "x"}
        assert cert is not None and cert.status is CertificateStatus.ACTIVE
        # the CA is reused, not regenerated: the old device certificate still connects
        client = connected(second, dev)
        reply = ask(client, Topics.next_get("keeper"), {})
        assert json.loads(reply.payload)["execution"]["jobId"] == "kept"
        client.close()
        assert crypto.certificate_id(dev.cert_path.read_bytes()) == dev.principal


def test_admission_bounds_executions_in_flight_whatever_the_rate(tmp_path: Path) -> None:
    with EngineThread(EngineConfig(tmp_path / "data", port=0, max_in_flight=2)) as engine:
        devices = [provision(engine, tmp_path, f"adm{i}") for i in range(4)]
        client = connected(engine, devices[0])
        try:
            request = JobRequest("admitted", things=tuple(d.thing for d in devices), unlimited_rollout=True)
            engine.call(lambda e: e.create_job(request))
            assert engine.call(lambda e: e.jobs.status_counts("admitted")) == {
                "QUEUED": 2,
                "PENDING_ROLLOUT": 2,
            }
            assert json.loads(client.next_message().payload)["execution"]["jobId"] == "admitted"

            # A terminal execution frees its slot at once.
            update = Topics.job_update("adm0", "admitted")
            assert ask(client, update, {"status": "SUCCEEDED"}).topic == Topics.accepted(update)
            expected = {"SUCCEEDED": 1, "QUEUED": 2, "PENDING_ROLLOUT": 1}
            assert engine.wait_until(lambda e: e.jobs.status_counts("admitted") == expected, 10)
        finally:
            client.close()


def test_an_absent_device_holds_its_admission_slot_only_for_the_window(tmp_path: Path) -> None:
    window = 0.3
    config = EngineConfig(tmp_path / "data", port=0, max_in_flight=2, admission_window_s=window)
    with EngineThread(config) as engine:
        things = tuple(provision(engine, tmp_path, f"away{i}").thing for i in range(4))
        engine.call(lambda e: e.create_job(JobRequest("absent", things=things, unlimited_rollout=True)))
        # No device is connected, so no execution ends; the rollout still goes on, two at a time.
        done = engine.wait_for(
            lambda: engine.call(lambda e: e.jobs.status_counts("absent")) == {"QUEUED": 4}, 10, tick_s=0.05
        )
        assert done
        queued = sorted(e.queued_at for e in engine.call(lambda e: e.jobs.executions("absent")))
        assert queued[1] - queued[0] < window  # the first two together ...
        assert queued[2] - queued[0] >= window  # ... the next only once their window had passed


def test_admission_limit_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_in_flight must be at least 1"):
        EngineConfig(tmp_path, max_in_flight=0)
    with pytest.raises(ValueError, match="admission_window_s must be positive"):
        EngineConfig(tmp_path, admission_window_s=0)
    assert EngineConfig(tmp_path, max_in_flight=None).max_in_flight is None


def test_admission_is_engine_wide_across_jobs(tmp_path: Path) -> None:
    with EngineThread(EngineConfig(tmp_path / "data", port=0, max_in_flight=2)) as engine:
        devices = [provision(engine, tmp_path, f"wide{i}") for i in range(3)]
        client = connected(engine, devices[0])
        try:
            engine.call(
                lambda e: e.create_job(JobRequest("first", ("wide0", "wide1"), unlimited_rollout=True))
            )
            engine.call(lambda e: e.create_job(JobRequest("second", ("wide2",), unlimited_rollout=True)))
            assert engine.call(lambda e: e.jobs.status_counts("second")) == {"PENDING_ROLLOUT": 1}
            client.next_message()  # notify-next of "first"

            update = Topics.job_update("wide0", "first")
            assert ask(client, update, {"status": "SUCCEEDED"}).topic == Topics.accepted(update)
            assert engine.wait_until(lambda e: e.jobs.status_counts("second") == {"QUEUED": 1}, 10)
        finally:
            client.close()


def test_what_a_unit_of_work_publishes_goes_out_once_its_transaction_committed(tmp_path: Path) -> None:
    db = Database(tmp_path)
    registry = LocalRegistry(db)
    reader = sqlite3.connect(db.path)  # another connection sees only what is committed
    sent: list[tuple[str, bytes, int, bool | None]] = []

    def send(topic: str, payload: bytes, qos: int) -> None:
        row = reader.execute("SELECT enabled FROM rules WHERE name = 'create'").fetchone()
        sent.append((topic, payload, qos, None if row is None else bool(row[0])))

    outbox = Outbox(send)
    try:
        with outbox.holding(), db.batch():
            registry.set_rule_enabled("create", False)
            outbox.publish("t/1", {"n": 1})
            outbox.publish("t/2", {"n": 2})
            assert sent == []
        assert sent == [("t/1", b'{"n":1}', 0, False), ("t/2", b'{"n":2}', 0, False)]

        with pytest.raises(RuntimeError), outbox.holding():
            outbox.publish("t/3", {})
            raise RuntimeError("the commit failed")
        assert [topic for topic, *_ in sent] == ["t/1", "t/2"]  # a failed unit publishes nothing

        outbox.publish("t/4", {})  # outside a unit of work (timers, admin): at once
        assert sent[-1][0] == "t/4"
    finally:
        reader.close()
        db.close()
