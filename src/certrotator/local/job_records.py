"""Local IoT Jobs' records, with AWS semantics: a job's rollout and timeout configuration, a job
execution, a device update the Jobs API refused, and the error that carries AWS's code. Pure values;
`local.jobs` keeps them, `local.jobs_api` applies devices' updates to them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from certrotator.protocol import JobExecutionStatus


class JobError(ValueError):
    """A Jobs API request that AWS would reject; `code` is AWS's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class JobConfig:
    """Rollout and timeout configuration (AWS's jobExecutionsRolloutConfig + timeoutConfig)."""

    # None = release every target at once. 300: the ceiling of the AWS template (ops/aws/quotas.py).
    max_per_minute: int | None = 300
    base_rate_per_minute: int | None = 100  # exponential rollout; None = flat max_per_minute
    increment_factor: float = 1.2
    succeeded_per_increase: int = 100
    in_progress_timeout_s: float | None = 300.0

    def __post_init__(self) -> None:
        if self.max_per_minute is not None and not 1 <= self.max_per_minute <= 1000:
            raise JobError("InvalidRequest", "maximumPerMinute must be between 1 and 1000")
        if self.base_rate_per_minute is not None and not 1 <= self.base_rate_per_minute <= 1000:
            raise JobError("InvalidRequest", "baseRatePerMinute must be between 1 and 1000")
        if not 1.1 <= self.increment_factor <= 5:
            raise JobError("InvalidRequest", "incrementFactor must be between 1.1 and 5")
        if self.succeeded_per_increase < 1:
            raise JobError("InvalidRequest", "numberOfSucceededThings must be at least 1")
        if self.in_progress_timeout_s is not None and self.in_progress_timeout_s <= 0:
            raise JobError("InvalidRequest", "the in-progress timeout must be positive")

    def rate_per_minute(self, succeeded: int) -> float | None:
        """Executions released per minute after `succeeded` successes; None = unlimited."""
        if self.base_rate_per_minute is None:
            return None if self.max_per_minute is None else float(self.max_per_minute)
        rate = self.base_rate_per_minute * self.increment_factor ** (succeeded // self.succeeded_per_increase)
        return rate if self.max_per_minute is None else min(rate, float(self.max_per_minute))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobConfig:
        return cls(**json.loads(text))


# The stack's template: 100/min, ×1.2 per 100 successes up to 300/min, 5 min in-progress timeout.
DEFAULT_CONFIG = JobConfig()


@dataclass(frozen=True, slots=True)
class Execution:
    job_id: str
    thing: str
    status: JobExecutionStatus
    status_details: dict[str, str]
    version: int
    execution_number: int
    queued_at: float
    started_at: float | None
    updated_at: float
    timeout_at: float | None
    document: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A device's update of a job execution that the Jobs API refused (the device got `/rejected`);
    the store keeps the last one per execution, so that `jobs describe` can say why an execution did
    not move instead of showing a silent QUEUED."""

    job_id: str
    thing: str
    requested_status: str
    code: str
    message: str
    at: float
