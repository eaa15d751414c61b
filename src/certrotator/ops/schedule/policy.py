"""When to rotate: a pure policy from a thing's certificate, its rotation history, the time and the
settings to a decision with its reason, and the fleet's due things grouped into jobs.

The renewal systems operators trust decide the same way: step-ca renews at two thirds of a certificate's
lifetime (`renew_at_fraction`), cert-manager a fixed time before expiry (`renew_before`) and retries a
failed issuance with exponential back-off. Nothing here reads a clock, a database or AWS: the local and
AWS backends gather `ThingFacts`, `runner` acts on the decisions; `settings` holds the settings and
the text forms operators write them in.

Semantics, in the order they are applied (the first that applies decides):
1. out of scope: the thing is not in the settings' thing group;
2. in progress: a rotation execution of the thing is pending, queued or in progress (a second job
   would only queue behind it and rotate again);
3. blocked (needs an operator, or `reconcile`): not exactly one certificate attached (create would
   refuse: the backend needs exactly one), or it is not ACTIVE, or it has expired (the device cannot
   connect to take a job), or a certificate the last rotation issued is already due (the window is
   longer than the issuer's validity: every rotation would start the next one);
4. wait: not due yet. Due = the trigger's moment minus a jitter: a fraction, fixed per thing name
   (SHA-256), of the jitter span (default 10 % of the renewal window, at most 7 days), so a fleet
   provisioned in one minute comes due over days, and every run decides the same for a thing;
5. back-off: the last `n` rotations failed (any terminal status but SUCCEEDED): no new job before
   the last failure's end + min(base * 2^(n-1), cap);
6. rotate: put in a job, soonest expiry first, at most `max_per_job` things per job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from certrotator.compat import StrEnum
from certrotator.ops.schedule.settings import (
    DEFAULT_JITTER_FRACTION,
    MAX_DEFAULT_JITTER_S,
    Settings,
    format_duration,
    format_time,
)
from certrotator.protocol import (
    ACTIVE_EXECUTION_STATUSES,
    PENDING_ROLLOUT,
    JobExecutionStatus,
    validate_job_id,
)

JOB_PREFIX: Final = "renew"
ACTIVE_STATUS: Final = "ACTIVE"  # the only certificate status a device connects with


class Verdict(StrEnum):
    ROTATE = "rotate"
    WAIT = "wait"
    IN_PROGRESS = "in-progress"
    BACKOFF = "backoff"
    BLOCKED = "blocked"
    OUT_OF_SCOPE = "out-of-scope"


# ------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    certificate_id: str
    not_before: float  # epoch seconds
    not_after: float
    status: str = ACTIVE_STATUS  # AWS IoT's certificate status
    issuer: str = ""  # for reports only
    key_algorithm: str = ""  # for reports only

    @property
    def lifetime_s(self) -> float:
        return self.not_after - self.not_before


@dataclass(frozen=True, slots=True)
class Rotation:
    """One execution of a rotation job for the thing (jobs of other documents are not rotations)."""

    job_id: str
    status: str  # a JobExecutionStatus value, or PENDING_ROLLOUT (not released by the rollout yet)
    queued_at: float
    ended_at: float | None = None  # when it reached its terminal status; None while active

    @property
    def active(self) -> bool:
        return self.status == PENDING_ROLLOUT or self.status in ACTIVE_EXECUTION_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == JobExecutionStatus.SUCCEEDED


@dataclass(frozen=True, slots=True)
class ThingFacts:
    thing: str
    certificates: tuple[CertificateFacts, ...]  # exclusively attached to the thing
    rotations: tuple[Rotation, ...] = ()  # its rotation history, any order
    groups: tuple[str, ...] = ()  # the thing groups it is a direct member of

    def history(self) -> list[Rotation]:
        """Oldest first; executions that have not ended come last."""
        return sorted(
            self.rotations,
            key=lambda r: (r.ended_at is None, r.ended_at or 0.0, r.queued_at, r.job_id),
        )


# ---------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Decision:
    thing: str
    verdict: Verdict
    reason: str
    certificate: CertificateFacts | None = None
    due_at: float | None = None  # when the current certificate is (or was) due, jitter included
    next_at: float | None = None  # earliest moment a job may be created (due, or the back-off's end)
    failures: int = 0  # consecutive failed rotations, newest last
    last_rotation: Rotation | None = None
    job_id: str | None = None  # the job it goes into (ROTATE, once planned)

    def to_dict(self) -> dict[str, Any]:
        cert = self.certificate
        last = self.last_rotation
        return {
            "thing": self.thing,
            "decision": self.verdict.value,
            "reason": self.reason,
            "certificateId": cert.certificate_id if cert else None,
            "notAfter": cert.not_after if cert else None,
            "dueAt": self.due_at,
            "nextAt": self.next_at,
            "failures": self.failures,
            "lastRotation": None if last is None else {"jobId": last.job_id, "status": last.status},
            "jobId": self.job_id,
        }


def jitter_fraction(thing: str) -> float:
    """A number in [0, 1) fixed by the thing name, spread uniformly over a fleet."""
    digest = hashlib.sha256(thing.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def nominal_due(cert: CertificateFacts, settings: Settings) -> float:
    if settings.renew_before_s is not None:
        return cert.not_after - settings.renew_before_s
    assert settings.renew_at_fraction is not None
    return cert.not_before + settings.renew_at_fraction * cert.lifetime_s


def jitter_span(cert: CertificateFacts, settings: Settings) -> float:
    if settings.jitter_s is not None:
        return settings.jitter_s
    window = max(cert.not_after - nominal_due(cert, settings), 0.0)
    return min(DEFAULT_JITTER_FRACTION * window, MAX_DEFAULT_JITTER_S)


def due_at(thing: str, cert: CertificateFacts, settings: Settings) -> float:
    """When a job for the thing's certificate may first be created: the trigger's moment, earlier by
    the thing's share of the jitter span (never later: jitter must not push a renewal past it)."""
    return nominal_due(cert, settings) - jitter_fraction(thing) * jitter_span(cert, settings)


def backoff_s(failures: int, settings: Settings) -> float:
    """Wait after `failures` consecutive failed rotations (>= 1): base * 2^(n-1), capped."""
    if failures < 1:
        return 0.0
    exponent = min(failures - 1, 62)  # 2^62 h is past any cap; keeps the float finite
    return min(settings.backoff_base_s * 2.0**exponent, settings.backoff_cap_s)


def _failure_streak(history: Sequence[Rotation]) -> tuple[int, Rotation | None]:
    """Consecutive unsuccessful ended rotations at the end of the history, and the last of them."""
    count, last = 0, None
    for rotation in reversed([r for r in history if r.ended_at is not None]):
        if rotation.succeeded:
            break
        count += 1
        last = last or rotation
    return count, last


def decide(facts: ThingFacts, now: float, settings: Settings) -> Decision:
    """The decision for one thing (see the module docstring for the order of the rules)."""
    thing = facts.thing
    history = facts.history()
    last = history[-1] if history else None
    base = Decision(thing, Verdict.WAIT, "", last_rotation=last)
    if settings.group is not None and settings.group not in facts.groups:
        return replace(base, verdict=Verdict.OUT_OF_SCOPE, reason=f"not in thing group {settings.group!r}")
    active = [r for r in history if r.active]
    if active:
        return replace(
            base,
            verdict=Verdict.IN_PROGRESS,
            reason=f"rotation job {active[0].job_id} is {active[0].status}",
            certificate=facts.certificates[0] if len(facts.certificates) == 1 else None,
        )
    if len(facts.certificates) != 1:
        count = len(facts.certificates)
        why = (
            "no certificate attached"
            if count == 0
            else f"{count} certificates attached: a rotation needs exactly one (run `certrotator reconcile`)"
        )
        return replace(base, verdict=Verdict.BLOCKED, reason=why)
    cert = facts.certificates[0]
    base = replace(base, certificate=cert)
    if cert.status != ACTIVE_STATUS:
        return replace(base, verdict=Verdict.BLOCKED, reason=f"its certificate is {cert.status}, not ACTIVE")
    if now >= cert.not_after:
        return replace(
            base,
            verdict=Verdict.BLOCKED,
            reason=f"its certificate expired {format_time(cert.not_after)}: the device cannot connect to "
            "take a job; provision it again",
        )
    due = due_at(thing, cert, settings)
    base = replace(base, due_at=due, next_at=due)
    left = f"expires in {format_duration(cert.not_after - now)}"
    if now < due:
        return replace(base, reason=f"{left}; due in {format_duration(due - now)} ({settings.trigger()})")
    succeeded = [r for r in history if r.succeeded]
    if due <= cert.not_before and succeeded and (succeeded[-1].ended_at or 0.0) >= cert.not_before:
        return replace(
            base,
            verdict=Verdict.BLOCKED,
            reason=f"the certificate the last rotation issued was due at once: its lifetime "
            f"({format_duration(cert.lifetime_s)}) is within the window ({settings.trigger()}); "
            "shorten the window or use renew-at-fraction",
        )
    failures, last_failure = _failure_streak(history)
    if last_failure is not None:
        retry_at = (last_failure.ended_at or 0.0) + backoff_s(failures, settings)
        base = replace(base, failures=failures, next_at=max(due, retry_at))
        if now < retry_at:
            return replace(
                base,
                verdict=Verdict.BACKOFF,
                reason=f"{left}; {failures} failed rotation(s), the last {last_failure.status} "
                f"(job {last_failure.job_id}): next try in {format_duration(retry_at - now)}",
            )
    return replace(
        base,
        verdict=Verdict.ROTATE,
        reason=f"{left}; due since {format_duration(now - due)} ({settings.trigger()})",
    )


# -------------------------------------------------------------------------------------------- fleet


@dataclass(frozen=True, slots=True)
class PlannedJob:
    job_id: str
    things: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Schedule:
    decisions: list[Decision]  # one per thing, in the order given
    jobs: list[PlannedJob] = field(default_factory=list)

    def count(self, verdict: Verdict) -> int:
        return sum(1 for d in self.decisions if d.verdict is verdict)


def job_ids(prefix: str, now: float, count: int) -> list[str]:
    """`<prefix>-<epoch seconds>-<n>`: unique per run second, valid AWS job ids."""
    ids = [f"{prefix}-{int(now)}-{n}" for n in range(1, count + 1)]
    for job_id in ids:
        validate_job_id(job_id)
    return ids


def plan(
    fleet: Iterable[ThingFacts], now: float, settings: Settings, job_prefix: str = JOB_PREFIX
) -> Schedule:
    """Decide for every thing, then put the due ones into jobs of at most `max_per_job` things,
    soonest expiry first (ties by name, so one fleet gives one plan)."""
    decisions = [decide(facts, now, settings) for facts in fleet]
    due = sorted(
        (d for d in decisions if d.verdict is Verdict.ROTATE),
        key=lambda d: (d.certificate.not_after if d.certificate else 0.0, d.thing),
    )
    size = settings.max_per_job
    batches = [due[i : i + size] for i in range(0, len(due), size)]
    ids = job_ids(job_prefix, now, len(batches))
    jobs = [
        PlannedJob(job_id, tuple(d.thing for d in batch)) for job_id, batch in zip(ids, batches, strict=True)
    ]
    job_of = {thing: job.job_id for job in jobs for thing in job.things}
    planned = [replace(d, job_id=job_of[d.thing]) if d.thing in job_of else d for d in decisions]
    return Schedule(planned, jobs)
