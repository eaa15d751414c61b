"""The local IoT Core's Prometheus metrics: events in, exposition text out, over a real loopback HTTP
endpoint; the gauges read from a real registry at scrape time."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from certrotator.backend.handlers import COMMIT, CREATE, TERMINAL, HandlerResult
from certrotator.local.ca import ensure_local_ca
from certrotator.local.db import Database
from certrotator.local.metrics import (
    NullEvents,
    PrometheusMetrics,
    RequestOutcome,
    Snapshot,
    read_expiries,
    request_outcome,
    rotation_outcome,
)
from certrotator.local.provision import provision_thing
from certrotator.local.registry import LocalRegistry
from certrotator.protocol import JobExecutionStatus

S = JobExecutionStatus


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_outcomes_are_enums_not_free_text() -> None:
    assert rotation_outcome(HandlerResult(TERMINAL, "t", "j", "succeeded")) is S.SUCCEEDED
    assert rotation_outcome(HandlerResult(TERMINAL, "t", "j", "timed_out")) is S.TIMED_OUT
    assert rotation_outcome(HandlerResult(TERMINAL, "t", "j", "ignored", "not a rotation job")) is None
    assert rotation_outcome(HandlerResult(TERMINAL, "t", "j", "duplicate")) is None
    assert rotation_outcome(HandlerResult(CREATE, "t", "j", "accepted")) is None
    assert request_outcome(HandlerResult(COMMIT, "t", "j", "rejected")) is RequestOutcome.REJECTED
    assert request_outcome(HandlerResult(TERMINAL, "t", "j", "succeeded")) is None


def test_events_become_counters_and_histograms() -> None:
    metrics = PrometheusMetrics()
    for status in (S.QUEUED, S.IN_PROGRESS, S.SUCCEEDED):
        metrics.execution_changed(status)
    metrics.handled(HandlerResult(CREATE, "t", "j", "accepted"), 0.004)
    metrics.handled(HandlerResult(COMMIT, "t", "j", "rejected", "wrong certificate"), 0.0002)
    metrics.handled(HandlerResult(TERMINAL, "t", "j", "succeeded"), 0.003)
    metrics.handled(HandlerResult(TERMINAL, "u", "k", "failed"), 0.002)
    metrics.handled(HandlerResult(TERMINAL, "v", "x", "ignored"), 0.001)
    values = samples(metrics.text())
    assert values[("certrotator_rotations_total", (("outcome", "SUCCEEDED"),))] == 1
    assert values[("certrotator_rotations_total", (("outcome", "FAILED"),))] == 1
    assert values[("certrotator_rotations_total", (("outcome", "TIMED_OUT"),))] == 0  # exported at 0
    assert values[("certrotator_requests_total", (("handler", CREATE), ("outcome", "accepted")))] == 1
    assert values[("certrotator_requests_total", (("handler", COMMIT), ("outcome", "rejected")))] == 1
    assert values[("certrotator_job_executions_total", (("status", "IN_PROGRESS"),))] == 1
    assert values[("certrotator_handler_duration_seconds_count", (("handler", TERMINAL),))] == 3
    assert (
        values[("certrotator_handler_duration_seconds_bucket", (("handler", CREATE), ("le", "0.005")))] == 1
    )
    assert (
        values[("certrotator_handler_duration_seconds_bucket", (("handler", CREATE), ("le", "0.0025")))] == 0
    )
    NullEvents().handled(HandlerResult(CREATE, "t", "j", "accepted"), 1.0)  # the default costs nothing


def test_the_endpoint_serves_the_gauges_from_the_registry(tmp_path: Path) -> None:
    data_dir = tmp_path / "engine"
    db = Database(data_dir)
    registry, ca = LocalRegistry(db), ensure_local_ca(data_dir)
    made = {
        name: provision_thing(registry, ca, name, tmp_path / name, validity_days=days)
        for name, days in (("short", 10), ("long", 365))
    }
    not_after = {name: registry.certificate(p.certificate_id) for name, p in made.items()}
    metrics = PrometheusMetrics(lambda: Snapshot(3, read_expiries(db)))
    server = metrics.serve(0)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        values = samples(scrape(server.port))
    finally:
        server.close()
        db.close()
    assert values[("certrotator_connected_devices", ())] == 3
    for name, provisioned in made.items():
        key = (
            "certrotator_certificate_expiration_timestamp_seconds",
            (("certificate_id", provisioned.certificate_id), ("thing", name)),
        )
        cert = not_after[name]
        assert cert is not None and values[key] == cert.not_after
