"""`schedule` on the local IoT Core: from the CLI on a data directory, or inside the running engine.

Facts are read from the data directory's database in five queries for the whole fleet (things, groups,
attached certificates, rotation job executions, targets not rolled out yet), not per thing: a run over
100,000 things must not make 500,000 queries. They read the registry's and job store's tables directly
(read-only, safe beside a running engine: WAL); `LocalRegistry` and `JobStore` answer per thing only.

Jobs are created the way `certrotator jobs create` creates them: a `JobRequest` through the running
engine's admin endpoint (it schedules the rollout and notifies devices), or, with no engine running,
`operations.create_job` on the database (the engine rolls it out when it starts). Inside the engine
(`local up --schedule`) the engine's own `create_job` does it, on its loop.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from certrotator.local import admin, operations
from certrotator.local.db import Database
from certrotator.local.jobs import JobStore
from certrotator.local.operations import JobRequest
from certrotator.local.registry import LocalRegistry
from certrotator.ops.schedule.facts import certificate_details
from certrotator.ops.schedule.policy import CertificateFacts, Rotation, ThingFacts, Verdict
from certrotator.ops.schedule.runner import RunResult, run
from certrotator.ops.schedule.settings import Settings
from certrotator.protocol import PENDING_ROLLOUT, is_rotation_document

Clock = Callable[[], float]
log = logging.getLogger("certrotator.schedule")


def read_fleet(db: Database, group: str | None = None, *, details: bool = False) -> list[ThingFacts]:
    """Every thing's facts (the group's direct members when given; RegistryError if there is no such
    group). `details` adds each certificate's issuer and key algorithm (parses every PEM)."""
    registry = LocalRegistry(db)
    things = registry.group_members(group) if group is not None else registry.things()
    groups: dict[str, list[str]] = defaultdict(list)
    for row in db.query("SELECT group_name, thing_name FROM group_members ORDER BY group_name"):
        groups[row["thing_name"]].append(row["group_name"])
    certificates: dict[str, list[CertificateFacts]] = defaultdict(list)
    columns = "p.thing_name, c.id, c.status, c.issuer, c.not_before, c.not_after" + (
        ", c.pem" if details else ""
    )
    for row in db.query(
        f"SELECT {columns} FROM thing_principals p JOIN certificates c ON c.id = p.certificate_id "
        "ORDER BY p.attached, c.id"
    ):
        issuer, key_algorithm = certificate_details(row["pem"]) if details else (row["issuer"], "")
        certificates[row["thing_name"]].append(
            CertificateFacts(
                row["id"], row["not_before"], row["not_after"], row["status"], issuer, key_algorithm
            )
        )
    rotations = _rotations(db)
    return [
        ThingFacts(t, tuple(certificates.get(t, ())), tuple(rotations.get(t, ())), tuple(groups.get(t, ())))
        for t in things
    ]


def _rotations(db: Database) -> dict[str, list[Rotation]]:
    """Executions of rotation jobs per thing, the targets a rollout has not released counted as
    PENDING_ROLLOUT (active: the thing is in a rotation job already)."""
    rotation_jobs = {
        row["job_id"]
        for row in db.query("SELECT job_id, document FROM jobs")
        if is_rotation_document(json.loads(row["document"]))
    }
    by_thing: dict[str, list[Rotation]] = defaultdict(list)
    for row in db.query("SELECT job_id, thing_name, status, queued_at, updated_at FROM job_executions"):
        if row["job_id"] in rotation_jobs:
            status = str(row["status"])
            rotation = Rotation(row["job_id"], status, row["queued_at"], None)
            if not rotation.active:
                rotation = Rotation(row["job_id"], status, row["queued_at"], row["updated_at"])
            by_thing[row["thing_name"]].append(rotation)
    for row in db.query(
        "SELECT p.job_id, p.thing_name, j.created FROM job_pending p JOIN jobs j USING (job_id)"
    ):
        if row["job_id"] in rotation_jobs:
            by_thing[row["thing_name"]].append(Rotation(row["job_id"], PENDING_ROLLOUT, row["created"]))
    return by_thing


def job_request(job_id: str, things: Sequence[str]) -> JobRequest:
    """What `certrotator jobs create --thing ...` sends: the default template, nothing overridden."""
    return JobRequest(job_id, tuple(things))


# ------------------------------------------------------------------------------------ CLI: data dir


class DataDirBackend:
    """`certrotator schedule --data-dir DIR`: facts from the database, jobs through the running engine
    (or the database when none runs, as `jobs create` does)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.db = Database(data_dir)
        self.engine_running = admin.running_engine(data_dir) is not None

    def close(self) -> None:
        self.db.close()

    def fleet(self, group: str | None) -> list[ThingFacts]:
        return read_fleet(self.db, group)

    def create_job(self, job_id: str, things: Sequence[str]) -> None:
        request = job_request(job_id, things)
        live, _ = admin.call(self.data_dir, "create_job", **request.to_json())
        if not live:
            store = JobStore(self.db)
            store.ensure_default_template()  # as `jobs create`: jobs before the engine ever ran here
            operations.create_job(LocalRegistry(self.db), store, request)


def schedule_data_dir(
    data_dir: Path, settings: Settings, *, dry_run: bool = False, clock: Clock = time.time
) -> tuple[RunResult, bool]:
    """One run from the CLI; also says whether an engine was running (jobs roll out now) or not."""
    backend = DataDirBackend(data_dir)
    try:
        return run(backend, settings, clock(), dry_run=dry_run), backend.engine_running
    finally:
        backend.close()


# ------------------------------------------------------------------------------ inside the engine


class EngineParts(Protocol):
    """What the in-engine scheduler uses of `LocalIoTCore`."""

    @property
    def db(self) -> Database: ...

    def create_job(self, request: JobRequest) -> None: ...


def log_run(result: RunResult) -> None:
    """`local up --schedule`'s report of a run: what it created, what needs an operator."""
    for job in result.jobs:
        if job.job_id in result.created:
            log.info("schedule: created rotation job %s for %d thing(s)", job.job_id, len(job.things))
    for job_id, why in result.failed.items():
        log.error("schedule: rotation job %s not created: %s", job_id, why)
    blocked = [d.thing for d in result.decisions if d.verdict is Verdict.BLOCKED]
    if blocked:
        log.warning(
            "schedule: %d thing(s) blocked (see `certrotator schedule --dry-run`): %s",
            len(blocked),
            blocked[:10],
        )


class EngineScheduler:
    """Periodic scheduling inside the engine (`local up --schedule SPEC`): call `run()` on the
    engine's loop (the engine's `add_periodic` does). Each run decides over the whole fleet and creates
    the jobs with the engine's own `create_job`; `on_run` is told each result (logs, metrics)."""

    def __init__(
        self,
        engine: EngineParts,
        settings: Settings,
        clock: Clock = time.time,
        on_run: Callable[[RunResult], None] | None = None,
    ) -> None:
        self.engine, self.settings, self.clock, self.on_run = engine, settings, clock, on_run
        self.last: RunResult | None = None

    def run(self) -> RunResult:
        result = run(self, self.settings, self.clock())
        self.last = result
        if self.on_run is not None:
            self.on_run(result)
        return result

    def fleet(self, group: str | None) -> list[ThingFacts]:
        return read_fleet(self.engine.db, group)

    def create_job(self, job_id: str, things: Sequence[str]) -> None:
        self.engine.create_job(job_request(job_id, things))
