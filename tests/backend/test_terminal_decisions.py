"""The pure decisions behind the terminal handler and create's hand-shake with it, table-driven."""

from __future__ import annotations

import pytest

from certrotator.backend.decisions import (
    Cleanup,
    Verdict,
    leftover_certificate,
    terminal_plan,
    withdrawal,
    withdrawal_reason,
)
from certrotator.backend.ports import JobExecution, RotationState
from certrotator.protocol import (
    JOB_DOCUMENT,
    TERMINAL_EXECUTION_STATUSES,
    JobExecutionStatus,
    RotationProgress,
)

S = JobExecutionStatus
P = RotationProgress
ACT, IGNORE, DUPLICATE = Verdict.ACT, Verdict.IGNORE, Verdict.DUPLICATE
NONE, OLD, NEW = Cleanup.NONE, Cleanup.DELETE_OLD, Cleanup.DELETE_NEW
FAILED_LIKE = (S.FAILED, S.CANCELED, S.REJECTED, S.REMOVED)

# (status, progress for this job, rotation job?) -> (verdict, cleanup, notify, mark terminated)
Row = tuple[JobExecutionStatus, RotationProgress | None, bool | None, Verdict, Cleanup, bool, bool]
TABLE: list[Row] = [
    # DESIGN.md §2, with the backend's own progress
    (S.SUCCEEDED, P.COMMITTED, True, ACT, OLD, False, True),
    (S.SUCCEEDED, P.CREATED, True, ACT, NONE, True, True),  # contradiction: keep both, tell
    (S.SUCCEEDED, None, True, ACT, NONE, True, False),  # contradiction, nothing recorded to settle
    *[(s, P.CREATED, True, ACT, NEW, True, True) for s in FAILED_LIKE],
    *[(s, None, True, ACT, NONE, True, False) for s in FAILED_LIKE],
    *[(s, P.COMMITTED, True, ACT, NONE, True, True) for s in FAILED_LIKE],  # may use either: keep both
    (S.TIMED_OUT, P.COMMITTED, True, ACT, NONE, True, True),
    (S.TIMED_OUT, P.CREATED, True, ACT, NEW, True, True),
    (S.TIMED_OUT, None, True, ACT, NONE, True, False),
    # create still issuing: mark, so its last look withdraws; nothing to delete yet
    *[(s, P.ISSUING, True, ACT, NONE, True, True) for s in TERMINAL_EXECUTION_STATUSES],
    # handled already (a redelivery, or create withdrew): nothing at all
    *[(s, P.TERMINATED, True, DUPLICATE, NONE, False, False) for s in TERMINAL_EXECUTION_STATUSES],
    # no record: whether the job is a rotation decides whether anyone is told
    *[(s, None, False, IGNORE, NONE, False, False) for s in TERMINAL_EXECUTION_STATUSES],
    *[(s, None, None, IGNORE, NONE, False, False) for s in TERMINAL_EXECUTION_STATUSES],
    # a record is evidence enough, even if the job's document is gone (job deleted mid-rotation)
    (S.CANCELED, P.CREATED, None, ACT, NEW, True, True),
    (S.SUCCEEDED, P.COMMITTED, None, ACT, OLD, False, True),
]


@pytest.mark.parametrize(("status", "progress", "rotation", "verdict", "cleanup", "notify", "mark"), TABLE)
def test_terminal_table(
    status: JobExecutionStatus,
    progress: RotationProgress | None,
    rotation: bool | None,
    verdict: Verdict,
    cleanup: Cleanup,
    notify: bool,
    mark: bool,
) -> None:
    plan = terminal_plan(status, progress, rotation)
    assert (plan.verdict, plan.cleanup, plan.notify, plan.mark_terminated) == (verdict, cleanup, notify, mark)
    if plan.notify:
        assert plan.action, "every notification says what the operator must do"
    assert plan.outcome


def test_every_terminal_status_and_progress_has_a_row() -> None:
    covered = {(row[0], row[1], row[2]) for row in TABLE}
    for status in TERMINAL_EXECUTION_STATUSES:
        for progress in (None, *RotationProgress):
            rotation_values: tuple[bool | None, ...] = (True, False, None) if progress is None else (True,)
            for rotation in rotation_values:
                assert (status, progress, rotation) in covered, (status, progress, rotation)


@pytest.mark.parametrize("status", [S.QUEUED, S.IN_PROGRESS])
def test_an_active_status_has_no_plan(status: JobExecutionStatus) -> None:
    with pytest.raises(ValueError, match="not a terminal"):
        terminal_plan(status, P.CREATED, True)


# ---------------------------------------------------------------------------- create's hand-shake

OLD_ID, NEW_ID, OTHER_ID = "a" * 64, "b" * 64, "c" * 64
MINE = RotationState("job", OLD_ID, NEW_ID, P.CREATED)


def execution(status: JobExecutionStatus) -> JobExecution:
    return JobExecution("dev1", "job", status, dict(JOB_DOCUMENT))


@pytest.mark.parametrize(
    ("state", "now", "reason"),
    [
        (MINE, execution(S.IN_PROGRESS), None),
        (MINE, execution(S.FAILED), "execution ended (FAILED)"),
        (MINE, execution(S.TIMED_OUT), "execution ended (TIMED_OUT)"),
        (MINE, None, "execution is gone"),
        (
            MINE.advanced(P.TERMINATED),
            execution(S.IN_PROGRESS),
            "ended while the certificate was being created",
        ),
        (RotationState("job", OLD_ID, OTHER_ID, P.CREATED), execution(S.IN_PROGRESS), "was replaced"),
        (RotationState("other", OLD_ID, OTHER_ID, P.ISSUING), execution(S.IN_PROGRESS), "was replaced"),
        (None, execution(S.IN_PROGRESS), "was replaced"),
    ],
)
def test_withdrawal_reason(state: RotationState | None, now: JobExecution | None, reason: str | None) -> None:
    found = withdrawal_reason(state, MINE, now)
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found


@pytest.mark.parametrize(
    ("state", "ended", "mark", "notify"),
    [
        (MINE, True, True, True),  # the terminal handler has not run (or its mark was written over)
        (MINE.advanced(P.TERMINATED), True, False, False),  # it has, and told the operator
        (RotationState("job2", OLD_ID, OTHER_ID, P.ISSUING), True, False, True),  # the next job's: leave it
        (None, True, False, True),
        (MINE, False, False, False),  # set-up failed, execution goes on: the device is told, it fails the job
        (RotationState("job", OLD_ID, OTHER_ID, P.CREATED), False, False, False),  # a concurrent create won
    ],
)
def test_withdrawal(state: RotationState | None, ended: bool, mark: bool, notify: bool) -> None:
    plan = withdrawal(state, MINE, ended)
    assert (plan.mark_terminated, plan.notify) == (mark, notify)


@pytest.mark.parametrize(
    ("state", "principals", "principal", "leftover"),
    [
        (MINE, [OLD_ID], OLD_ID, NEW_ID),  # recorded, never attached: withdraw it
        (RotationState("older", OLD_ID, NEW_ID, P.CREATED), [OLD_ID], OLD_ID, NEW_ID),
        (MINE, [OLD_ID, NEW_ID], OLD_ID, None),  # attached: in use (the resend path handles it)
        (MINE, [NEW_ID], NEW_ID, None),  # the connection's own certificate
        (MINE.advanced(P.COMMITTED), [OLD_ID], OLD_ID, None),
        (MINE.advanced(P.TERMINATED), [OLD_ID], OLD_ID, None),
        (RotationState("job", OLD_ID, "", P.ISSUING), [OLD_ID], OLD_ID, None),
        (None, [OLD_ID], OLD_ID, None),
    ],
)
def test_leftover_certificate(
    state: RotationState | None, principals: list[str], principal: str, leftover: str | None
) -> None:
    assert leftover_certificate(state, principals, principal) == leftover
