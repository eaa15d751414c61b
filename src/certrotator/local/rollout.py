"""Rollout and admission control of the local IoT Core: when a job's pending targets become executions.

`plan_release` is the decision, pure: a token bucket refilled at the job's rollout rate (AWS's
jobExecutionsRolloutConfig), bounded by the engine-wide admission limit. `RolloutScheduler` is the
imperative shell around it: it owns one timer per job, reads the facts from the job store, releases what
the plan says and re-arms the timer for the plan's next wake-up.

Admission: at most `max_in_flight` executions in flight engine-wide, whatever a job's rate. An execution
holds its slot from release until it ends or the admission window has passed (a device that is offline
or stuck must not stall the rollout). Without the limit every target of an uncapped rollout was queued
at once and the whole fleet advanced in lockstep (see docs/performance.md, "admission control").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from certrotator.local.jobs import JobStore
from certrotator.protocol import JobStatus

# How long a released execution holds its admission slot at most, and how often a full engine looks
# again for free slots (a terminal execution frees one sooner: see RolloutScheduler.execution_ended).
ADMISSION_WINDOW_S = 30.0
ADMISSION_RECHECK_S = 1.0
# Shortest wait for the next token, so a timer never spins.
MIN_WAKE_S = 0.001


@dataclass(frozen=True, slots=True)
class ReleasePlan:
    release: int  # pending targets to release now
    tokens: float  # what the bucket holds after releasing them
    wake_after: float | None  # seconds until the next release is due; None = no targets left to release


def plan_release(
    tokens: float,
    rate_per_minute: float | None,
    pending: int,
    free_slots: int | None,
    elapsed_s: float,
) -> ReleasePlan:
    """How many of a job's `pending` targets to release now. Pure.

    `tokens` is the bucket as the previous plan left it, `elapsed_s` the time since that plan,
    `rate_per_minute` the job's current rate (None = no rate limit) and `free_slots` the admission slots
    free engine-wide (None = no admission limit). The bucket holds at most one second's worth of
    releases (and at least one), so a job that waited long does not burst."""
    if rate_per_minute is None:
        due = pending
    else:
        per_s = rate_per_minute / 60.0
        tokens = min(tokens + per_s * elapsed_s, max(1.0, per_s))
        due = min(int(tokens), pending)
    release = due if free_slots is None else min(due, max(free_slots, 0))
    if rate_per_minute is not None:
        tokens -= release
    if release >= pending:
        return ReleasePlan(release, tokens, None)
    wake = 0.0 if rate_per_minute is None else max((1 - tokens) / per_s, MIN_WAKE_S)
    if release < due:  # full: a terminal execution frees a slot sooner, the window later
        wake = max(wake, ADMISSION_RECHECK_S)
    return ReleasePlan(release, tokens, wake)


@dataclass
class _Rollout:
    tokens: float = 1.0
    last: float = field(default_factory=time.monotonic)
    timer: asyncio.Handle | None = None
    due_now: bool = False  # the timer is a call_soon: it will see every change made before it runs
    pending: bool = True  # targets not yet rolled out


class RolloutScheduler:
    """The rollout timers of every job still releasing targets; call it on the engine's loop only.

    `on_released(job_id, things)` is told of each batch of new QUEUED executions (to notify devices)."""

    def __init__(
        self,
        jobs: JobStore,
        max_in_flight: int | None,
        on_released: Callable[[str, list[str]], None],
        admission_window_s: float = ADMISSION_WINDOW_S,
    ) -> None:
        self.jobs = jobs
        self.max_in_flight = max_in_flight
        self.admission_window_s = admission_window_s
        self._on_released = on_released
        self._rollouts: dict[str, _Rollout] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin releasing: jobs added before this, and every job the database has in progress."""
        self._loop = loop
        for job_id in self.jobs.active_jobs():
            self._rollouts.setdefault(job_id, _Rollout())
        for job_id in list(self._rollouts):
            self.schedule(job_id)

    def stop(self) -> None:
        for rollout in self._rollouts.values():
            if rollout.timer:
                rollout.timer.cancel()
                rollout.timer = None
        self._loop = None

    def schedule(self, job_id: str) -> None:
        """Release what is due for the job this loop turn (a job added before `start` waits for it)."""
        rollout = self._rollouts.setdefault(job_id, _Rollout())
        if self._loop is None:
            return
        if rollout.timer is None:
            rollout.timer = self._loop.call_soon(self._release, job_id)
            rollout.due_now = True

    def execution_ended(self, job_id: str, now: float) -> None:
        """One of the job's executions reached a terminal status: complete the job if that was the last
        of it, and release now for every job waiting for an admission slot (admission is engine-wide),
        this one first, since successes may also have raised an exponential rate. A release already due
        this turn serves every execution that ends before it runs."""
        rollout = self._rollouts.get(job_id)
        if (rollout is None or not rollout.pending) and self.jobs.complete_if_done(job_id, now):
            self._rollouts.pop(job_id, None)
        for waiting_id, waiting in sorted(self._rollouts.items(), key=lambda item: item[0] != job_id):
            if waiting.pending and not (waiting.timer is not None and waiting.due_now):
                if waiting.timer is not None:
                    waiting.timer.cancel()
                    waiting.timer = None
                self.schedule(waiting_id)

    def _free_slots(self, now: float) -> int | None:
        if self.max_in_flight is None:
            return None
        in_flight = self.jobs.admitted_count(list(self._rollouts), now - self.admission_window_s)
        return max(self.max_in_flight - in_flight, 0)

    def _release(self, job_id: str) -> None:
        rollout = self._rollouts.get(job_id)
        if rollout is None or self._loop is None:
            return  # the job completed or was canceled meanwhile, or the engine stopped
        rollout.timer = None
        # Runs at every terminal execution while targets wait: it reads only the job's status and its
        # cached configuration, never the job's row with every target (see docs/performance.md).
        config = self.jobs.config(job_id)
        if config is None or self.jobs.status(job_id) != JobStatus.IN_PROGRESS:
            self._rollouts.pop(job_id, None)  # canceled: nothing more to release
            return
        exponential = config.base_rate_per_minute is not None
        rate = config.rate_per_minute(self.jobs.succeeded_count(job_id) if exponential else 0)
        now_m, now = time.monotonic(), time.time()
        plan = plan_release(
            rollout.tokens, rate, self.jobs.pending_count(job_id), self._free_slots(now), now_m - rollout.last
        )
        rollout.tokens, rollout.last = plan.tokens, now_m
        if plan.release:
            self._on_released(job_id, self.jobs.release(job_id, plan.release, now))
        rollout.pending = plan.wake_after is not None
        if plan.wake_after is not None:
            rollout.timer = self._loop.call_later(plan.wake_after, self._release, job_id)
            rollout.due_now = False
