"""The per-container memory of which jobs are rotations: one look per job, for a while, bounded."""

from __future__ import annotations

import pytest

from certrotator.backend.handlers import handle_job_execution_terminal
from certrotator.backend.rotation_jobs import RotationJobs
from certrotator.protocol import JOB_DOCUMENT, JobExecutionStatus

from .fakes import World


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Documents:
    def __init__(self, documents: dict[str, object]) -> None:
        self.documents = documents
        self.asked: list[str] = []

    def __call__(self, thing: str, job_id: str) -> object | None:
        self.asked.append(job_id)
        return self.documents.get(job_id)


def test_one_look_per_job_then_none() -> None:
    documents = Documents({"rot": dict(JOB_DOCUMENT), "ota": {"operation": "OTA"}, "raw": "text"})
    jobs = RotationJobs(documents)
    for _ in range(3):
        assert jobs.is_rotation("t1", "rot") is True
        assert jobs.is_rotation("t2", "ota") is False
        assert jobs.is_rotation("t3", "raw") is False
    assert documents.asked == ["rot", "ota", "raw"]
    assert jobs.lookups == 3


def test_an_unknown_job_is_not_remembered() -> None:
    """A job whose document cannot be found now (deleted, or a look-up race) is asked again next time."""
    documents = Documents({})
    jobs = RotationJobs(documents)
    assert jobs.is_rotation("t", "gone") is None
    assert jobs.is_rotation("t", "gone") is None
    assert documents.asked == ["gone", "gone"]


def test_answers_expire_because_job_ids_can_be_reused() -> None:
    clock = Clock()
    documents = Documents({"j": {"operation": "OTA"}})
    jobs = RotationJobs(documents, ttl_s=60, clock=clock)
    assert jobs.is_rotation("t", "j") is False
    clock.now += 59
    assert jobs.cached("j") is False
    clock.now += 1
    documents.documents["j"] = dict(JOB_DOCUMENT)  # deleted, and created again as a rotation
    assert jobs.cached("j") is None
    assert jobs.is_rotation("t", "j") is True
    assert documents.asked == ["j", "j"]


def test_the_memory_is_bounded_least_recently_used_first() -> None:
    documents = Documents({f"j{i}": {"operation": "OTA"} for i in range(4)})
    jobs = RotationJobs(documents, capacity=2)
    jobs.is_rotation("t", "j0")
    jobs.is_rotation("t", "j1")
    jobs.is_rotation("t", "j0")  # j0 used again: j1 is now the oldest
    jobs.is_rotation("t", "j2")
    assert jobs.cached("j1") is None
    assert jobs.cached("j0") is False and jobs.cached("j2") is False


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        RotationJobs(Documents({}), capacity=0)


def test_the_terminal_handler_touches_no_port_for_a_job_known_to_be_unrelated() -> None:
    """An unrelated job's later events cost nothing: no state read, no document look-up, no call."""
    world = World()
    world.set_execution(JobExecutionStatus.SUCCEEDED, {"operation": "OTA"}, job_id="ota-1")
    documents = Documents({"ota-1": {"operation": "OTA"}})
    jobs = RotationJobs(documents)

    def no_call(*args: object) -> None:
        raise AssertionError("no port may be called")

    world.state.load = no_call  # type: ignore[method-assign,assignment]
    world.jobs.describe_execution = no_call  # type: ignore[method-assign,assignment]
    for status in (JobExecutionStatus.SUCCEEDED, JobExecutionStatus.FAILED, JobExecutionStatus.TIMED_OUT):
        result = handle_job_execution_terminal(
            world.terminal_event(status, job_id="ota-1"), world.ports, jobs
        )
        assert result.outcome == "ignored"
    assert documents.asked == ["ota-1"]
    assert world.notifier.notifications == []
