"""The local IoT Core after outages and lost events (issue 12), with the real engine over mTLS and
scripted devices (paho): a subscriber is told its current job, stuck executions end, the terminal rule
takes every terminal execution whatever the device wrote, and terminal work is done at least once
(recorded with the status change, retried, finished after a restart)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from certrotator import crypto
from certrotator.backend.ports import Notification
from certrotator.local.db import Database
from certrotator.local.engine import EngineConfig, LocalIoTCore
from certrotator.local.handles.thread import EngineThread
from certrotator.local.jobs import DEFAULT_TEMPLATE, JobConfig, JobError, JobStore
from certrotator.local.operations import JobRequest, create_job
from certrotator.local.provision import CERT_FILE, KEY_FILE, ROOT_CA_FILE, provision_thing
from certrotator.local.registry import LocalRegistry
from certrotator.local.terminal_work import RetryPolicy, TerminalWorkStore
from certrotator.protocol import JOB_DOCUMENT, JobExecutionStatus, Topics

from .mqtt_clients import Device, PahoClient, Received

pytestmark = pytest.mark.timeout(60)

S = JobExecutionStatus
FAST_RETRY = RetryPolicy(first_delay_s=0.02, max_delay_s=0.05, tries=3)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EngineThread]:
    with EngineThread(EngineConfig(tmp_path / "data", port=0, terminal_retry=FAST_RETRY)) as running:
        yield running


def provision(engine: EngineThread, root: Path, thing: str) -> Device:
    directory = root / thing

    def make(e: LocalIoTCore) -> str:
        return provision_thing(e.registry, e.ca, thing, directory, group="g", port=e.port).certificate_id

    cert_id = engine.call(make)
    return Device(thing, directory / CERT_FILE, directory / KEY_FILE, directory / ROOT_CA_FILE, cert_id)


def connect(engine: EngineThread, device: Device, client_id: str | None = None) -> PahoClient:
    client = PahoClient(engine.port, device, client_id=client_id)
    assert client.connect() == 0
    assert all(not r.is_failure for r in client.subscribe(*Topics.device_subscriptions(device.thing)))
    return client


def ask(client: PahoClient, topic: str, body: dict[str, Any]) -> Received:
    client.publish(topic, json.dumps(body).encode())
    return client.next_message()


def execution_of(message: Received) -> dict[str, Any]:
    body = json.loads(message.payload)
    assert "execution" in body, body
    execution: dict[str, Any] = body["execution"]
    return execution


def take(client: PahoClient, thing: str, job_id: str) -> None:
    """IN_PROGRESS, with no statusDetails at all (nothing the backend may rely on)."""
    update = Topics.job_update(thing, job_id)
    assert ask(client, update, {"status": "IN_PROGRESS"}).topic == Topics.accepted(update)


def create_certificate(client: PahoClient, thing: str, job_id: str) -> str:
    """The create request of a rotation: a new key's CSR; returns the issued certificate's id."""
    key = crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P256)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, thing)])
    csr = crypto.build_csr(key, crypto.SigningAlgorithm.ECDSA_WITH_SHA256, subject)
    reply = ask(client, Topics.create(thing), {"jobId": job_id, "csr": csr})
    assert reply.topic == Topics.accepted(Topics.create(thing)), reply.payload
    return crypto.certificate_id(json.loads(reply.payload)["certificatePem"])


def attached(engine: EngineThread, thing: str) -> list[str]:
    return engine.call(lambda e: e.registry.thing_principals(thing))


def pending_work(engine: EngineThread) -> list[tuple[str, str, int]]:
    return engine.call(lambda e: [(w.thing, w.job_id, w.attempts) for w in e.terminal_work.store.pending()])


def job(job_id: str, *things: str, timeout_s: float | None = None) -> JobRequest:
    minutes = timeout_s / 60 if timeout_s is not None else None
    return JobRequest(job_id, things=things, unlimited_rollout=True, in_progress_timeout_minutes=minutes)


# ------------------------------------------------------------------ a subscriber is told its job


def test_a_device_that_subscribes_is_told_its_queued_job_right_after_the_suback(
    engine: EngineThread, tmp_path: Path
) -> None:
    """Released while the device was away: its notify-next reached nobody (QoS 0, clean session)."""
    device = provision(engine, tmp_path, "away")
    engine.create_job(job("while-away", "away"))
    client = connect(engine, device)
    try:
        told = client.next_message()
        assert told.topic == Topics.notify_next("away")
        execution = execution_of(told)
        assert (execution["jobId"], execution["status"], execution["jobDocument"]) == (
            "while-away",
            "QUEUED",
            JOB_DOCUMENT,
        )
    finally:
        client.close()


def test_a_device_that_reconnects_mid_rotation_is_told_its_in_progress_job(
    engine: EngineThread, tmp_path: Path
) -> None:
    device = provision(engine, tmp_path, "midway")
    first = connect(engine, device)
    engine.create_job(job("midway-job", "midway"))
    assert first.next_message().topic == Topics.notify_next("midway")
    take(first, "midway", "midway-job")
    first.close()
    again = connect(engine, device)
    try:
        execution = execution_of(again.next_message())
        assert (execution["jobId"], execution["status"]) == ("midway-job", "IN_PROGRESS")
    finally:
        again.close()


def test_nothing_is_sent_on_subscribe_to_a_thing_without_a_job_nor_to_its_other_clients(
    engine: EngineThread, tmp_path: Path
) -> None:
    device = provision(engine, tmp_path, "quiet")
    main = connect(engine, device)
    try:
        # no job: the first message is the reply to a marker request, nothing before it
        reply = ask(main, Topics.next_get("quiet"), {})
        assert reply.topic == Topics.accepted(Topics.next_get("quiet"))
        engine.create_job(job("later", "quiet"))
        assert main.next_message().topic == Topics.notify_next("quiet")  # the release's own notify
        # a second client of the thing (Greengrass-style id) is told; the first is not told again
        component = connect(engine, device, client_id="quiet#component")
        try:
            assert execution_of(component.next_message())["jobId"] == "later"
            reply = ask(main, Topics.next_get("quiet"), {})
            assert reply.topic == Topics.accepted(Topics.next_get("quiet"))
        finally:
            component.close()
    finally:
        main.close()


# --------------------------------------------------------------------- stuck executions end


def test_every_rotation_job_gets_an_in_progress_timeout_even_from_a_template_without_one(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path)
    try:
        registry, store = LocalRegistry(db), JobStore(db)
        store.ensure_default_template()
        registry.create_thing("t1")
        store.put_template("NoTimeout", dict(JOB_DOCUMENT), JobConfig(in_progress_timeout_s=None))
        store.put_template("Other", {"operation": "SOMETHING_ELSE"}, JobConfig(in_progress_timeout_s=None))
        create_job(registry, store, JobRequest("rot", things=("t1",), template="NoTimeout"))
        create_job(registry, store, JobRequest("other", things=("t1",), template="Other"))
        default = store.template(DEFAULT_TEMPLATE)
        assert default is not None
        rotation = store.config("rot")
        assert rotation is not None and rotation.in_progress_timeout_s == default[1].in_progress_timeout_s
        other = store.config("other")
        assert other is not None and other.in_progress_timeout_s is None  # not ours to decide
    finally:
        db.close()


def test_a_stuck_in_progress_head_times_out_and_the_things_next_job_is_offered(
    engine: EngineThread, tmp_path: Path
) -> None:
    """The stuck job comes from a template without a timeout: it gets the default template's."""
    device = provision(engine, tmp_path, "stuck")

    def templates(e: LocalIoTCore) -> None:
        e.jobs.put_template(DEFAULT_TEMPLATE, dict(JOB_DOCUMENT), JobConfig(in_progress_timeout_s=0.3))
        e.jobs.put_template("NoTimeout", dict(JOB_DOCUMENT), JobConfig(in_progress_timeout_s=None))

    engine.call(templates)
    client = connect(engine, device)
    try:
        engine.create_job(
            JobRequest("first", things=("stuck",), template="NoTimeout", unlimited_rollout=True)
        )
        assert execution_of(client.next_message())["jobId"] == "first"
        take(client, "stuck", "first")
        engine.create_job(job("second", "stuck"))  # queued behind the stuck head: no notify-next yet
        told = client.next_message()  # the timeout ends the head; the next job is offered
        assert told.topic == Topics.notify_next("stuck")
        assert (execution_of(told)["jobId"], execution_of(told)["status"]) == ("second", "QUEUED")
        assert engine.call(lambda e: e.jobs.execution("stuck", "first")).status is S.TIMED_OUT
    finally:
        client.close()


def test_timeouts_that_fell_due_while_the_engine_was_down_end_at_start_up(tmp_path: Path) -> None:
    config = EngineConfig(tmp_path / "data", port=0)
    with EngineThread(config) as first:
        device = provision(first, tmp_path, "sleeper")
        client = connect(first, device)
        first.create_job(job("overdue", "sleeper", timeout_s=60))
        client.next_message()
        take(client, "sleeper", "overdue")
        client.close()
    db = Database(config.data_dir)  # the engine is down for longer than the timeout
    try:
        with db.transaction() as conn:
            conn.execute("UPDATE job_executions SET timeout_at = timeout_at - 120")
    finally:
        db.close()
    with EngineThread(config) as second:
        execution = second.call(lambda e: e.jobs.execution("sleeper", "overdue"))
        assert execution is not None and execution.status is S.TIMED_OUT
        notes = second.call(lambda e: e.registry.notifications())
        assert [(n["thingName"], n["status"]) for n in notes] == [("sleeper", "TIMED_OUT")]
        assert pending_work(second) == []


# ------------------------------------------------- the terminal rule takes every terminal execution


@pytest.mark.parametrize("ending", ["FAILED", "TIMED_OUT"])
def test_a_rotation_that_ends_without_the_devices_status_details_still_retires_the_new_certificate(
    engine: EngineThread, tmp_path: Path, ending: str
) -> None:
    device = provision(engine, tmp_path, "plain")
    client = connect(engine, device)
    try:
        engine.create_job(job("plain-job", "plain", timeout_s=0.5 if ending == "TIMED_OUT" else None))
        client.next_message()
        take(client, "plain", "plain-job")
        new = create_certificate(client, "plain", "plain-job")
        assert sorted(attached(engine, "plain")) == sorted([device.principal, new])
        if ending == "FAILED":
            update = Topics.job_update("plain", "plain-job")
            assert ask(client, update, {"status": "FAILED"}).topic == Topics.accepted(update)

        def retired(e: LocalIoTCore) -> bool:
            return (
                e.registry.thing_principals("plain") == [device.principal]
                and e.registry.certificate(new) is None
            )

        assert engine.wait_until(retired, 10, tick_s=0.02)
        assert engine.call(lambda e: e.jobs.execution("plain", "plain-job")).status is S(ending)
        notes = engine.call(lambda e: e.registry.notifications())
        assert [(n["thingName"], n["status"]) for n in notes] == [("plain", ending)]
    finally:
        client.close()


# --------------------------------------------------------------- at-least-once terminal work


def test_terminal_work_is_recorded_in_the_transaction_of_the_terminal_status(tmp_path: Path) -> None:
    db = Database(tmp_path)
    try:
        registry, store, work = LocalRegistry(db), JobStore(db), TerminalWorkStore(db)
        store.ensure_default_template()
        for thing in ("a", "b", "c"):
            registry.create_thing(thing)
        create_job(registry, store, JobRequest("j", things=("a", "b", "c")))
        store.release("j", 3, 0.0)
        a = store.execution("a", "j")
        assert a is not None
        running = replace(a, status=S.IN_PROGRESS, version=2)
        store.save_execution(running, 1)
        assert work.pending() == []  # not terminal: nothing to do
        with pytest.raises(JobError):  # a lost race writes nothing, the work neither
            store.save_execution(replace(running, status=S.SUCCEEDED, version=3), 1)
        assert work.pending() == []
        with pytest.raises(RuntimeError), db.transaction():  # rolled back: the work with it
            store.save_execution(replace(running, status=S.SUCCEEDED, version=3), 2)
            raise RuntimeError("the transaction fails")
        assert work.pending() == []
        done = replace(running, status=S.SUCCEEDED, status_details={"k": "v"}, version=3)
        store.save_execution(done, 2)
        assert [(w.thing, w.status, w.status_details) for w in work.pending()] == [
            ("a", S.SUCCEEDED, {"k": "v"})
        ]
        store.cancel("j", False, 1.0)  # canceled executions are terminal too
        assert sorted((w.thing, w.status) for w in work.pending()) == [
            ("a", S.SUCCEEDED),
            ("b", S.CANCELED),
            ("c", S.CANCELED),
        ]
    finally:
        db.close()


def test_a_failing_terminal_handler_keeps_its_work_and_is_retried_until_it_succeeds(
    engine: EngineThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = provision(engine, tmp_path, "flaky")
    failures = [RuntimeError("SNS is throttling"), RuntimeError("SNS is throttling again")]

    def sabotage(e: LocalIoTCore) -> None:
        notify = e.notifier.notify

        def flaky(notification: Notification) -> None:
            if failures:
                raise failures.pop(0)
            notify(notification)

        e.notifier.notify = flaky  # type: ignore[method-assign]

    engine.call(sabotage)
    client = connect(engine, device)
    try:
        engine.create_job(job("flaky-job", "flaky"))
        client.next_message()
        take(client, "flaky", "flaky-job")
        update = Topics.job_update("flaky", "flaky-job")
        with caplog.at_level(logging.WARNING, "certrotator.local"):
            assert ask(client, update, {"status": "FAILED"}).topic == Topics.accepted(update)
            assert engine.wait_until(lambda e: bool(e.registry.notifications()), 10, tick_s=0.02)
        assert failures == []
        assert pending_work(engine) == []
        assert caplog.text.count("terminal handling of flaky / flaky-job (FAILED) failed (try") == 2
    finally:
        client.close()


def test_terminal_work_left_after_the_last_try_is_finished_when_the_engine_starts_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = EngineConfig(tmp_path / "data", port=0, terminal_retry=FAST_RETRY)
    with EngineThread(config) as first:
        device = provision(first, tmp_path, "broken")

        def always_failing(_notification: Notification) -> None:
            raise RuntimeError("the notifier is down")

        first.call(lambda e: setattr(e.notifier, "notify", always_failing))
        client = connect(first, device)
        try:
            first.create_job(job("broken-job", "broken"))
            client.next_message()
            take(client, "broken", "broken-job")
            update = Topics.job_update("broken", "broken-job")
            with caplog.at_level(logging.WARNING, "certrotator.local"):
                assert ask(client, update, {"status": "FAILED"}).topic == Topics.accepted(update)
                gave_up = "failed 3 times; left for the next start of the engine"
                assert first.wait_for(lambda: gave_up in caplog.text, 10, tick_s=0.02)
            assert pending_work(first) == [("broken", "broken-job", 3)]
        finally:
            client.close()
    with EngineThread(config) as second:  # a working notifier: finished before anything else
        assert pending_work(second) == []
        notes = second.call(lambda e: e.registry.notifications())
        assert [(n["thingName"], n["jobId"], n["status"]) for n in notes] == [
            ("broken", "broken-job", "FAILED")
        ]


def test_with_the_terminal_rule_disabled_the_work_is_dropped_as_aws_drops_the_event(
    engine: EngineThread, tmp_path: Path
) -> None:
    device = provision(engine, tmp_path, "ruleless")
    engine.call(lambda e: e.set_rule_enabled("terminal", False))
    client = connect(engine, device)
    try:
        engine.create_job(job("ruleless-job", "ruleless"))
        client.next_message()
        update = Topics.job_update("ruleless", "ruleless-job")
        assert ask(client, update, {"status": "REJECTED"}).topic == Topics.accepted(update)
        assert pending_work(engine) == []
        assert engine.call(lambda e: e.registry.notifications()) == []
    finally:
        client.close()


def test_the_retry_policy_backs_off_and_ends() -> None:
    policy = RetryPolicy(first_delay_s=1.0, max_delay_s=5.0, tries=5)
    assert [policy.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 5.0, None, None]
    with pytest.raises(ValueError):
        RetryPolicy(first_delay_s=0)
    with pytest.raises(ValueError):
        RetryPolicy(tries=0)
