"""The local IoT Core engine: broker + registry + CA + Jobs + rules + notifications, on one asyncio loop.

Messages from devices arrive through the broker's callback, already authenticated: Jobs API topics go
to `jobs_api`, the create/commit topics through their rules to the shared backend handlers, and
terminal job executions through the terminal rule to the terminal handler. Timers (rollout, in-progress
timeouts) are scheduled for the moment they are due; nothing polls.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from certrotator.backend.handlers import (
    HandlerResult,
    handle_commit_certificate,
    handle_create_certificate,
    handle_job_execution_terminal,
    reject_malformed_request,
)
from certrotator.backend.ports import CertificateStatus, Ports
from certrotator.crypto import CaSigningAlgorithm
from certrotator.local import operations
from certrotator.local.adapters import (
    BufferedPublisher,
    IssuerPort,
    JobsDataPort,
    LocalNotifier,
    RegistryPort,
    StatePort,
)
from certrotator.local.admin import AdminOp, AdminServer
from certrotator.local.broker import Connection, LocalBroker, default_topic_policy
from certrotator.local.ca import IssuerName, LocalCa, ensure_local_ca
from certrotator.local.db import Database
from certrotator.local.jobs import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_TEMPLATE,
    Execution,
    JobError,
    JobStore,
)
from certrotator.local.jobs_api import handle_jobs_request, notify_next_message
from certrotator.local.policy_documents import policy_allows
from certrotator.local.registry import LocalRegistry
from certrotator.protocol import (
    STATUS_DETAILS_KEY,
    BrokerContext,
    CommitCertificateRequest,
    CreateCertificateRequest,
    JobExecutionEvent,
    JobExecutionStatus,
    ParsedTopic,
    ProtocolError,
    TopicKind,
    Topics,
    encode,
    parse_topic,
)

log = logging.getLogger("certrotator.local")

# Longest stretch of device-message handling per event-loop turn (see LocalIoTCore._on_message).
WORK_SLICE_S = 0.05

# Admission control (see LocalIoTCore._admission_room): at most max_in_flight job executions in
# flight engine-wide, whatever a job's rollout rate. An execution holds its slot from release until it
# is terminal or ADMISSION_WINDOW_S has passed (a device that is offline or stuck must not stall the
# rollout); slots are re-examined every ADMISSION_RECHECK_S while targets wait for one.
ADMISSION_WINDOW_S = 30.0
ADMISSION_RECHECK_S = 1.0


@dataclass
class EngineConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8883  # 0 = a free port from the OS
    issuer: IssuerName = IssuerName.IOT
    private_ca_signing_algorithm: CaSigningAlgorithm = CaSigningAlgorithm.SHA256WITHECDSA
    private_ca_validity_days: int = 365
    webhook_url: str | None = None
    max_in_flight: int | None = DEFAULT_MAX_IN_FLIGHT  # None = release as fast as the rollout rate allows

    def __post_init__(self) -> None:
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(
                f"max_in_flight must be at least 1 (or None for no limit), not {self.max_in_flight}"
            )


@dataclass
class _Rollout:
    tokens: float = 1.0
    last: float = field(default_factory=time.monotonic)
    timer: asyncio.Handle | None = None
    due_now: bool = False  # the timer is a call_soon: it will see every change made before it runs
    pending: bool = True  # targets not yet rolled out


class LocalIoTCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.db = Database(config.data_dir)
        self.registry = LocalRegistry(self.db)
        self.jobs = JobStore(self.db)
        self.jobs.ensure_default_template()
        self.ca: LocalCa = ensure_local_ca(
            config.data_dir,
            private_ca_signing_algorithm=config.private_ca_signing_algorithm,
            private_ca_validity_days=config.private_ca_validity_days,
        )
        self.publisher = BufferedPublisher()
        self.notifier = LocalNotifier(self.registry, config.data_dir, config.webhook_url)
        self.ports = Ports(
            registry=RegistryPort(self.registry, self._kick),
            jobs=JobsDataPort(self.jobs),
            issuer=IssuerPort(self.ca.issuer(config.issuer), self.registry),
            state=StatePort(self.registry),
            publisher=self.publisher,
            notifier=self.notifier,
        )
        self.broker = LocalBroker(
            host=config.host,
            port=config.port,
            server_cert_path=self.ca.files.server_cert,
            server_key_path=self.ca.files.server_key,
            client_ca_path=self.ca.files.client_ca_bundle,
            authorizer=self,
        )
        self.broker.on_message(self._on_message)
        self.results: list[HandlerResult] = []  # recent handler decisions, for tests and the demo
        self.listeners: list[Callable[[Execution], None]] = []  # told of every execution status change
        self._rollouts: dict[str, _Rollout] = {}
        self._timeout_at = 0.0
        self._timeout_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rule_cache: dict[str, bool] = {}
        self._outbox: list[tuple[str, bytes]] | None = None  # replies held until the message's commit
        self._inbox: deque[tuple[str, Connection, Callable[[], None]]] = deque()  # device messages to handle
        self._worker: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def port(self) -> int:
        return int(self.broker.port)

    # ------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.broker.start()
        now = time.time()
        for job_id in self.jobs.active_jobs():
            self._schedule_rollout(job_id)
        self._expire_due(now)  # also those that timed out while the engine was down
        log.info(
            "local IoT Core listening on %s:%d (data in %s)",
            self.config.host,
            self.port,
            self.config.data_dir,
        )

    async def stop(self) -> None:
        for rollout in self._rollouts.values():
            if rollout.timer:
                rollout.timer.cancel()
        if self._timeout_timer:
            self._timeout_timer.cancel()
        # Stop handling messages before the broker goes: a unit of work finishing during broker.stop()
        # would publish through a broker that is gone. Messages not handled yet are dropped, as
        # messages in flight are.
        self._stopping = True
        self._inbox.clear()
        if self._worker is not None:
            self._worker.cancel()
            with suppress(asyncio.CancelledError):
                await self._worker
        await self.broker.stop()
        self.db.close()

    # ---------------------------------------------------------------------------- authorisation

    def authorize_connect(self, client_id: str, principal: str) -> str | None:
        cert = self.registry.certificate(principal)
        if cert is None or cert.status is not CertificateStatus.ACTIVE or cert.thing is None:
            return None
        if client_id == cert.thing or client_id.startswith(f"{cert.thing}#"):
            return cert.thing
        return None

    def authorize_topic(self, thing: str, topic: str, action: str) -> bool:
        if default_topic_policy(thing, topic, action):
            return True  # the protocol's own topics: decided without touching the registry
        # Anything else only if a policy attached to one of the thing's certificates allows it.
        documents = [
            document
            for cert in self.registry.thing_principals(thing)
            for name in self.registry.certificate_policies(cert)
            if (document := self.registry.policy(name)) is not None
        ]
        return policy_allows(documents, thing, thing, topic, action)

    def _kick(self, certificate_id: str) -> None:
        if self._loop is not None:
            self._loop.create_task(self.broker.disconnect(certificate_id))

    # ----------------------------------------------------------------------------------- admin

    def rule_enabled(self, name: str) -> bool:
        if name not in self._rule_cache:
            self._rule_cache[name] = self.registry.rule_enabled(name)
        return self._rule_cache[name]

    def set_rule_enabled(self, name: str, enabled: bool) -> None:
        self.registry.set_rule_enabled(name, enabled)
        self._rule_cache[name] = enabled

    async def set_certificate_status(self, certificate_id: str, status: CertificateStatus) -> None:
        self.registry.set_certificate_status(certificate_id, status)
        if status is not CertificateStatus.ACTIVE:
            await self.broker.disconnect(certificate_id)

    def create_job(
        self,
        job_id: str,
        things: Sequence[str] = (),
        groups: Sequence[str] = (),
        template: str = DEFAULT_TEMPLATE,
        max_per_minute: int | None = None,
        in_progress_timeout_minutes: float | None = None,
        unlimited_rollout: bool = False,
    ) -> None:
        operations.create_job(
            self.registry,
            self.jobs,
            job_id,
            things,
            groups,
            template,
            max_per_minute,
            in_progress_timeout_minutes,
            unlimited_rollout,
        )
        self._schedule_rollout(job_id)

    async def cancel_job(self, job_id: str, force: bool = False) -> None:
        for execution in self.jobs.cancel(job_id, force, time.time()):
            self._execution_changed(execution)

    # -------------------------------------------------------------------------------- rollout

    def _schedule_rollout(self, job_id: str) -> None:
        rollout = self._rollouts.setdefault(job_id, _Rollout())
        if self._loop is None:
            return  # started later: start() schedules it
        if rollout.timer is None:
            rollout.timer = self._loop.call_soon(self._release, job_id)
            rollout.due_now = True

    def _release(self, job_id: str) -> None:
        assert self._loop is not None
        rollout = self._rollouts.get(job_id)
        if rollout is None:
            return  # the job completed or was canceled meanwhile
        rollout.timer = None
        # PERF: runs at every terminal execution while targets wait; reads only what it needs (the
        # job's row as a whole carries every target, parsed at each call: O(N^2) over a job).
        config = self.jobs.config(job_id)
        if config is None or self.jobs.status(job_id) != "IN_PROGRESS":
            self._rollouts.pop(job_id, None)  # canceled: nothing more to release
            return
        exponential = config.base_rate_per_minute is not None
        rate = config.rate_per_minute(self.jobs.succeeded_count(job_id) if exponential else 0)
        pending = self.jobs.pending_count(job_id)
        now_m = time.monotonic()
        if rate is None:
            count = pending
        else:
            # token bucket refilled at the current rate; bursts capped at one second's worth
            rollout.tokens = min(rollout.tokens + rate / 60.0 * (now_m - rollout.last), max(1.0, rate / 60.0))
            count = min(int(rollout.tokens), pending)
        rollout.last = now_m
        now = time.time()
        room = self._admission_room(now)
        admitted = count if room is None else min(count, room)
        released = self.jobs.release(job_id, admitted, now) if admitted else []
        if rate is not None:
            rollout.tokens -= len(released)
        for thing in released:
            self._notify_next_if_head(thing, job_id)
        rollout.pending = pending > len(released)
        if rollout.pending:
            delay = 0.0 if rate is None else max((1 - rollout.tokens) / (rate / 60.0), 0.001)
            if admitted < count:  # full: a terminal execution frees a slot sooner, the window later
                delay = max(delay, ADMISSION_RECHECK_S)
            rollout.timer = self._loop.call_later(delay, self._release, job_id)
            rollout.due_now = False

    def _admission_room(self, now: float) -> int | None:
        """How many more executions may be released now; None = no limit.

        PERF: an uncapped rollout queued every target at once, and every device then advanced in
        lockstep with all the others (p50 ~ p99 ~ the whole job). Bounding what is in flight lets
        the devices that started finish first, and keeps bursts of handshakes and CA signatures
        short enough for reconnecting devices to get their CONNACK in time."""
        limit = self.config.max_in_flight
        if limit is None:
            return None
        in_flight = self.jobs.admitted_count(list(self._rollouts), now - ADMISSION_WINDOW_S)
        return max(limit - in_flight, 0)

    def _notify_next_if_head(self, thing: str, job_id: str) -> None:
        head = self.jobs.next_execution(thing)
        if head is not None and head.job_id == job_id:
            self._send(Topics.notify_next(thing), notify_next_message(head, time.time()))

    # ------------------------------------------------------------------------------- timeouts

    def _add_timeout(self, at: float) -> None:
        """Make sure the timer fires by `at`; one timer serves all executions (the DB knows the rest)."""
        assert self._loop is not None
        if self._timeout_timer is not None and self._timeout_at <= at:
            return
        if self._timeout_timer is not None:
            self._timeout_timer.cancel()
        self._timeout_at = at
        self._timeout_timer = self._loop.call_later(max(at - time.time(), 0.0), self._on_timeout_timer)

    def _on_timeout_timer(self) -> None:
        assert self._loop is not None
        self._timeout_timer = None
        self._expire_due(time.time())

    def _expire_due(self, now: float) -> None:
        for execution in self._expire_timeouts(now):
            self._execution_changed(execution)
        next_timeout = self.jobs.next_timeout()
        if next_timeout is not None:
            self._add_timeout(next_timeout)

    def _expire_timeouts(self, now: float) -> list[Execution]:
        expired = []
        for e in self.jobs.timeouts_due(now):
            timed_out = replace(
                e, status=JobExecutionStatus.TIMED_OUT, version=e.version + 1, updated_at=now, timeout_at=None
            )
            try:
                self.jobs.save_execution(timed_out, e.version)
            except JobError:
                continue  # the device updated it meanwhile
            expired.append(timed_out)
        return expired

    # ------------------------------------------------------------------------------- messages

    def _send(self, topic: str, message: dict[str, Any]) -> None:
        # Replies and notifications go out at QoS 0. At QoS 1 the device's PUBACK is a small write
        # still unacknowledged when it sends its next request, so Nagle (the AWS CRT offers no
        # TCP_NODELAY) holds that request for the broker's delayed ACK: ~40 ms per round trip. A lost
        # QoS 0 reply is what the device's per-state timeouts are for, as with any lost message.
        if self._outbox is not None:
            self._outbox.append((topic, encode(message)))
        else:
            self.broker.publish_nowait(topic, encode(message), 0)

    def _on_message(self, topic: str, payload: bytes, connection: Connection) -> None:
        if self._stopping:
            return
        try:
            parsed = parse_topic(topic)
        except ProtocolError:
            return  # a topic the thing's policy allowed but nothing here handles
        if parsed.reply is not None:
            return
        if parsed.kind in (TopicKind.GET, TopicKind.UPDATE):
            work = partial(self._jobs_request, topic, parsed, payload)
        elif parsed.kind in (TopicKind.CREATE, TopicKind.COMMIT):
            work = partial(self._run_rule, parsed, topic, payload, connection)
        else:
            return
        # PERF: device messages are handled in arrival order, but at most WORK_SLICE_S of them per
        # event-loop turn, so the broker's own work (TLS handshakes, CONNECT, SUBSCRIBE) never waits
        # behind a burst. Handled inline, the create requests of a 2,000-device rotation (a CA
        # signature each) held the loop for seconds at a time: reconnecting devices got their CONNACK
        # after the AWS CRT's 3 s limit and rolled back. (An IoT rule's Lambda runs apart from the
        # broker in AWS too; Jobs API replies there take milliseconds, and here still do when idle.)
        self._inbox.append((topic, connection, work))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self._inbox:
            turn_ends = loop.time() + WORK_SLICE_S
            while self._inbox and loop.time() < turn_ends:
                self._unit(*self._inbox.popleft())
            await asyncio.sleep(0)  # let the rest of this turn's I/O run

    def _unit(self, topic: str, connection: Connection, handle: Callable[[], None]) -> None:
        """Handle one message as one unit of work.

        PERF: everything it changes is one transaction (Database.batch), and what it sends goes out
        once that has committed, as each handler's replies went out after its own commits."""
        self._outbox = []
        try:
            with self.db.batch():
                try:
                    handle()
                except Exception:
                    # A failing handler is logged and never takes the engine down.
                    log.exception("handling %s from %s failed", topic, connection.client_id)
            outbox = self._outbox
        except Exception:
            log.exception("committing what %s from %s changed failed", topic, connection.client_id)
            outbox = []
        finally:
            self._outbox = None
        for reply_topic, data in outbox:
            self.broker.publish_nowait(reply_topic, data, 0)

    def _jobs_request(self, topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        outcome = handle_jobs_request(self.jobs, topic, parsed, payload, time.time())
        for reply_topic, reply in outcome.replies:
            self._send(reply_topic, reply)
        if outcome.changed is not None:
            self._execution_changed(outcome.changed)

    def _run_rule(self, parsed: ParsedTopic, topic: str, payload: bytes, connection: Connection) -> None:
        kind = parsed.kind
        if not self.rule_enabled(kind.value):
            log.info("rule %s disabled: dropped %s", kind.value, topic)
            return
        assert parsed.thing is not None
        # What the rule's SELECT adds in AWS (topic(3), topic(), clientid(), principal()), here straight
        # from the authenticated connection.
        context = BrokerContext(parsed.thing, connection.client_id, connection.principal, topic)
        try:
            if kind is TopicKind.CREATE:
                create = CreateCertificateRequest.parse(payload)
                result = handle_create_certificate(context, create, self.ports)
            else:
                commit = CommitCertificateRequest.parse(payload)
                result = handle_commit_certificate(context, commit, self.ports)
        except ProtocolError as exc:  # only the parse raises: the handlers answer every other problem
            result = reject_malformed_request(kind, parsed.thing, str(exc), self.ports)
        self._record(result)

    def _record(self, result: HandlerResult) -> None:
        self.results.append(result)
        if len(self.results) > 10_000:
            del self.results[:5_000]
        for topic, message in self.publisher.drain():
            self._send(topic, message)

    def _execution_changed(self, execution: Execution) -> None:
        for listener in self.listeners:
            listener(execution)
        if execution.timeout_at is not None:
            self._add_timeout(execution.timeout_at)
        if not execution.status.is_terminal:
            return
        now = time.time()
        head = self.jobs.next_execution(execution.thing)
        self._send(Topics.notify_next(execution.thing), notify_next_message(head, now))
        if STATUS_DETAILS_KEY in execution.status_details and self.rule_enabled("terminal"):
            event = JobExecutionEvent(
                execution.thing, execution.job_id, execution.status, dict(execution.status_details)
            )
            self._record(handle_job_execution_terminal(event, self.ports))
        rollout = self._rollouts.get(execution.job_id)
        if (rollout is None or not rollout.pending) and self.jobs.complete_if_done(execution.job_id, now):
            self._rollouts.pop(execution.job_id, None)
        # A slot is free, and successes may have raised an exponential rate: release now, for every
        # job waiting for a slot (admission is engine-wide), this one first; a release already due
        # this turn serves every execution that ends before it runs.
        for job_id, waiting in sorted(self._rollouts.items(), key=lambda item: item[0] != execution.job_id):
            if waiting.pending and not (waiting.timer is not None and waiting.due_now):
                if waiting.timer is not None:
                    waiting.timer.cancel()
                    waiting.timer = None
                self._schedule_rollout(job_id)

    # ------------------------------------------------------------------------------ admin ops

    def admin_ops(self) -> dict[str, AdminOp]:
        """What the CLI may ask a running engine to do (see local.admin)."""

        async def set_status(a: dict[str, Any]) -> None:
            await self.set_certificate_status(str(a["certificate_id"]), CertificateStatus(a["status"]))

        async def set_rule(a: dict[str, Any]) -> None:
            self.set_rule_enabled(str(a["name"]), bool(a["enabled"]))

        async def create_job(a: dict[str, Any]) -> None:
            self.create_job(
                str(a["job_id"]),
                a.get("things", []),
                a.get("groups", []),
                a.get("template", DEFAULT_TEMPLATE),
                a.get("max_per_minute"),
                a.get("in_progress_timeout_minutes"),
                bool(a.get("unlimited_rollout")),
            )

        async def cancel_job(a: dict[str, Any]) -> None:
            await self.cancel_job(str(a["job_id"]), bool(a.get("force")))

        async def connections(_a: dict[str, Any]) -> list[dict[str, str]]:
            # For a SimulatedFleet driving this engine from another process (fleet.remote).
            return [
                {"client_id": c.client_id, "principal": c.principal, "thing": c.thing}
                for c in self.broker.connections()
            ]

        return {
            "set_certificate_status": set_status,
            "set_rule": set_rule,
            "create_job": create_job,
            "cancel_job": cancel_job,
            "connections": connections,
        }


def relax_gc() -> None:
    """PERF, for processes that run an engine or a fleet (`local up`, the demo, the benchmarks; not the
    library's callers): CPython's default thresholds (700, 10, 10) run a young collection every 700
    allocations, and with thousands of live connections each one walks many survivors and every
    hundredth the whole heap. That was ~10% of the engine's CPU in a 500-device rotation (0.9 s of GC;
    0.08 s after this). What exists now (imports, set-up) is frozen out of the collector's way and
    young collections run every 50,000 allocations: reference cycles are still collected, in larger
    batches."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


async def serve(
    config: EngineConfig, stop: asyncio.Event, ready: Callable[[LocalIoTCore], None] | None = None
) -> None:
    """Run the engine with its admin endpoint until `stop` is set."""
    engine = LocalIoTCore(config)
    await engine.start()
    relax_gc()  # this process is the engine's
    admin = AdminServer(asyncio.get_running_loop(), engine.admin_ops())  # loopback only
    admin.write_engine_file(config.data_dir, config.host, engine.port)
    try:
        if ready is not None:
            ready(engine)
        await stop.wait()
    finally:
        admin.close(config.data_dir)
        await engine.stop()
