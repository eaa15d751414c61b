"""The local IoT Core's SQLite database: one file in the data directory, schema created or migrated
on open. WAL with synchronous=NORMAL: every commit survives a process crash (what the restart tests
check) without an fsync per message, which the ~11 messages of a rotation could not afford."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DB_FILE = "registry.sqlite3"

# Each entry migrates from version i to i+1; append, never edit, so old data directories upgrade.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE things (name TEXT PRIMARY KEY, created REAL NOT NULL);
    CREATE TABLE thing_groups (name TEXT PRIMARY KEY, created REAL NOT NULL);
    CREATE TABLE group_members (
        group_name TEXT NOT NULL REFERENCES thing_groups(name) ON DELETE CASCADE,
        thing_name TEXT NOT NULL REFERENCES things(name) ON DELETE CASCADE,
        PRIMARY KEY (group_name, thing_name));
    CREATE TABLE certificates (
        id TEXT PRIMARY KEY, pem TEXT NOT NULL, status TEXT NOT NULL, issuer TEXT NOT NULL,
        not_before REAL NOT NULL, not_after REAL NOT NULL, created REAL NOT NULL);
    CREATE TABLE policies (name TEXT PRIMARY KEY, document TEXT NOT NULL);
    CREATE TABLE policy_attachments (
        policy_name TEXT NOT NULL REFERENCES policies(name) ON DELETE CASCADE,
        certificate_id TEXT NOT NULL REFERENCES certificates(id) ON DELETE CASCADE,
        PRIMARY KEY (policy_name, certificate_id));
    -- exclusive attachment: a certificate belongs to at most one thing
    CREATE TABLE thing_principals (
        certificate_id TEXT PRIMARY KEY REFERENCES certificates(id) ON DELETE CASCADE,
        thing_name TEXT NOT NULL REFERENCES things(name) ON DELETE CASCADE,
        attached REAL NOT NULL);
    CREATE INDEX thing_principals_by_thing ON thing_principals(thing_name);
    CREATE TABLE rotation_state (
        thing_name TEXT PRIMARY KEY, job_id TEXT NOT NULL, old_certificate_id TEXT NOT NULL,
        new_certificate_id TEXT NOT NULL, progress TEXT NOT NULL);
    CREATE TABLE rules (name TEXT PRIMARY KEY, enabled INTEGER NOT NULL);
    CREATE TABLE notifications (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
        body TEXT NOT NULL);
    CREATE TABLE job_templates (name TEXT PRIMARY KEY, document TEXT NOT NULL, config TEXT NOT NULL);
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY, document TEXT NOT NULL, config TEXT NOT NULL, targets TEXT NOT NULL,
        status TEXT NOT NULL, created REAL NOT NULL, completed REAL);
    -- targets not yet rolled out (the rollout rate releases them into job_executions)
    CREATE TABLE job_pending (
        job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE, seq INTEGER NOT NULL,
        thing_name TEXT NOT NULL, PRIMARY KEY (job_id, seq));
    CREATE TABLE job_executions (
        job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
        thing_name TEXT NOT NULL, status TEXT NOT NULL, status_details TEXT NOT NULL,
        version INTEGER NOT NULL, execution_number INTEGER NOT NULL,
        queued_at REAL NOT NULL, started_at REAL, updated_at REAL NOT NULL, timeout_at REAL,
        PRIMARY KEY (job_id, thing_name));
    CREATE INDEX job_executions_by_thing ON job_executions(thing_name, status, queued_at);
    CREATE INDEX job_executions_timeouts ON job_executions(timeout_at) WHERE timeout_at IS NOT NULL;
    """,
    # Two per-rotation lookups that otherwise scan tables growing with the fleet (see docs/performance.md).
    """
    CREATE INDEX job_executions_by_job_status ON job_executions(job_id, status);
    CREATE INDEX policy_attachments_by_certificate ON policy_attachments(certificate_id);
    """,
    # Terminal executions whose terminal handling has not finished (local/terminal_work.py): written
    # with the status change, deleted with the handler's changes.
    """
    CREATE TABLE terminal_work (
        thing_name TEXT NOT NULL, job_id TEXT NOT NULL, status TEXT NOT NULL,
        status_details TEXT NOT NULL, recorded REAL NOT NULL, attempts INTEGER NOT NULL,
        last_error TEXT, PRIMARY KEY (thing_name, job_id));
    """,
    # The last device update each job execution refused (local/jobs.py), for `jobs describe`.
    """
    CREATE TABLE job_rejections (
        job_id TEXT NOT NULL, thing_name TEXT NOT NULL, requested_status TEXT NOT NULL,
        code TEXT NOT NULL, message TEXT NOT NULL, rejected REAL NOT NULL,
        PRIMARY KEY (job_id, thing_name),
        FOREIGN KEY (job_id, thing_name) REFERENCES job_executions(job_id, thing_name) ON DELETE CASCADE);
    """,
]


class Database:
    """A shared SQLite connection guarded by a lock (the engine's loop thread and its executor)."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / DB_FILE
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._depth = 0  # transactions open on this connection (nested ones are savepoints)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path} has schema version {version}, newer than this certrotator "
                    f"({len(MIGRATIONS)}): upgrade certrotator"
                )
            for step in MIGRATIONS[version:]:
                for statement in step.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version={len(MIGRATIONS)}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: other processes (admin CLI) wait on the busy timeout.

        Inside another transaction (see `batch`) this is a SAVEPOINT: still all or nothing, committed
        with the outer one."""
        with self._lock:
            if self._depth:
                with self._savepoint():
                    yield self._conn
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0
            self._conn.execute("COMMIT")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction for everything in the block: each `transaction()` inside is a savepoint, and
        what they did is committed at the end even if the block raises (as it would have been had each
        committed on its own). The engine handles each device message in one batch: one commit per
        message instead of one per change (see docs/performance.md, fix 6)."""
        with self._lock:
            if self._depth:
                yield
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0
                self._conn.execute("COMMIT")

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        name = f"nested{self._depth}"
        self._conn.execute(f"SAVEPOINT {name}")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._conn.execute(f"ROLLBACK TO {name}")
            raise
        finally:
            self._depth -= 1
            self._conn.execute(f"RELEASE {name}")

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
