"""Local IoT Jobs' store: templates, jobs, rollout, job executions and their transitions, kept in the
shared SQLite database with AWS semantics.

The records are in `local.job_records`, the device's update rule in `local.jobs_api`. Timing (rollout
ticks, in-progress timeouts) is driven by the engine, which asks this module what is due; nothing here
sleeps or polls.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from certrotator.local.db import Database
from certrotator.local.job_records import DEFAULT_CONFIG, Execution, JobConfig, JobError, Rejection
from certrotator.local.terminal_work import record_terminal
from certrotator.protocol import (
    ACTIVE_EXECUTION_STATUSES,
    JOB_DOCUMENT,
    PENDING_ROLLOUT,
    JobExecutionStatus,
    JobStatus,
    validate_job_id,
)

# The records are imported from here by most of the engine: one place to find the Jobs vocabulary.
__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_TEMPLATE",
    "Execution",
    "JobConfig",
    "JobError",
    "JobStore",
    "Rejection",
]

S = JobExecutionStatus
T = TypeVar("T")
DEFAULT_TEMPLATE = "AWSLabsCertificateRotator"

# SQL takes statuses as parameters, from protocol.py's sets: `status IN {_ACTIVE_IN}` with *_ACTIVE.
_ACTIVE: tuple[str, ...] = tuple(sorted(s.value for s in ACTIVE_EXECUTION_STATUSES))
_ACTIVE_IN = f"({','.join('?' * len(_ACTIVE))})"

# The local IoT Core's admission limit: executions in flight at once, engine-wide (see engine.py).
DEFAULT_MAX_IN_FLIGHT = 32


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        # A job's configuration never changes, and every device update needs it: parsed once per job.
        self._configs: dict[str, JobConfig] = {}
        self._documents: dict[str, dict[str, Any]] = {}

    # -------------------------------------------------------------------------------- templates

    def put_template(self, name: str, document: dict[str, Any], config: JobConfig) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO job_templates VALUES (?, ?, ?)",
                (name, json.dumps(document), config.to_json()),
            )

    def ensure_default_template(self) -> None:
        if self.template(DEFAULT_TEMPLATE) is None:
            self.put_template(DEFAULT_TEMPLATE, dict(JOB_DOCUMENT), DEFAULT_CONFIG)

    def template(self, name: str) -> tuple[dict[str, Any], JobConfig] | None:
        rows = self.db.query("SELECT document, config FROM job_templates WHERE name=?", (name,))
        if not rows:
            return None
        return json.loads(rows[0]["document"]), JobConfig.from_json(rows[0]["config"])

    # ------------------------------------------------------------------------------------- jobs

    def create_job(
        self, job_id: str, document: dict[str, Any], things: list[str], config: JobConfig, targets: list[str]
    ) -> None:
        try:
            validate_job_id(job_id)
        except ValueError as exc:
            raise JobError("InvalidRequest", str(exc)) from None
        if not things:
            raise JobError("InvalidRequest", "a job needs at least one target thing")
        now = time.time()
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE job_id=?", (job_id,)).fetchone():
                raise JobError("ResourceAlreadyExists", f"job {job_id!r} already exists")
            conn.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (
                    job_id,
                    json.dumps(document),
                    config.to_json(),
                    json.dumps(targets),
                    JobStatus.IN_PROGRESS,
                    now,
                ),
            )
            conn.executemany(
                "INSERT INTO job_pending VALUES (?, ?, ?)", [(job_id, i, t) for i, t in enumerate(things)]
            )

    def job(self, job_id: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT * FROM jobs WHERE job_id=?", (job_id,))
        if not rows:
            return None
        r = rows[0]
        return {
            "jobId": r["job_id"],
            "document": json.loads(r["document"]),
            "config": JobConfig.from_json(r["config"]),
            "targets": json.loads(r["targets"]),
            "status": r["status"],
            "created": r["created"],
            "completed": r["completed"],
        }

    def status(self, job_id: str) -> str | None:
        rows = self.db.query("SELECT status FROM jobs WHERE job_id=?", (job_id,))
        return str(rows[0]["status"]) if rows else None

    def config(self, job_id: str) -> JobConfig | None:
        """The job's rollout and timeout configuration (immutable after creation), or None."""
        return self._immutable(self._configs, "config", job_id, JobConfig.from_json)

    def document(self, job_id: str) -> dict[str, Any] | None:
        """The job's document (immutable after creation), or None if there is no such job."""
        document = self._immutable(self._documents, "document", job_id, json.loads)
        return None if document is None else dict(document)

    def _immutable(
        self, cache: dict[str, T], column: str, job_id: str, parse: Callable[[str], T]
    ) -> T | None:
        """A column of the job that never changes after creation, parsed once per job."""
        value = cache.get(job_id)
        if value is None:
            rows = self.db.query(f"SELECT {column} FROM jobs WHERE job_id=?", (job_id,))
            if not rows:
                return None
            value = cache[job_id] = parse(rows[0][column])
        return value

    def jobs(self) -> list[dict[str, Any]]:
        ids = [r["job_id"] for r in self.db.query("SELECT job_id FROM jobs ORDER BY created")]
        return [j for j in (self.job(i) for i in ids) if j is not None]

    def active_jobs(self) -> list[str]:
        rows = self.db.query("SELECT job_id FROM jobs WHERE status=?", (JobStatus.IN_PROGRESS,))
        return [r["job_id"] for r in rows]

    def pending_count(self, job_id: str) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM job_pending WHERE job_id=?", (job_id,))[0][0])

    def release(self, job_id: str, count: int, now: float) -> list[str]:
        """Roll out up to `count` pending targets as QUEUED executions; returns their things."""
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT seq, thing_name FROM job_pending WHERE job_id=? ORDER BY seq LIMIT ?", (job_id, count)
            ).fetchall()
            released = []
            for row in rows:
                thing = row["thing_name"]
                number = conn.execute(
                    "SELECT COUNT(*) FROM job_executions WHERE thing_name=?", (thing,)
                ).fetchone()[0]
                conn.execute(
                    "INSERT OR IGNORE INTO job_executions VALUES (?, ?, ?, '{}', 1, ?, ?, NULL, ?, NULL)",
                    (job_id, thing, S.QUEUED, number + 1, now, now),
                )
                conn.execute("DELETE FROM job_pending WHERE job_id=? AND seq=?", (job_id, row["seq"]))
                released.append(thing)
        return released

    def admitted_count(self, job_ids: Sequence[str], since: float) -> int:
        """Open executions of these jobs released at or after `since` (the engine's admission window)."""
        if not job_ids:
            return 0
        marks = ",".join("?" * len(job_ids))
        rows = self.db.query(
            f"SELECT COUNT(*) FROM job_executions WHERE job_id IN ({marks}) "
            f"AND status IN {_ACTIVE_IN} AND queued_at >= ?",
            (*job_ids, *_ACTIVE, since),
        )
        return int(rows[0][0])

    def status_counts(self, job_id: str) -> dict[str, int]:
        rows = self.db.query(
            "SELECT status, COUNT(*) AS n FROM job_executions WHERE job_id=? GROUP BY status", (job_id,)
        )
        counts = {r["status"]: int(r["n"]) for r in rows}
        pending = self.pending_count(job_id)
        if pending:
            counts[PENDING_ROLLOUT] = pending
        return counts

    def succeeded_count(self, job_id: str) -> int:
        rows = self.db.query(
            "SELECT COUNT(*) FROM job_executions WHERE job_id=? AND status=?", (job_id, S.SUCCEEDED)
        )
        return int(rows[0][0])

    def complete_if_done(self, job_id: str, now: float) -> bool:
        # Runs for every terminal execution: EXISTS on the (job_id, status) index stops at the first
        # open execution instead of counting them all (see docs/performance.md).
        with self.db.transaction() as conn:
            open_ = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM job_pending WHERE job_id=?) OR EXISTS (SELECT 1 FROM "
                f"job_executions WHERE job_id=? AND status IN {_ACTIVE_IN})",
                (job_id, job_id, *_ACTIVE),
            ).fetchone()[0]
            if open_:
                return False
            conn.execute(
                "UPDATE jobs SET status=?, completed=? WHERE job_id=? AND status=?",
                (JobStatus.COMPLETED, now, job_id, JobStatus.IN_PROGRESS),
            )
        return True

    # ------------------------------------------------------------------------------- executions

    def execution(self, thing: str, job_id: str) -> Execution | None:
        rows = self.db.query(
            "SELECT e.*, j.document FROM job_executions e JOIN jobs j USING (job_id) "
            "WHERE e.thing_name=? AND e.job_id=?",
            (thing, job_id),
        )
        return _execution(rows[0]) if rows else None

    def next_execution(self, thing: str) -> Execution | None:
        """AWS's $next: IN_PROGRESS executions first, then QUEUED, oldest first."""
        rows = self.db.query(
            "SELECT e.*, j.document FROM job_executions e JOIN jobs j USING (job_id) "
            f"WHERE e.thing_name=? AND e.status IN {_ACTIVE_IN} "
            "ORDER BY e.status=?, e.queued_at, e.job_id LIMIT 1",
            (thing, *_ACTIVE, S.QUEUED),
        )
        return _execution(rows[0]) if rows else None

    def executions(self, job_id: str) -> list[Execution]:
        rows = self.db.query(
            "SELECT e.*, j.document FROM job_executions e JOIN jobs j USING (job_id) WHERE e.job_id=? "
            "ORDER BY e.thing_name",
            (job_id,),
        )
        return [_execution(r) for r in rows]

    def save_execution(self, execution: Execution, expected_version: int) -> None:
        """Optimistic write: fails with VersionMismatch if someone else updated it meanwhile. A terminal
        status also records the terminal work, in the same transaction (local/terminal_work.py)."""
        with self.db.transaction() as conn:
            changed = conn.execute(
                "UPDATE job_executions SET status=?, status_details=?, version=?, started_at=?, updated_at=?, "
                "timeout_at=? WHERE job_id=? AND thing_name=? AND version=?",
                (
                    execution.status.value,
                    json.dumps(execution.status_details),
                    execution.version,
                    execution.started_at,
                    execution.updated_at,
                    execution.timeout_at,
                    execution.job_id,
                    execution.thing,
                    expected_version,
                ),
            ).rowcount
            if changed and execution.status.is_terminal:
                record_terminal(
                    conn,
                    execution.thing,
                    execution.job_id,
                    execution.status,
                    execution.status_details,
                    execution.updated_at,
                )
        if not changed:
            raise JobError("VersionMismatch", "the job execution changed meanwhile; get it and retry")

    def record_rejection(self, rejection: Rejection) -> None:
        """Keep `rejection` as the execution's last refused update (nothing when there is no such
        execution: AWS's ResourceNotFound has nothing to attach it to)."""
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO job_rejections SELECT job_id, thing_name, ?, ?, ?, ? "
                "FROM job_executions WHERE job_id=? AND thing_name=?",
                (
                    rejection.requested_status,
                    rejection.code,
                    rejection.message,
                    rejection.at,
                    rejection.job_id,
                    rejection.thing,
                ),
            )

    def rejections(self, job_id: str) -> list[Rejection]:
        """The last refused device update of each of the job's executions that had one, by thing."""
        rows = self.db.query("SELECT * FROM job_rejections WHERE job_id=? ORDER BY thing_name", (job_id,))
        return [
            Rejection(
                r["job_id"], r["thing_name"], r["requested_status"], r["code"], r["message"], r["rejected"]
            )
            for r in rows
        ]

    def timeouts_due(self, now: float) -> list[Execution]:
        rows = self.db.query(
            "SELECT e.*, j.document FROM job_executions e JOIN jobs j USING (job_id) "
            "WHERE e.timeout_at IS NOT NULL AND e.timeout_at <= ? AND e.status=?",
            (now, S.IN_PROGRESS),
        )
        return [_execution(r) for r in rows]

    def expire_timeouts(self, now: float) -> list[Execution]:
        """IN_PROGRESS executions past their timeout become TIMED_OUT; returns those that did (one the
        device updated meanwhile keeps the device's update)."""
        expired = []
        for e in self.timeouts_due(now):
            timed_out = replace(e, status=S.TIMED_OUT, version=e.version + 1, updated_at=now, timeout_at=None)
            try:
                self.save_execution(timed_out, e.version)
            except JobError:
                continue
            expired.append(timed_out)
        return expired

    def next_timeout(self) -> float | None:
        rows = self.db.query("SELECT MIN(timeout_at) FROM job_executions WHERE status=?", (S.IN_PROGRESS,))
        value = rows[0][0]
        return float(value) if value is not None else None

    def cancel(self, job_id: str, force: bool, now: float) -> list[Execution]:
        """Cancel a job: QUEUED executions (and IN_PROGRESS ones with force) become CANCELED."""
        if self.job(job_id) is None:
            raise JobError("ResourceNotFound", f"job {job_id!r} does not exist")
        statuses = ACTIVE_EXECUTION_STATUSES if force else {S.QUEUED}
        canceled = [e for e in self.executions(job_id) if e.status in statuses]
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM job_pending WHERE job_id=?", (job_id,))
            for e in canceled:
                conn.execute(
                    "UPDATE job_executions SET status=?, version=version+1, updated_at=?, timeout_at=NULL "
                    "WHERE job_id=? AND thing_name=?",
                    (S.CANCELED, now, job_id, e.thing),
                )
                record_terminal(conn, e.thing, job_id, S.CANCELED, e.status_details, now)
            conn.execute(
                "UPDATE jobs SET status=?, completed=? WHERE job_id=?", (JobStatus.CANCELED, now, job_id)
            )
        return [replace(e, status=S.CANCELED, version=e.version + 1, updated_at=now) for e in canceled]


def _execution(row: Any) -> Execution:
    return Execution(
        job_id=row["job_id"],
        thing=row["thing_name"],
        status=S(row["status"]),
        status_details=json.loads(row["status_details"]),
        version=row["version"],
        execution_number=row["execution_number"],
        queued_at=row["queued_at"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        timeout_at=row["timeout_at"],
        document=json.loads(row["document"]),
    )
