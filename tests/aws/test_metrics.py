"""The Lambda functions' CloudWatch metrics (EMF): each handler outcome parsed into an enum, counted
under its metric name with the `service` dimension (what the stack's alarm watches) and again with
Handler and Outcome, the labels of the local IoT Core's Prometheus counters."""

from __future__ import annotations

from typing import Any

import pytest

from certrotator.backend import handlers
from certrotator.backend.aws import lambdas
from certrotator.backend.handlers import HandlerResult
from certrotator.local import metrics as local_metrics
from certrotator.protocol import TERMINAL_EXECUTION_STATUSES, JobExecutionStatus

S = JobExecutionStatus


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (HandlerResult(handlers.TERMINAL, "t", "j", "succeeded"), ("RotationsSucceeded", "SUCCEEDED")),
        (HandlerResult(handlers.TERMINAL, "t", "j", "timed_out"), ("RotationsTimedOut", "TIMED_OUT")),
        (HandlerResult(handlers.TERMINAL, "t", "j", "rejected"), ("RotationsFailed", "REJECTED")),
        (HandlerResult(handlers.TERMINAL, "t", "j", "canceled"), ("RotationsFailed", "CANCELED")),
        (HandlerResult(handlers.CREATE, "t", "j", "accepted"), ("RotationsCreated", "accepted")),
        (HandlerResult(handlers.COMMIT, "t", "j", "accepted"), ("RotationsCommitted", "accepted")),
        (
            HandlerResult(handlers.COMMIT, "t", "j", "rejected", "wrong certificate"),
            ("Rejections", "rejected"),
        ),
        (HandlerResult(handlers.TERMINAL, "t", "j", "ignored", "not a rotation job"), None),
        (HandlerResult(handlers.TERMINAL, "t", "j", "duplicate"), None),
        (HandlerResult(handlers.TERMINAL, "t", "j", "in_progress"), None),  # not terminal: no metric
    ],
)
def test_outcomes_are_parsed_into_enums(result: HandlerResult, expected: tuple[str, str] | None) -> None:
    assert lambdas.outcome_metric(result) == expected


def test_the_same_vocabulary_as_the_local_prometheus_counters() -> None:
    assert {o.value for o in lambdas.RequestOutcome} == {o.value for o in local_metrics.RequestOutcome}
    assert set(lambdas.ROTATION_METRICS) == set(TERMINAL_EXECUTION_STATUSES)
    assert {lambdas.ROTATION_METRICS[s] for s in (S.FAILED, S.TIMED_OUT)} == set(
        lambdas.FAILED_ROTATION_METRICS
    )


def emitted(monkeypatch: pytest.MonkeyPatch, result: HandlerResult) -> dict[str, Any]:
    """What `_run` records for one invocation, as the EMF document it flushes."""
    monkeypatch.setattr(lambdas, "container", lambda _context: None)
    lambdas.metrics.clear_metrics()
    lambdas._run(lambda _event, _parts: result, {}, None)
    try:
        return dict(lambdas.metrics.serialize_metric_set())
    finally:
        lambdas.metrics.clear_metrics()


def test_a_timed_out_rotation_is_published_with_both_dimension_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    document = emitted(
        monkeypatch, HandlerResult(handlers.TERMINAL, "dev1", "job1", "timed_out", "kept both")
    )
    (directive,) = document["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "CertificateRotator"
    assert [m["Name"] for m in directive["Metrics"]] == ["RotationsTimedOut"]
    # the alarm's (service) and the Prometheus counters' labels (Handler, Outcome)
    assert directive["Dimensions"] == [["service"], ["Handler", "Outcome"]]
    assert document["service"] == lambdas.SERVICE == "certificate-rotator"
    assert document["Outcome"] == "TIMED_OUT" and document["Handler"] == handlers.TERMINAL
    assert document["RotationsTimedOut"] in (1.0, [1.0])


def test_an_ignored_event_counts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lambdas, "container", lambda _context: None)
    lambdas.metrics.clear_metrics()
    lambdas._run(lambda _e, _p: HandlerResult(handlers.TERMINAL, None, None, "ignored", "x"), {}, None)
    assert lambdas.metrics.metric_set == {}
