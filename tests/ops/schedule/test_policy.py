"""The renewal policy over synthetic fleets with a controlled clock: window entry, lifetime fraction,
jitter spread, back-off after failures, in-progress skip, group scope, blocked things, job batching."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from certrotator.ops.schedule.policy import (
    CertificateFacts,
    Rotation,
    ThingFacts,
    Verdict,
    backoff_s,
    decide,
    due_at,
    jitter_fraction,
    plan,
)
from certrotator.ops.schedule.settings import DAY, HOUR, Settings, parse_duration, parse_spec
from certrotator.protocol import PENDING_ROLLOUT, JobExecutionStatus

S = JobExecutionStatus
T0 = 1_700_000_000.0  # the fleet's provisioning day
RENEW_30D = Settings(renew_before_s=30 * DAY)
NO_JITTER_30D = Settings(renew_before_s=30 * DAY, jitter_s=0)


def cert(lifetime_days: float, issued: float = T0, cid: str = "c" * 64) -> CertificateFacts:
    return CertificateFacts(cid, issued, issued + lifetime_days * DAY)


def thing(
    name: str, certificate: CertificateFacts, *rotations: Rotation, groups: tuple[str, ...] = ()
) -> ThingFacts:
    return ThingFacts(name, (certificate,), rotations, groups)


def ended(job: str, status: S, at: float) -> Rotation:
    return Rotation(job, status.value, at - HOUR, at)


# ------------------------------------------------------------------------------- trigger and window


def test_renew_before_enters_the_window_exactly_at_not_after_minus_the_window() -> None:
    facts = thing("t", cert(365))
    entry = T0 + 335 * DAY  # no jitter: the window's start
    assert decide(facts, entry - 1, NO_JITTER_30D).verdict is Verdict.WAIT
    decision = decide(facts, entry, NO_JITTER_30D)
    assert decision.verdict is Verdict.ROTATE
    assert decision.due_at == entry
    assert "expires in 30.0 d" in decision.reason and "renew-before 30.0 d" in decision.reason


def test_waiting_says_when_it_will_be_due() -> None:
    decision = decide(thing("t", cert(365)), T0 + DAY, NO_JITTER_30D)
    assert decision.verdict is Verdict.WAIT
    assert decision.next_at == T0 + 335 * DAY
    assert "due in 334.0 d" in decision.reason


def test_lifetime_fraction_is_measured_from_not_before() -> None:
    settings = Settings(renew_at_fraction=0.66, jitter_s=0)
    issued = T0 - 100 * DAY
    facts = thing("t", cert(90, issued=issued))  # a 90-day certificate: due at day 59.4
    assert decide(facts, issued + 59.3 * DAY, settings).verdict is Verdict.WAIT
    assert decide(facts, issued + 59.5 * DAY, settings).verdict is Verdict.ROTATE
    # the same fraction of a one-year certificate is much later
    long = thing("u", cert(365, issued=issued))
    assert decide(long, issued + 59.5 * DAY, settings).verdict is Verdict.WAIT
    assert decide(long, issued + 241 * DAY, settings).verdict is Verdict.ROTATE


def test_a_certificate_already_inside_the_window_is_due_at_once() -> None:
    """A fleet provisioned with 10-day certificates under renew-before 30d: due from the first look."""
    decision = decide(thing("t", cert(10)), T0 + HOUR, RENEW_30D)
    assert decision.verdict is Verdict.ROTATE


def test_an_expired_certificate_is_blocked_not_scheduled() -> None:
    decision = decide(thing("t", cert(10)), T0 + 10 * DAY, RENEW_30D)
    assert decision.verdict is Verdict.BLOCKED
    assert "expired" in decision.reason and "provision it again" in decision.reason


# ------------------------------------------------------------------------------------------- jitter


def test_jitter_spreads_a_fleet_provisioned_in_one_minute_over_days() -> None:
    fleet = [thing(f"dev-{i:05d}", cert(365, issued=T0 + (i % 60))) for i in range(10_000)]
    dues = [due_at(f.thing, f.certificates[0], RENEW_30D) for f in fleet]
    nominal = T0 + 335 * DAY
    span = 3 * DAY  # default: 10 % of the 30-day window
    assert all(nominal - span <= d <= nominal + 60 for d in dues)  # earlier, never later
    assert max(dues) - min(dues) > 0.99 * span
    per_hour = Counter(int((d - (nominal - span)) // HOUR) for d in dues)
    assert set(range(72)) <= set(per_hour) <= set(range(73))  # every hour of the span has some
    # uniform: each hour gets 10,000 / 72 ≈ 139; none more than twice that
    assert max(per_hour.values()) < 2 * 10_000 / 72
    # and a one-minute window catches a handful, not the fleet
    assert sum(1 for d in dues if nominal - DAY <= d < nominal - DAY + 60) < 20


def test_jitter_is_fixed_by_the_thing_name() -> None:
    assert jitter_fraction("dev-1") == jitter_fraction("dev-1") != jitter_fraction("dev-2")
    assert 0 <= jitter_fraction("dev-1") < 1
    facts = thing("dev-1", cert(365))
    now = T0 + 333 * DAY
    assert decide(facts, now, RENEW_30D) == decide(facts, now, RENEW_30D)


def test_explicit_jitter_and_its_cap() -> None:
    one_day = Settings(renew_before_s=30 * DAY, jitter_s=DAY)
    c = cert(365)
    assert T0 + 334 * DAY <= due_at("x", c, one_day) <= T0 + 335 * DAY
    # the default is capped at 7 days: a 10-year certificate renewed at two thirds has a 3-year window
    fraction = Settings(renew_at_fraction=2 / 3)
    long = cert(3650)
    nominal = T0 + 2 / 3 * 3650 * DAY
    assert nominal - 7 * DAY <= due_at("x", long, fraction) <= nominal


# ------------------------------------------------------------------------------------------ history


def test_a_thing_with_a_rotation_in_progress_is_skipped() -> None:
    now = T0 + 340 * DAY
    for status in (S.QUEUED.value, S.IN_PROGRESS.value, PENDING_ROLLOUT):
        facts = thing("t", cert(365), Rotation("renew-1", status, now - HOUR))
        decision = decide(facts, now, RENEW_30D)
        assert decision.verdict is Verdict.IN_PROGRESS, status
        assert f"renew-1 is {status}" in decision.reason


def test_back_off_doubles_after_each_failure_up_to_the_cap() -> None:
    assert [backoff_s(n, RENEW_30D) / HOUR for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 32, 32]
    assert backoff_s(10_000, RENEW_30D) == 32 * HOUR


def test_back_off_after_a_failed_rotation() -> None:
    now = T0 + 340 * DAY  # due
    failed_at = now - 30 * 60
    once = thing("t", cert(365), ended("r1", S.FAILED, failed_at))
    decision = decide(once, now, RENEW_30D)
    assert decision.verdict is Verdict.BACKOFF
    assert decision.failures == 1 and decision.next_at == failed_at + HOUR
    assert "1 failed rotation(s), the last FAILED (job r1): next try in 30.0 min" in decision.reason
    assert decide(once, failed_at + HOUR, RENEW_30D).verdict is Verdict.ROTATE
    # three failures in a row (timeouts count too): 4 h after the last
    thrice = thing(
        "t",
        cert(365),
        ended("r1", S.FAILED, now - 10 * HOUR),
        ended("r2", S.TIMED_OUT, now - 6 * HOUR),
        ended("r3", S.REJECTED, now - 3 * HOUR),
    )
    decision = decide(thrice, now, RENEW_30D)
    assert decision.verdict is Verdict.BACKOFF and decision.failures == 3
    assert decision.next_at == now - 3 * HOUR + 4 * HOUR
    assert decide(thrice, now + HOUR, RENEW_30D).verdict is Verdict.ROTATE


def test_a_success_ends_the_failure_streak() -> None:
    now = T0 + 340 * DAY
    facts = thing(
        "t",
        cert(365),
        ended("r1", S.FAILED, now - 50 * HOUR),
        ended("r2", S.SUCCEEDED, now - 40 * HOUR),
        ended("r3", S.FAILED, now - 90 * 60),
    )
    decision = decide(facts, now, RENEW_30D)
    assert decision.failures == 1 and decision.verdict is Verdict.ROTATE  # 1 h back-off has passed


def test_a_window_longer_than_the_issued_lifetime_blocks_instead_of_looping() -> None:
    """A private CA issuing 7-day certificates under renew-before 30d: the new certificate is due the
    moment it is issued, so every rotation would start the next one."""
    issued = T0 + 5 * DAY
    renewed = cert(7, issued=issued)
    facts = thing("t", renewed, ended("r1", S.SUCCEEDED, issued + 60))
    decision = decide(facts, issued + HOUR, RENEW_30D)
    assert decision.verdict is Verdict.BLOCKED
    assert "within the window" in decision.reason
    # a first certificate that short (never rotated) is simply due
    assert decide(thing("u", renewed), issued + HOUR, RENEW_30D).verdict is Verdict.ROTATE


def test_not_exactly_one_active_certificate_blocks() -> None:
    now = T0 + 340 * DAY
    two = ThingFacts("t", (cert(365, cid="a" * 64), cert(365, cid="b" * 64)))
    assert decide(two, now, RENEW_30D).verdict is Verdict.BLOCKED
    assert "reconcile" in decide(two, now, RENEW_30D).reason
    none = ThingFacts("t", ())
    assert decide(none, now, RENEW_30D).reason == "no certificate attached"
    inactive = ThingFacts("t", (CertificateFacts("a" * 64, T0, T0 + 365 * DAY, "INACTIVE"),))
    assert decide(inactive, now, RENEW_30D).verdict is Verdict.BLOCKED


# -------------------------------------------------------------------------------------------- scope


def test_group_scope() -> None:
    now = T0 + 340 * DAY
    scoped = Settings(renew_before_s=30 * DAY, group="line-1")
    inside = thing("a", cert(365), groups=("line-1", "other"))
    outside = thing("b", cert(365), groups=("line-2",))
    assert decide(inside, now, scoped).verdict is Verdict.ROTATE
    decision = decide(outside, now, scoped)
    assert decision.verdict is Verdict.OUT_OF_SCOPE and "'line-1'" in decision.reason
    schedule = plan([inside, outside], now, scoped)
    assert [j.things for j in schedule.jobs] == [("a",)]


# ---------------------------------------------------------------------------------------- fleet plan


def synthetic_fleet(now: float) -> list[ThingFacts]:
    """Things in every situation, provisioned on one day."""
    return [
        thing("soon-1", cert(10)),  # due (inside the window from the start)
        thing("soon-2", cert(12)),
        thing("year-1", cert(365)),  # waits
        thing("busy", cert(10), Rotation("manual-1", S.IN_PROGRESS.value, now - 60)),
        thing("failed", cert(11), ended("renew-0", S.FAILED, now - 600)),
        ThingFacts("double", (cert(10, cid="a" * 64), cert(365, cid="b" * 64))),
    ]


def test_plan_over_a_synthetic_fleet() -> None:
    now = T0 + DAY
    schedule = plan(synthetic_fleet(now), now, RENEW_30D, job_prefix="renew")
    verdicts = {d.thing: d.verdict for d in schedule.decisions}
    assert verdicts == {
        "soon-1": Verdict.ROTATE,
        "soon-2": Verdict.ROTATE,
        "year-1": Verdict.WAIT,
        "busy": Verdict.IN_PROGRESS,
        "failed": Verdict.BACKOFF,
        "double": Verdict.BLOCKED,
    }
    assert [(j.job_id, j.things) for j in schedule.jobs] == [(f"renew-{int(now)}-1", ("soon-1", "soon-2"))]
    assert {d.thing: d.job_id for d in schedule.decisions if d.job_id} == {
        "soon-1": f"renew-{int(now)}-1",
        "soon-2": f"renew-{int(now)}-1",
    }


def test_jobs_hold_at_most_max_per_job_soonest_expiry_first() -> None:
    now = T0 + DAY
    fleet = [thing(f"d{i}", cert(5 + (i * 7) % 20)) for i in range(25)]
    schedule = plan(fleet, now, Settings(renew_before_s=30 * DAY, max_per_job=10))
    assert [len(j.things) for j in schedule.jobs] == [10, 10, 5]
    expiry = {f.thing: f.certificates[0].not_after for f in fleet}
    order = [t for j in schedule.jobs for t in j.things]
    assert [expiry[t] for t in order] == sorted(expiry[t] for t in order)
    assert len(set(order)) == 25


def test_dry_run_output_lists_every_thing_with_decision_and_reason() -> None:
    now = T0 + DAY
    rows = [d.to_dict() for d in plan(synthetic_fleet(now), now, RENEW_30D).decisions]
    assert [r["thing"] for r in rows] == ["soon-1", "soon-2", "year-1", "busy", "failed", "double"]
    assert all(r["decision"] and r["reason"] for r in rows)
    failed = next(r for r in rows if r["thing"] == "failed")
    assert failed["decision"] == "backoff" and failed["failures"] == 1
    assert failed["lastRotation"] == {"jobId": "renew-0", "status": "FAILED"}


# -------------------------------------------------------------------------------------------- specs


def test_spec_and_durations() -> None:
    assert parse_duration("30d") == 30 * DAY and parse_duration("1.5h") == 1.5 * HOUR
    spec = parse_spec("renew-before=30d, group=fleet, max-per-job=50, every=10m", allow_every=True)
    assert spec.settings == Settings(renew_before_s=30 * DAY, group="fleet", max_per_job=50)
    assert spec.every_s == 600
    assert parse_spec(spec.settings.describe()).settings == spec.settings
    assert parse_spec("renew-at-fraction=0.66", allow_every=True).every_s == HOUR
    for bad, says in [
        ("", "exactly one"),
        ("renew-before=30d,renew-at-fraction=0.5", "exactly one"),
        ("renew-at-fraction=1.5", "below 1"),
        ("renew-before=30", "not a duration"),
        ("renew-before=30d,every=1h", "KEY one of"),  # every only for local up
        ("renew-before=30d,max-per-job=0", "at least 1"),
        ("colour=blue", "KEY one of"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_spec(bad)


def test_policy_time_over_100k_things() -> None:
    """The measured number for the report; bounded loosely so a slow shared machine does not fail it."""
    now = T0 + 300 * DAY
    fleet = [thing(f"dev-{i:06d}", cert(365, issued=T0 + i)) for i in range(100_000)]
    started = time.perf_counter()
    schedule = plan(fleet, now, RENEW_30D)
    elapsed = time.perf_counter() - started
    print(f"policy over 100,000 things: {elapsed:.2f} s, {schedule.count(Verdict.ROTATE)} due")
    assert len(schedule.decisions) == 100_000
    assert elapsed < 30
