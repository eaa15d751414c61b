"""At-least-once terminal handling on the local IoT Core.

AWS IoT publishes a job execution's terminal event after the status change and the rule's Lambda runs
it asynchronously, retried on failure. Here the status change and a `terminal_work` row are written in
one transaction (`JobStore` does both), and the engine runs the terminal rule for the row once that
transaction has committed, deleting the row in the same transaction as the handler's own changes. So a
terminal execution is never left unhandled:

- the engine dies between the two transactions: the row is still there, and `TerminalWorker.start`
  finishes every row at start-up, before any device message is handled;
- the handler raises (a failing port, a bug): its row stays and is tried again with back-off
  (`RetryPolicy`), each failure logged; after the last try of this run it is left for the next start-up,
  with an ERROR line and a notification to the operator.

The terminal handler may run more than once for one execution (a crash after its changes but before
their commit cannot happen, but a retry after a partial failure can): it is idempotent by design
(backend/handlers.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from certrotator.backend.ports import Notification, Notifier
from certrotator.local.db import Database
from certrotator.protocol import JobExecutionEvent, JobExecutionStatus

log = logging.getLogger("certrotator.local")

# Crash points for the engine's restart tests: CERTROTATOR_ENGINE_CRASH_AT=<name> kills the engine
# process right there with SIGKILL (no clean-up, no flush), as the device's crash points do.
CRASH_ENV = "CERTROTATOR_ENGINE_CRASH_AT"
# After the terminal status change has committed, before the terminal handler ran.
CRASH_TERMINAL_RECORDED = "terminal.recorded"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        log.warning("crash point %s: killing the engine", name)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True, slots=True)
class TerminalWork:
    """A terminal job execution whose terminal handling has not finished yet."""

    thing: str
    job_id: str
    status: JobExecutionStatus
    status_details: dict[str, str]
    recorded: float
    attempts: int = 0  # failed attempts so far, over every run of the engine
    last_error: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.thing, self.job_id

    def event(self) -> JobExecutionEvent:
        """What the terminal rule forwards (as AWS IoT's job execution event carries it)."""
        return JobExecutionEvent(self.thing, self.job_id, self.status, dict(self.status_details))


def record_terminal(
    conn: sqlite3.Connection,
    thing: str,
    job_id: str,
    status: JobExecutionStatus,
    status_details: dict[str, str],
    now: float,
) -> None:
    """Inside the transaction that makes the execution terminal (a terminal execution never changes
    again, so there is one row per execution)."""
    conn.execute(
        "INSERT OR REPLACE INTO terminal_work VALUES (?, ?, ?, ?, ?, 0, NULL)",
        (thing, job_id, status.value, json.dumps(status_details), now),
    )


class TerminalWorkStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def pending(self) -> list[TerminalWork]:
        """Every row, oldest first."""
        return [_work(r) for r in self.db.query("SELECT * FROM terminal_work ORDER BY recorded, rowid")]

    def get(self, thing: str, job_id: str) -> TerminalWork | None:
        rows = self.db.query("SELECT * FROM terminal_work WHERE thing_name=? AND job_id=?", (thing, job_id))
        return _work(rows[0]) if rows else None

    def done(self, thing: str, job_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM terminal_work WHERE thing_name=? AND job_id=?", (thing, job_id))

    def failed(self, thing: str, job_id: str, error: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE terminal_work SET attempts=attempts+1, last_error=? WHERE thing_name=? AND job_id=?",
                (error[:2000], thing, job_id),
            )


def _work(row: sqlite3.Row) -> TerminalWork:
    return TerminalWork(
        thing=row["thing_name"],
        job_id=row["job_id"],
        status=JobExecutionStatus(row["status"]),
        status_details=json.loads(row["status_details"]),
        recorded=row["recorded"],
        attempts=row["attempts"],
        last_error=row["last_error"],
    )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Back-off between the tries of one engine run: first_delay_s, doubling, at most max_delay_s; after
    `tries` failed tries the work waits for the next start-up (8 tries ≈ 2 minutes by default)."""

    first_delay_s: float = 1.0
    max_delay_s: float = 60.0
    tries: int = 8

    def __post_init__(self) -> None:
        if self.first_delay_s <= 0 or self.max_delay_s < self.first_delay_s or self.tries < 1:
            raise ValueError(f"invalid terminal retry policy {self}")

    def delay(self, failures: int) -> float | None:
        """Seconds until the next try after `failures` failed tries in this run; None = no more. Pure."""
        if failures >= self.tries:
            return None
        return float(min(self.first_delay_s * 2 ** max(failures - 1, 0), self.max_delay_s))


Handle = Callable[[TerminalWork], None]
Unit = Callable[[], AbstractContextManager[None]]


class TerminalWorker:
    """Runs recorded terminal work on the engine's loop: `due()` after a status change, `run_due()` once
    its transaction has committed (the engine does, after every unit of work; a soon-callback catches
    the rest). `handle` runs the terminal rule and raises if the work must be tried again; `unit` is
    the engine's unit of work (one transaction, its publishes sent after the commit)."""

    def __init__(
        self, store: TerminalWorkStore, handle: Handle, unit: Unit, notifier: Notifier, policy: RetryPolicy
    ) -> None:
        self.store = store
        self.policy = policy
        self._handle = handle
        self._unit = unit
        self._notifier = notifier
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due: deque[tuple[str, str]] = deque()
        self._soon: asyncio.Handle | None = None
        self._failures: dict[tuple[str, str], int] = {}  # failed tries in this run
        self._retries: dict[tuple[str, str], asyncio.TimerHandle] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> int:
        """Finish what the previous run of the engine left (a crash, failures); returns how many rows
        there were."""
        self._loop = loop
        left = self.store.pending()
        if left:
            log.warning(
                "finishing the terminal handling of %d job execution(s) left by the last run", len(left)
            )
        for work in left:
            self._run(work.key)
        return len(left)

    def stop(self) -> None:
        for timer in self._retries.values():
            timer.cancel()
        self._retries.clear()
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        self._due.clear()
        self._loop = None

    def due(self, thing: str, job_id: str) -> None:
        """The execution became terminal in the transaction under way: run its work after the commit."""
        self._due.append((thing, job_id))
        if self._loop is not None and self._soon is None:
            self._soon = self._loop.call_soon(self.run_due)

    def run_due(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        while self._due and self._loop is not None:
            self._run(self._due.popleft())

    def _run(self, key: tuple[str, str]) -> None:
        self._retries.pop(key, None)
        work = self.store.get(*key)
        if work is None:
            return  # finished already, or the status change it belongs to never committed
        crash_point(CRASH_TERMINAL_RECORDED)
        try:
            with self._unit():
                self._handle(work)
                self.store.done(*key)
        except Exception as exc:
            self._failed(work, exc)
        else:
            self._failures.pop(key, None)

    def _failed(self, work: TerminalWork, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        failures = self._failures.get(work.key, 0) + 1
        self._failures[work.key] = failures
        try:
            self.store.failed(work.thing, work.job_id, error)
        except Exception:
            log.exception("recording the failure of %s's terminal handling failed", work.thing)
        delay = self.policy.delay(failures)
        if delay is not None and self._loop is not None:
            log.warning(
                "terminal handling of %s / %s (%s) failed (try %d of %d), again in %.3g s: %s",
                work.thing,
                work.job_id,
                work.status.value,
                failures,
                self.policy.tries,
                delay,
                error,
                exc_info=exc,
            )
            self._retries[work.key] = self._loop.call_later(delay, self._run, work.key)
            return
        log.error(
            "terminal handling of %s / %s (%s) failed %d times; left for the next start of the engine: %s",
            work.thing,
            work.job_id,
            work.status.value,
            failures,
            error,
            exc_info=exc,
        )
        try:
            self._notifier.notify(
                Notification(
                    work.thing,
                    work.job_id,
                    work.status.value,
                    f"terminal handling failed {failures} times: {error}",
                    "see the engine's log; it is tried again when the engine restarts, and "
                    "`certrotator reconcile` settles what it left",
                    {"recordedAt": str(work.recorded)},
                )
            )
        except Exception:
            log.exception("notifying the failed terminal handling of %s failed", work.thing)
