"""Local Jobs: transitions, rollout, $next ordering, timeouts, cancel, the MQTT Jobs API replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from certrotator.local.db import Database
from certrotator.local.jobs import DEFAULT_TEMPLATE, JobConfig, JobError, JobStore
from certrotator.local.jobs_api import device_transition, handle_jobs_request, notify_next_message
from certrotator.protocol import JOB_DOCUMENT, JobExecutionStatus, parse_topic

S = JobExecutionStatus
NOW = 1_700_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    s = JobStore(Database(tmp_path))
    s.ensure_default_template()
    return s


def make_job(
    store: JobStore, job_id: str = "job1", things: tuple[str, ...] = ("t1",), config: JobConfig | None = None
) -> None:
    store.create_job(
        job_id,
        dict(JOB_DOCUMENT),
        list(things),
        config or JobConfig(max_per_minute=None, base_rate_per_minute=None),
        [f"thing/{t}" for t in things],
    )
    store.release(job_id, len(things), NOW)


def request(store: JobStore, topic: str, body: object, now: float = NOW) -> tuple[str, dict[str, object]]:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    outcome = handle_jobs_request(store, topic, parse_topic(topic), payload, now)
    assert len(outcome.replies) == 1
    return outcome.replies[0]


def test_default_template_is_the_seed_template(store: JobStore) -> None:
    found = store.template(DEFAULT_TEMPLATE)
    assert found is not None
    document, config = found
    assert document == JOB_DOCUMENT
    assert (config.base_rate_per_minute, config.increment_factor, config.succeeded_per_increase) == (
        100,
        1.2,
        100,
    )
    assert config.in_progress_timeout_s == 300


# Every (from, to) a device may ask for, and what AWS answers.
ALLOWED = [(S.QUEUED, t) for t in (S.IN_PROGRESS, S.SUCCEEDED, S.FAILED, S.REJECTED)] + [
    (S.IN_PROGRESS, t) for t in (S.IN_PROGRESS, S.SUCCEEDED, S.FAILED, S.REJECTED)
]
TERMINALS = [S.SUCCEEDED, S.FAILED, S.REJECTED, S.TIMED_OUT, S.CANCELED, S.REMOVED]


@pytest.mark.parametrize(("source", "target"), ALLOWED)
def test_device_transitions_allowed(
    store: JobStore, source: JobExecutionStatus, target: JobExecutionStatus
) -> None:
    make_job(store)
    e = store.execution("t1", "job1")
    assert e is not None
    if source is S.IN_PROGRESS:
        e = device_transition(e, "IN_PROGRESS", None, None, NOW, 60)
    after = device_transition(e, target.value, {"CertificateRotator": "x"}, e.version, NOW + 1, 60)
    assert after.status is target
    assert after.version == e.version + 1
    assert after.status_details == {"CertificateRotator": "x"}
    assert (after.timeout_at is None) == target.is_terminal


@pytest.mark.parametrize("terminal", TERMINALS)
@pytest.mark.parametrize("target", [S.IN_PROGRESS, S.SUCCEEDED, S.FAILED])
def test_terminal_executions_cannot_move(
    store: JobStore, terminal: JobExecutionStatus, target: JobExecutionStatus
) -> None:
    make_job(store)
    e = store.execution("t1", "job1")
    assert e is not None
    from dataclasses import replace

    with pytest.raises(JobError) as err:
        device_transition(replace(e, status=terminal), target.value, None, None, NOW, 60)
    assert err.value.code == "InvalidStateTransition"


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("TIMED_OUT", "InvalidStateTransition"),
        ("CANCELED", "InvalidStateTransition"),
        ("QUEUED", "InvalidStateTransition"),
        ("BOGUS", "InvalidRequest"),
    ],
)
def test_devices_cannot_set_service_statuses(store: JobStore, status: str, code: str) -> None:
    make_job(store)
    e = store.execution("t1", "job1")
    assert e is not None
    with pytest.raises(JobError) as err:
        device_transition(e, status, None, None, NOW, 60)
    assert err.value.code == code


def test_version_mismatch_and_bad_details_are_rejected(store: JobStore) -> None:
    make_job(store)
    e = store.execution("t1", "job1")
    assert e is not None
    with pytest.raises(JobError, match="expected version 7"):
        device_transition(e, "IN_PROGRESS", None, 7, NOW, 60)
    with pytest.raises(JobError, match="must be a string, number or boolean"):
        device_transition(e, "IN_PROGRESS", {"a": {"b": 1}}, None, NOW, 60)


def test_update_round_trip_over_the_jobs_api(store: JobStore) -> None:
    make_job(store)
    topic = "$aws/things/t1/jobs/job1/update"
    reply_topic, reply = request(
        store,
        topic,
        {
            "status": "IN_PROGRESS",
            "statusDetails": {"CertificateRotator": "s"},
            "includeJobExecutionState": True,
            "clientToken": "c1",
        },
    )
    assert reply_topic == f"{topic}/accepted"
    assert reply["executionState"] == {
        "status": "IN_PROGRESS",
        "statusDetails": {"CertificateRotator": "s"},
        "versionNumber": 2,
    }
    assert reply["clientToken"] == "c1"
    e = store.execution("t1", "job1")
    assert e is not None and e.status is S.IN_PROGRESS and e.timeout_at == NOW + 300


def test_update_rejections_carry_aws_codes(store: JobStore) -> None:
    make_job(store)
    assert request(store, "$aws/things/t1/jobs/nojob/update", {"status": "IN_PROGRESS"})[1]["code"] == (
        "ResourceNotFound"
    )
    topic, reply = request(store, "$aws/things/t1/jobs/job1/update", b"{not json")
    assert (
        topic.endswith("/rejected")
        and reply["code"] == "InvalidRequest"
        and "not valid JSON" in str(reply["message"])
    )
    request(store, "$aws/things/t1/jobs/job1/update", {"status": "SUCCEEDED"})
    topic, reply = request(
        store, "$aws/things/t1/jobs/job1/update", {"status": "IN_PROGRESS", "clientToken": "z"}
    )
    assert topic.endswith("/rejected")
    assert (reply["code"], reply["clientToken"]) == ("InvalidStateTransition", "z")


def test_get_and_next_get(store: JobStore) -> None:
    assert "execution" not in request(store, "$aws/things/t1/jobs/$next/get", {})[1]
    make_job(store)
    topic, reply = request(store, "$aws/things/t1/jobs/$next/get", {"clientToken": "a"})
    assert topic == "$aws/things/t1/jobs/$next/get/accepted"
    execution = reply["execution"]
    assert isinstance(execution, dict)
    assert (execution["jobId"], execution["status"], execution["jobDocument"]) == (
        "job1",
        "QUEUED",
        JOB_DOCUMENT,
    )
    assert request(store, "$aws/things/t1/jobs/job1/get", {})[0].endswith("/accepted")
    assert request(store, "$aws/things/t1/jobs/nope/get", {})[1]["code"] == "ResourceNotFound"


def test_next_prefers_in_progress_then_oldest_queued(store: JobStore) -> None:
    make_job(store, "a")
    make_job(store, "b")
    head = store.next_execution("t1")
    assert head is not None and head.job_id == "a"
    b = store.execution("t1", "b")
    assert b is not None
    store.save_execution(device_transition(b, "IN_PROGRESS", None, None, NOW, 60), b.version)
    head = store.next_execution("t1")
    assert head is not None and head.job_id == "b"
    assert notify_next_message(head, NOW)["execution"]["jobId"] == "b"  # type: ignore[index]
    assert "execution" not in notify_next_message(None, NOW)


def test_release_honours_counts_and_execution_numbers(store: JobStore) -> None:
    store.create_job("j", dict(JOB_DOCUMENT), ["t1", "t2", "t3"], JobConfig(), ["thinggroup/g"])
    assert store.release("j", 2, NOW) == ["t1", "t2"]
    assert store.status_counts("j") == {"QUEUED": 2, "PENDING_ROLLOUT": 1}
    assert store.release("j", 5, NOW) == ["t3"]
    make_job(store, "k", ("t1",))
    k = store.execution("t1", "k")
    assert k is not None and k.execution_number == 2


def test_duplicate_job_and_empty_targets_are_rejected(store: JobStore) -> None:
    make_job(store)
    with pytest.raises(JobError, match="already exists"):
        make_job(store)
    with pytest.raises(JobError, match="at least one target"):
        store.create_job("empty", dict(JOB_DOCUMENT), [], JobConfig(), [])
    with pytest.raises(JobError, match="invalid jobId"):
        store.create_job("bad id!", dict(JOB_DOCUMENT), ["t1"], JobConfig(), [])


def test_exponential_rollout_rate() -> None:
    config = JobConfig(
        max_per_minute=1000, base_rate_per_minute=100, increment_factor=1.2, succeeded_per_increase=100
    )
    assert config.rate_per_minute(0) == 100
    assert config.rate_per_minute(99) == 100
    assert config.rate_per_minute(100) == pytest.approx(120)
    assert config.rate_per_minute(250) == pytest.approx(144)
    assert config.rate_per_minute(10_000) == 1000
    assert JobConfig(max_per_minute=None, base_rate_per_minute=None).rate_per_minute(0) is None
    with pytest.raises(JobError, match="maximumPerMinute"):
        JobConfig(max_per_minute=5000)


def test_timeouts_due_and_cancel(store: JobStore) -> None:
    make_job(store, "j", ("t1", "t2"))
    e = store.execution("t1", "j")
    assert e is not None
    store.save_execution(device_transition(e, "IN_PROGRESS", None, None, NOW, 10), e.version)
    assert store.next_timeout() == NOW + 10
    assert store.timeouts_due(NOW + 9) == []
    assert [x.thing for x in store.timeouts_due(NOW + 10)] == ["t1"]
    canceled = store.cancel("j", force=False, now=NOW)
    assert [c.thing for c in canceled] == ["t2"]
    t1 = store.execution("t1", "j")
    assert t1 is not None and t1.status is S.IN_PROGRESS
    job = store.job("j")
    assert job is not None and job["status"] == "CANCELED"
    with pytest.raises(JobError, match="does not exist"):
        store.cancel("nope", force=True, now=NOW)


def test_stale_write_is_a_version_mismatch(store: JobStore) -> None:
    make_job(store)
    e = store.execution("t1", "job1")
    assert e is not None
    store.save_execution(device_transition(e, "IN_PROGRESS", None, None, NOW, 60), e.version)
    with pytest.raises(JobError) as err:
        store.save_execution(device_transition(e, "FAILED", None, None, NOW, 60), e.version)
    assert err.value.code == "VersionMismatch"


def test_job_completes_when_every_execution_is_terminal(store: JobStore) -> None:
    make_job(store, "j", ("t1",))
    assert not store.complete_if_done("j", NOW)
    e = store.execution("t1", "j")
    assert e is not None
    store.save_execution(device_transition(e, "SUCCEEDED", None, None, NOW, 60), e.version)
    assert store.complete_if_done("j", NOW)
    job = store.job("j")
    assert job is not None and job["status"] == "COMPLETED"


def test_jobs_survive_reopening_the_database(tmp_path: Path) -> None:
    store = JobStore(Database(tmp_path))
    make_job(store, "j", ("t1",))
    store.db.close()
    reopened = JobStore(Database(tmp_path))
    e = reopened.execution("t1", "j")
    assert e is not None and e.status is S.QUEUED and e.document == JOB_DOCUMENT


def test_the_last_refused_update_of_each_execution_is_kept(store: JobStore) -> None:
    """A refused update leaves the execution where it was; the store says why and when."""
    make_job(store, things=("t1", "t2"))
    update = "$aws/things/t1/jobs/job1/update"
    topic, reply = request(store, update, {"status": "IN_PROGRESS", "statusDetails": {"a": {"b": 1}}})
    assert topic.endswith("/rejected")
    e = store.execution("t1", "job1")
    assert e is not None and e.status is S.QUEUED
    (rejection,) = store.rejections("job1")
    assert (rejection.thing, rejection.requested_status, rejection.code) == (
        "t1",
        "IN_PROGRESS",
        "InvalidRequest",
    )
    assert (
        rejection.message == reply["message"] and "must be a string, number or boolean" in rejection.message
    )
    assert rejection.at == NOW

    request(store, update, b"{not json", now=NOW + 1)  # unparseable: refused, kept as the last
    request(store, update, {"status": "IN_PROGRESS", "expectedVersion": 9}, now=NOW + 2)
    request(store, "$aws/things/t2/jobs/job1/update", {"status": "CANCELED"}, now=NOW + 3)
    assert request(store, "$aws/things/t1/jobs/nojob/update", {"status": "IN_PROGRESS"})[1]["code"] == (
        "ResourceNotFound"  # no execution: nothing to keep it with
    )
    assert request(store, update, {"status": "IN_PROGRESS"}, now=NOW + 4)[0].endswith("/accepted")
    assert [(r.thing, r.requested_status, r.code, r.at) for r in store.rejections("job1")] == [
        ("t1", "IN_PROGRESS", "VersionMismatch", NOW + 2),  # an accepted update later does not erase it
        ("t2", "CANCELED", "InvalidStateTransition", NOW + 3),
    ]
    assert store.rejections("nojob") == []


def test_the_seeds_boolean_status_details_leave_no_rejection(store: JobStore) -> None:
    make_job(store)
    topic, _ = request(
        store,
        "$aws/things/t1/jobs/job1/update",
        {"status": "IN_PROGRESS", "statusDetails": {"CertificateRotator": True}},
    )
    assert topic.endswith("/accepted") and store.rejections("job1") == []
