"""What a rotation job may override of its template (rollout, timeout, retries, abort), in the CLI's
terms, checked against AWS IoT Jobs' limits before any API call and converted to create_job's shapes."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from certrotator.ops.aws.clients import OperationError
from certrotator.protocol import JobExecutionStatus as S

# AWS IoT Jobs' limits (CreateJob API reference), checked before calling it.
MAX_PER_MINUTE: Final = 1000
INCREMENT_FACTOR_RANGE: Final = (Decimal("1.1"), Decimal("5"))
MAX_IN_PROGRESS_TIMEOUT_MINUTES: Final = 10080
MAX_RETRIES: Final = 10


def _decimal_places(value: float) -> int:
    try:
        exponent = Decimal(str(value)).normalize().as_tuple().exponent
    except InvalidOperation:
        return 99
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _check_range(option: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise OperationError(f"{option} must be {low:g}-{high:g}, not {value:g}")


@dataclass(frozen=True, slots=True)
class JobOverrides:
    """What a job may override of its template, in CLI terms; `to_api()` validates and converts."""

    max_per_minute: int | None = None
    base_rate: int | None = None
    increment_factor: float | None = None
    succeeded_per_increase: int | None = None
    in_progress_timeout_minutes: int | None = None
    retry_failed: int | None = None
    retry_timed_out: int | None = None
    abort_failure_percent: float | None = None
    abort_min_executed: int | None = None

    def to_api(self) -> dict[str, Any]:
        """create_job keyword arguments in AWS's JSON shapes; OperationError before any AWS call."""
        api: dict[str, Any] = {}
        if rollout := self._rollout():
            api["jobExecutionsRolloutConfig"] = rollout
        if self.in_progress_timeout_minutes is not None:
            _check_range(
                "--in-progress-timeout-minutes",
                self.in_progress_timeout_minutes,
                1,
                MAX_IN_PROGRESS_TIMEOUT_MINUTES,
            )
            api["timeoutConfig"] = {"inProgressTimeoutInMinutes": self.in_progress_timeout_minutes}
        retries = []
        for option, failure_type, count in (
            ("--retry-failed", S.FAILED.value, self.retry_failed),
            ("--retry-timed-out", S.TIMED_OUT.value, self.retry_timed_out),
        ):
            if count is not None:
                _check_range(option, count, 0, MAX_RETRIES)
                retries.append({"failureType": failure_type, "numberOfRetries": count})
        if retries:
            api["jobExecutionsRetryConfig"] = {"criteriaList": retries}
        if abort := self._abort():
            api["abortConfig"] = abort
        return api

    def _rollout(self) -> dict[str, Any]:
        rollout: dict[str, Any] = {}
        if self.max_per_minute is not None:
            _check_range("--max-per-minute", self.max_per_minute, 1, MAX_PER_MINUTE)
            rollout["maximumPerMinute"] = self.max_per_minute
        exponential = (self.base_rate, self.increment_factor, self.succeeded_per_increase)
        if all(v is None for v in exponential):
            return rollout
        if self.base_rate is None or self.increment_factor is None or self.succeeded_per_increase is None:
            raise OperationError(
                "an exponential rollout needs all of --base-rate, --increment-factor and --succeeded-per-increase"
            )
        _check_range("--base-rate", self.base_rate, 1, MAX_PER_MINUTE)
        low, high = INCREMENT_FACTOR_RANGE
        _check_range("--increment-factor", self.increment_factor, float(low), float(high))
        if _decimal_places(self.increment_factor) > 1:
            raise OperationError(
                f"--increment-factor takes one digit after the decimal point (e.g. 1.5), not {self.increment_factor}"
            )
        if self.succeeded_per_increase < 1:
            raise OperationError(
                f"--succeeded-per-increase must be at least 1, not {self.succeeded_per_increase}"
            )
        if self.max_per_minute is not None and self.base_rate > self.max_per_minute:
            raise OperationError(
                f"--base-rate ({self.base_rate}) cannot exceed --max-per-minute ({self.max_per_minute})"
            )
        rollout["exponentialRate"] = {
            "baseRatePerMinute": self.base_rate,
            "incrementFactor": self.increment_factor,
            "rateIncreaseCriteria": {"numberOfSucceededThings": self.succeeded_per_increase},
        }
        return rollout

    def _abort(self) -> dict[str, Any]:
        percent, minimum = self.abort_failure_percent, self.abort_min_executed
        if percent is None and minimum is None:
            return {}
        if percent is None or minimum is None:
            raise OperationError("aborting needs both --abort-failure-percent and --abort-min-executed")
        if not 0 < percent <= 100:
            raise OperationError(f"--abort-failure-percent must be above 0 and at most 100, not {percent:g}")
        if _decimal_places(percent) > 2:
            raise OperationError(
                f"--abort-failure-percent takes at most two digits after the decimal point, not {percent}"
            )
        if minimum < 1:
            raise OperationError(f"--abort-min-executed must be at least 1, not {minimum}")
        # ALL: a rotation that timed out or was rejected failed just as much as one reported FAILED.
        criteria = {
            "failureType": "ALL",
            "action": "CANCEL",
            "thresholdPercentage": percent,
            "minNumberOfExecutedThings": minimum,
        }
        return {"criteriaList": [criteria]}
