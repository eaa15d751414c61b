"""What one readiness check of `certrotator aws check` found (shared by checks.py and migration.py)."""

from __future__ import annotations

from dataclasses import dataclass

from certrotator.compat import StrEnum


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"  # could not be confirmed; not counted as a failure
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status.value, "detail": self.detail, "fix": self.fix}


def failed(checks: list[Check]) -> bool:
    return any(c.status is Status.FAIL for c in checks)
