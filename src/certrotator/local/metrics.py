"""Prometheus metrics of the local IoT Core (`local up --metrics-port P`), on a loopback HTTP endpoint.

The engine only emits events through `EngineEvents` (an execution changed status; a handler decided,
in so many seconds); `NullEvents` is the default, so an engine without metrics pays nothing and never
imports prometheus-client. What is a state rather than an event (connected devices, each thing's
certificate expiry) is read when Prometheus scrapes, through a `Snapshot` callable the caller provides
(it should read on the engine's loop, for a consistent view).

Series (the same counters the Lambda functions publish to CloudWatch, see backend/aws/lambdas.py):
  certrotator_rotations_total{outcome}              a rotation job's execution ended: its terminal status
  certrotator_requests_total{handler,outcome}       create/commit requests: accepted or rejected
  certrotator_job_executions_total{status}          every job execution status change (any job)
  certrotator_handler_duration_seconds{handler}     histogram of each handler's time
  certrotator_connected_devices                     live MQTT connections
  certrotator_certificate_expiration_timestamp_seconds{thing,certificate_id}
                                                    notAfter of each certificate attached to a thing
                                                    (cert-manager's name for the same gauge)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from certrotator.backend.handlers import COMMIT, CREATE, TERMINAL, HandlerResult
from certrotator.compat import StrEnum
from certrotator.local.db import Database
from certrotator.protocol import TERMINAL_EXECUTION_STATUSES, JobExecutionStatus

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

NAMESPACE: Final = "certrotator"
# Handler time: from well under a millisecond (a rejected request) to seconds (a private CA).
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
HANDLERS: Final = (CREATE, COMMIT, TERMINAL)


class RequestOutcome(StrEnum):
    """A create or commit request's outcome (the handlers' `accepted` / `rejected`)."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


def rotation_outcome(result: HandlerResult) -> JobExecutionStatus | None:
    """The terminal status a rotation ended in, from the terminal handler's result; None for results
    that are no rotation's end (another job's execution, a duplicate event, create and commit)."""
    if result.handler != TERMINAL:
        return None
    try:
        status = JobExecutionStatus(result.outcome.upper())
    except ValueError:  # "ignored", "duplicate"
        return None
    return status if status.is_terminal else None


def request_outcome(result: HandlerResult) -> RequestOutcome | None:
    if result.handler not in (CREATE, COMMIT):
        return None
    try:
        return RequestOutcome(result.outcome)
    except ValueError:
        return None


class EngineEvents(Protocol):
    """What the engine tells its metrics (all calls on the engine's loop, cheap)."""

    def execution_changed(self, status: JobExecutionStatus) -> None: ...

    def handled(self, result: HandlerResult, seconds: float) -> None: ...


class NullEvents:
    def execution_changed(self, status: JobExecutionStatus) -> None:
        pass

    def handled(self, result: HandlerResult, seconds: float) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Expiry:
    thing: str
    certificate_id: str
    not_after: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    connected_devices: int
    expiries: list[Expiry]


def read_expiries(db: Database) -> list[Expiry]:
    """notAfter of every certificate attached to a thing (one query for the whole registry)."""
    rows = db.query(
        "SELECT p.thing_name, c.id, c.not_after FROM thing_principals p "
        "JOIN certificates c ON c.id = p.certificate_id ORDER BY p.thing_name, c.id"
    )
    return [Expiry(r["thing_name"], r["id"], float(r["not_after"])) for r in rows]


class EngineState(Protocol):
    """What the scrape-time gauges read of `LocalIoTCore`."""

    @property
    def db(self) -> Database: ...

    def connections(self) -> Sequence[object]: ...


def engine_snapshot(
    engine: EngineState, loop: asyncio.AbstractEventLoop, timeout_s: float = 10.0
) -> Callable[[], Snapshot]:
    """A `Snapshot` source for a scrape (on the HTTP server's thread) that reads on the engine's loop,
    between two units of work, so connections and registry agree with each other."""

    async def read() -> Snapshot:
        return Snapshot(len(engine.connections()), read_expiries(engine.db))

    def snapshot() -> Snapshot:
        return asyncio.run_coroutine_threadsafe(read(), loop).result(timeout=timeout_s)

    return snapshot


class MeasuredEngine(EngineState, Protocol):
    events: EngineEvents


def attach(engine: MeasuredEngine, loop: asyncio.AbstractEventLoop, port: int) -> MetricsServer:
    """`local up --metrics-port`: give the engine a Prometheus sink and serve it on 127.0.0.1:`port`
    (0: a free port; the server says which). Call on the engine's loop, after it started."""
    metrics = PrometheusMetrics(engine_snapshot(engine, loop))
    engine.events = metrics
    return metrics.serve(port, "127.0.0.1")


class PrometheusMetrics:
    """`EngineEvents` recorded in a registry of their own, plus the scrape-time gauges."""

    def __init__(self, snapshot: Callable[[], Snapshot] | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.snapshot = snapshot
        self.rotations = Counter(
            "rotations", "Rotation job executions that ended, by terminal status", ["outcome"],
            namespace=NAMESPACE, registry=self.registry,
        )  # fmt: skip
        self.requests = Counter(
            "requests", "Certificate create/commit requests, by handler and outcome", ["handler", "outcome"],
            namespace=NAMESPACE, registry=self.registry,
        )  # fmt: skip
        self.executions = Counter(
            "job_executions", "Job execution status changes (every job), by new status", ["status"],
            namespace=NAMESPACE, registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "handler_duration_seconds", "Time a backend handler took", ["handler"],
            namespace=NAMESPACE, registry=self.registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        # Every label value known up front is exported at 0, so a rate() over a fresh engine works.
        for status in TERMINAL_EXECUTION_STATUSES:
            self.rotations.labels(outcome=status.value)
        for status in JobExecutionStatus:
            self.executions.labels(status=status.value)
        for handler in (CREATE, COMMIT):
            for outcome in RequestOutcome:
                self.requests.labels(handler=handler, outcome=outcome.value)
        for handler in HANDLERS:
            self.latency.labels(handler=handler)
        if snapshot is not None:
            self.registry.register(_StateCollector(snapshot))

    def execution_changed(self, status: JobExecutionStatus) -> None:
        self.executions.labels(status=status.value).inc()

    def handled(self, result: HandlerResult, seconds: float) -> None:
        self.latency.labels(handler=result.handler).observe(seconds)
        if (status := rotation_outcome(result)) is not None:
            self.rotations.labels(outcome=status.value).inc()
        elif (outcome := request_outcome(result)) is not None:
            self.requests.labels(handler=result.handler, outcome=outcome.value).inc()

    def text(self) -> str:
        """The exposition text, as a scrape gets it."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """The /metrics endpoint on `host:port` (0: a free port), on a thread of its own."""
        from prometheus_client import start_http_server

        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread, host, int(server.server_address[1]))


class _StateCollector:
    """The gauges, computed at each scrape from the snapshot."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Any]:
        return []  # computed at collection: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        state = self.snapshot()
        yield GaugeMetricFamily(
            f"{NAMESPACE}_connected_devices", "Live MQTT connections", value=state.connected_devices
        )
        expiry = GaugeMetricFamily(
            f"{NAMESPACE}_certificate_expiration_timestamp_seconds",
            "notAfter (Unix time) of each certificate attached to a thing",
            labels=["thing", "certificate_id"],
        )
        for e in state.expiries:
            expiry.add_metric([e.thing, e.certificate_id], e.not_after)
        yield expiry


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: Any
    host: str
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
