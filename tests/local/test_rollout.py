"""The rollout plan alone (no engine, no clock): token bucket at the job's rate, engine-wide admission."""

from __future__ import annotations

import pytest

from certrotator.local.rollout import ADMISSION_RECHECK_S, MIN_WAKE_S, ReleasePlan, plan_release


def test_without_limits_everything_pending_is_released_at_once() -> None:
    assert plan_release(1.0, None, pending=500, free_slots=None, elapsed_s=0.0) == ReleasePlan(500, 1.0, None)


def test_nothing_pending_releases_nothing_and_needs_no_wake_up() -> None:
    assert plan_release(1.0, 60.0, pending=0, free_slots=None, elapsed_s=5.0).wake_after is None
    assert plan_release(1.0, None, pending=0, free_slots=3, elapsed_s=0.0) == ReleasePlan(0, 1.0, None)


def test_admission_caps_an_unlimited_rate_and_rechecks_later() -> None:
    plan = plan_release(1.0, None, pending=5, free_slots=2, elapsed_s=0.0)
    assert plan == ReleasePlan(2, 1.0, ADMISSION_RECHECK_S)


@pytest.mark.parametrize("free_slots", [0, -3])
def test_a_full_engine_releases_nothing(free_slots: int) -> None:
    plan = plan_release(1.0, None, pending=5, free_slots=free_slots, elapsed_s=0.0)
    assert (plan.release, plan.wake_after) == (0, ADMISSION_RECHECK_S)


def test_enough_free_slots_release_the_rest_with_no_wake_up() -> None:
    assert plan_release(1.0, None, pending=3, free_slots=3, elapsed_s=0.0) == ReleasePlan(3, 1.0, None)


def test_a_rate_releases_one_token_and_wakes_when_the_next_is_due() -> None:
    plan = plan_release(1.0, 60.0, pending=3, free_slots=None, elapsed_s=0.0)  # one a second
    assert plan.release == 1
    assert plan.tokens == pytest.approx(0.0)
    assert plan.wake_after == pytest.approx(1.0)


def test_a_partial_token_waits_for_the_rest() -> None:
    plan = plan_release(0.25, 30.0, pending=3, free_slots=None, elapsed_s=0.0)  # one every 2 s
    assert plan.release == 0
    assert plan.tokens == pytest.approx(0.25)
    assert plan.wake_after == pytest.approx(1.5)


def test_the_bucket_holds_at_most_one_seconds_worth() -> None:
    # 600/min = 10/s: after a long wait, a burst of 10, not of everything that could have accrued.
    plan = plan_release(0.0, 600.0, pending=1_000, free_slots=None, elapsed_s=3_600.0)
    assert plan.release == 10
    # A slow rate still gets a whole token after a long wait.
    assert plan_release(0.0, 1.0, pending=5, free_slots=None, elapsed_s=3_600.0).release == 1


def test_rate_and_admission_together_take_the_smaller_and_the_later_wake_up() -> None:
    plan = plan_release(0.0, 600.0, pending=20, free_slots=3, elapsed_s=1.0)
    assert plan.release == 3
    assert plan.tokens == pytest.approx(7.0)  # unused tokens stay in the bucket
    assert plan.wake_after == ADMISSION_RECHECK_S


def test_the_wake_up_never_spins() -> None:
    plan = plan_release(5.0, 6_000.0, pending=200, free_slots=None, elapsed_s=0.0)
    assert plan.wake_after is not None and plan.wake_after >= MIN_WAKE_S


@pytest.mark.parametrize(("rate", "targets"), [(120.0, 10), (45.0, 7), (1_000.0, 100)])
def test_driven_by_its_own_wake_ups_the_plan_keeps_the_rate(rate: float, targets: int) -> None:
    tokens, pending, clock, elapsed = 1.0, targets, 0.0, 0.0
    released_at: list[float] = []
    while pending:
        plan = plan_release(tokens, rate, pending, None, elapsed)
        released_at += [clock] * plan.release
        tokens, pending = plan.tokens, pending - plan.release
        if plan.wake_after is None:
            break
        elapsed = plan.wake_after
        clock += elapsed
    assert len(released_at) == targets
    # The first goes at once, and the rest at the rate (give or take the timer's rounding).
    expected = (targets - 1) / (rate / 60.0)
    assert released_at[-1] == pytest.approx(expected, rel=0.02, abs=0.01)
