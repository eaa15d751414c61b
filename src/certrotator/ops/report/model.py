"""The fleet certificate report as data: one row per thing (its certificate, the last rotation and its
outcome, the next one the renewal policy would schedule), the days-to-expiry histogram and the rotations
over time. Pure: built from the schedule's facts, a time and the policy's settings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from certrotator.ops.schedule.policy import Decision, ThingFacts, Verdict, decide
from certrotator.ops.schedule.settings import DAY, Settings, format_duration

# Days-to-expiry bins: (label, upper bound in days, exclusive); the first holds the expired.
EXPIRY_BINS: Final[tuple[tuple[str, float], ...]] = (
    ("expired", 0),
    ("< 7 d", 7),
    ("7-30 d", 30),
    ("30-90 d", 90),
    ("90-180 d", 180),
    ("180-365 d", 365),
    ("1-2 y", 730),
    ("2-10 y", 3650),
    ("> 10 y", float("inf")),
)


@dataclass(frozen=True, slots=True)
class Row:
    thing: str
    decision: Decision
    now: float

    @property
    def days_left(self) -> float | None:
        cert = self.decision.certificate
        return None if cert is None else self._days(cert.not_after)

    def _days(self, ts: float) -> float:
        return (ts - self.now) / DAY

    def next_rotation(self) -> str:
        """What the policy would do next, in words a table cell holds."""
        d = self.decision
        if d.verdict is Verdict.ROTATE:
            return "due now"
        if d.verdict in (Verdict.WAIT, Verdict.BACKOFF) and d.next_at is not None:
            backoff = " (back-off)" if d.verdict is Verdict.BACKOFF else ""
            return f"in {format_duration(d.next_at - self.now)}{backoff}"
        return str(d.verdict.value)

    def to_dict(self) -> dict[str, Any]:
        d, cert, last = self.decision, self.decision.certificate, self.decision.last_rotation
        return {
            "thing": self.thing,
            "certificateId": cert.certificate_id if cert else None,
            "issuer": cert.issuer if cert else None,
            "keyAlgorithm": cert.key_algorithm if cert else None,
            "notAfter": cert.not_after if cert else None,
            "daysLeft": None if self.days_left is None else round(self.days_left, 2),
            "lastRotation": None
            if last is None
            else {"jobId": last.job_id, "status": last.status, "endedAt": last.ended_at},
            "nextRotation": self.next_rotation(),
            "nextRotationAt": d.next_at if d.verdict in (Verdict.WAIT, Verdict.BACKOFF) else None,
            "decision": d.verdict.value,
            "reason": d.reason,
        }


@dataclass(frozen=True, slots=True)
class RotationPoint:
    ended_at: float
    succeeded: bool


@dataclass(frozen=True, slots=True)
class Report:
    now: float
    settings: Settings
    rows: list[Row]
    rotations: list[RotationPoint]  # every ended rotation of the fleet, oldest first

    def histogram(self) -> list[tuple[str, int]]:
        counts: Counter[str] = Counter()
        for row in self.rows:
            days = row.days_left
            if days is None:
                continue
            label = next(label for label, upper in EXPIRY_BINS if days < upper)
            counts[label] += 1
        return [(label, counts[label]) for label, _ in EXPIRY_BINS]

    def to_dict(self) -> dict[str, Any]:
        return {
            "generatedAt": self.now,
            "policy": self.settings.describe(),
            "things": [r.to_dict() for r in self.rows],
            "daysToExpiry": dict(self.histogram()),
            "rotations": {
                "succeeded": sum(1 for r in self.rotations if r.succeeded),
                "failed": sum(1 for r in self.rotations if not r.succeeded),
            },
        }


def build_report(fleet: Iterable[ThingFacts], now: float, settings: Settings) -> Report:
    rows: list[Row] = []
    points: list[RotationPoint] = []
    for facts in fleet:
        rows.append(Row(facts.thing, decide(facts, now, settings), now))
        points.extend(
            RotationPoint(r.ended_at, r.succeeded) for r in facts.rotations if r.ended_at is not None
        )
    rows.sort(key=lambda r: (r.days_left is None, r.days_left or 0.0, r.thing))
    return Report(now, settings, rows, sorted(points, key=lambda p: p.ended_at))
