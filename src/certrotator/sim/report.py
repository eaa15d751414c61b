"""What a job did to the simulated fleet: statuses, latencies and the invariant problems found."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from certrotator.protocol import JobExecutionStatus


@dataclass(frozen=True, slots=True)
class Problem:
    thing: str
    what: str


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (1 - 99) of `values`; 0.0 when there are none."""
    if len(values) < 2:
        return values[0] if values else 0.0
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


@dataclass
class JobReport:
    job_id: str
    devices: int
    statuses: dict[str, str]
    latencies_s: list[float]
    duration_s: float
    problems: list[Problem] = field(default_factory=list)

    def count(self, status: JobExecutionStatus) -> int:
        return sum(1 for s in self.statuses.values() if s == status.value)

    @property
    def verified(self) -> int:
        bad = {p.thing for p in self.problems}
        return sum(
            1 for thing, s in self.statuses.items() if s == JobExecutionStatus.SUCCEEDED and thing not in bad
        )

    def percentile(self, q: float) -> float:
        return percentile(self.latencies_s, q)

    def summary(self) -> dict[str, object]:
        succeeded = self.count(JobExecutionStatus.SUCCEEDED)
        return {
            "job_id": self.job_id,
            "devices": self.devices,
            "succeeded": succeeded,
            "failed": self.count(JobExecutionStatus.FAILED),
            "timed_out": self.count(JobExecutionStatus.TIMED_OUT),
            "other": self.devices
            - succeeded
            - self.count(JobExecutionStatus.FAILED)
            - self.count(JobExecutionStatus.TIMED_OUT),
            "verified": self.verified,
            "duration_s": round(self.duration_s, 3),
            "rotations_per_s": round(succeeded / self.duration_s, 2) if self.duration_s > 0 else 0.0,
            "p50_s": round(self.percentile(50), 3),
            "p99_s": round(self.percentile(99), 3),
            "problems": [{"thing": p.thing, "problem": p.what} for p in self.problems],
        }
