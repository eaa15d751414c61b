"""The backend-neutral shell of `schedule`: gather the fleet's facts, plan (pure policy), create the
jobs through the backend's own job-creation path (`jobs create` locally, `aws create-job` on AWS).

A thing that starts a rotation between the look and the job's creation gets a second execution queued
behind the first; that one rotates once more, which costs a certificate, never a device. So there is
no second look: at fleet scale it would double every read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from certrotator.ops.schedule.policy import JOB_PREFIX, Decision, PlannedJob, ThingFacts, Verdict, plan
from certrotator.ops.schedule.settings import Settings

log = logging.getLogger("certrotator.schedule")


class Backend(Protocol):
    def fleet(self, group: str | None) -> Iterable[ThingFacts]:
        """The facts of every thing (of `group`'s direct members when given)."""
        ...

    def create_job(self, job_id: str, things: Sequence[str]) -> None:
        """A rotation job from the default template for exactly these things."""
        ...


@dataclass(frozen=True, slots=True)
class RunResult:
    decisions: list[Decision]
    jobs: list[PlannedJob]
    created: list[str] = field(default_factory=list)  # job ids created
    failed: dict[str, str] = field(default_factory=dict)  # job id -> why it was not created
    dry_run: bool = False

    def count(self, verdict: Verdict) -> int:
        return sum(1 for d in self.decisions if d.verdict is verdict)

    @property
    def needs_attention(self) -> bool:
        return bool(self.failed) or self.count(Verdict.BLOCKED) > 0

    def summary(self) -> dict[str, Any]:
        return {
            "things": len(self.decisions),
            **{verdict.value: self.count(verdict) for verdict in Verdict},
            "jobs": [{"jobId": j.job_id, "things": len(j.things)} for j in self.jobs],
            "created": list(self.created),
            "failed": dict(self.failed),
            "dryRun": self.dry_run,
        }


def run(
    backend: Backend,
    settings: Settings,
    now: float,
    *,
    dry_run: bool = False,
    job_prefix: str = JOB_PREFIX,
    fleet: Iterable[ThingFacts] | None = None,
) -> RunResult:
    """Plan over the backend's fleet (or the `fleet` given, e.g. the things an audit flagged) and,
    unless `dry_run`, create each planned job; one job's failure does not stop the others."""
    facts = backend.fleet(settings.group) if fleet is None else fleet
    schedule = plan(facts, now, settings, job_prefix)
    result = RunResult(schedule.decisions, schedule.jobs, dry_run=dry_run)
    if dry_run:
        return result
    for job in schedule.jobs:
        try:
            backend.create_job(job.job_id, job.things)
        except Exception as exc:  # reported per job: the next run plans those things again
            log.exception("creating rotation job %s failed", job.job_id)
            result.failed[job.job_id] = str(exc)
        else:
            result.created.append(job.job_id)
            log.info("created rotation job %s for %d things", job.job_id, len(job.things))
    return result
