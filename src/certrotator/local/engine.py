"""The local IoT Core engine: broker + registry + CA + Jobs + rules + notifications, on one asyncio loop.

This module wires the parts together and runs their lifecycle. Messages from devices arrive through the
broker's callback, already authenticated (`authorizer`), and are handled one unit of work at a time:
Jobs API topics go to `jobs_api`, the create/commit topics through their rules (`rules`) to the shared
backend handlers; an execution that ends is recorded with its status change and goes through the
terminal rule to the terminal handler once that has committed, at least once (`terminal_work`).
Timers (rollout in `rollout`; in-progress timeouts, periodic tasks and the inbox in `loop_work`) fire when
they are due; nothing polls. `serve` runs an engine as a process's job.

A client that subscribes to its thing's notify-next is sent its current head execution at once (AWS IoT
does not do this; it makes the engine at least as forgiving: a notify-next sent while the device was
away, or at QoS 0 while the engine restarted, is not lost to a device that only resubscribes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from certrotator.backend.ports import CertificateStatus, Ports
from certrotator.crypto import CaSigningAlgorithm
from certrotator.local import operations
from certrotator.local.adapters import (
    IssuerPort,
    JobsDataPort,
    LocalNotifier,
    Outbox,
    RegistryPort,
    StatePort,
)
from certrotator.local.admin import AdminOp, engine_ops
from certrotator.local.authorizer import RegistryAuthorizer
from certrotator.local.broker import Connection, LocalBroker
from certrotator.local.ca import IssuerName, LocalCa, ensure_local_ca
from certrotator.local.db import Database
from certrotator.local.fault_hooks import FaultInjector
from certrotator.local.faults import FaultPlan
from certrotator.local.jobs import DEFAULT_MAX_IN_FLIGHT, Execution, JobStore
from certrotator.local.jobs_api import handle_jobs_request, notify_next_message
from certrotator.local.loop_work import Inbox, PeriodicTasks, TimeoutTimer
from certrotator.local.metrics import EngineEvents, NullEvents
from certrotator.local.operations import JobRequest
from certrotator.local.registry import LocalRegistry
from certrotator.local.rollout import ADMISSION_WINDOW_S, RolloutScheduler
from certrotator.local.rules import Rules
from certrotator.local.terminal_work import RetryPolicy, TerminalWork, TerminalWorker, TerminalWorkStore
from certrotator.local.topic_tree import filter_matches
from certrotator.protocol import (
    JobExecutionStatus,
    ParsedTopic,
    ProtocolError,
    TopicKind,
    Topics,
    encode,
    parse_topic,
)

log = logging.getLogger("certrotator.local")



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
    admission_window_s: float = ADMISSION_WINDOW_S  # longest an execution holds its admission slot
    terminal_retry: RetryPolicy = field(default_factory=RetryPolicy)  # a failing terminal handler
    faults: FaultPlan | None = None  # a fault plan (`local up --faults`); None in normal use

    def __post_init__(self) -> None:
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(
                f"max_in_flight must be at least 1 (or None for no limit), not {self.max_in_flight}"
            )
        if self.admission_window_s <= 0:
            raise ValueError(f"admission_window_s must be positive, not {self.admission_window_s}")


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
        self.broker = LocalBroker(
            host=config.host,
            port=config.port,
            server_cert_path=self.ca.files.server_cert,
            server_key_path=self.ca.files.server_key,
            client_ca_path=self.ca.files.client_ca_bundle,
            authorizer=RegistryAuthorizer(self.registry),
        )
        self.broker.on_message(self._on_message)
        self.broker.on_subscribed(self._subscribed)
        # A fault plan wraps what the engine publishes, the terminal handler and the ports (fault_hooks).
        self.faults: FaultInjector | None = None
        if config.faults is not None:
            self.faults = FaultInjector(config.faults, self, config.data_dir, self._handle_message)
        send = self.broker.publish_nowait
        self.outbox = Outbox(send if self.faults is None else self.faults.outgoing(send))
        self.notifier = LocalNotifier(self.registry, config.data_dir, config.webhook_url)
        self.ports = Ports(
            registry=RegistryPort(self.registry, self._kick),
            jobs=JobsDataPort(self.jobs),
            issuer=IssuerPort(self.ca.issuer(config.issuer), self.registry),
            state=StatePort(self.registry),
            publisher=self.outbox,
            notifier=self.notifier,
        )
        if self.faults is not None:
            self.ports = self.faults.slow_ports(self.ports)
        # Metrics, if any, are told only these events (local/metrics.py); the CLI sets a real sink.
        self.events: EngineEvents = NullEvents()
        self.rules = Rules(
            self.registry,
            self.ports,
            lambda _thing, job_id: self.jobs.document(job_id),
            lambda result, seconds: self.events.handled(result, seconds),  # noqa: PLW0108 -- late-bound
        )
        self.terminal_work = TerminalWorker(
            TerminalWorkStore(self.db),
            self._terminal if self.faults is None else self.faults.terminal(self._terminal),
            self._unit_of_work,
            self.notifier,
            config.terminal_retry,
        )
        self.rollout = RolloutScheduler(
            self.jobs, config.max_in_flight, self._released, config.admission_window_s
        )
        self.listeners: list[Callable[[Execution], None]] = []  # told of every execution status change
        self._timeouts = TimeoutTimer(self._timeouts_due)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox = Inbox(self._unit)  # device messages to handle
        self._periodic = PeriodicTasks(self._run_periodic)
        self._stopping = False

    @property
    def port(self) -> int:
        return int(self.broker.port)

    # ------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.broker.start()
        # Before any device message is handled (nothing has yielded to the broker's tasks yet): finish
        # the terminal handling the last run left, then release and expire what fell due meanwhile.
        if self.faults is not None:
            self.faults.start(self._loop)
        self.terminal_work.start(self._loop)
        self.rollout.start(self._loop)
        self._expire_due(time.time())  # also those that timed out while the engine was down
        self.terminal_work.run_due()
        self._periodic.start(self._loop)
        log.info(
            "local IoT Core listening on %s:%d (data in %s)",
            self.config.host,
            self.port,
            self.config.data_dir,
        )

    async def stop(self) -> None:
        self.rollout.stop()
        self.terminal_work.stop()  # what is left is finished at the next start
        self._timeouts.cancel()
        self._periodic.stop()
        # Stop handling messages before the broker goes: a unit of work finishing during broker.stop()
        # would publish through a broker that is gone.
        self._stopping = True
        await self._inbox.close()
        await self.broker.stop()
        self.db.close()

    def _kick(self, certificate_id: str) -> None:
        if self._loop is not None:
            self._loop.create_task(self.broker.disconnect(certificate_id))

    # --------------------------------------------------------------- operations (admin, CLI, tests)

    def admin_ops(self) -> dict[str, AdminOp]:
        """What the CLI may ask this engine to do over the admin endpoint (see local.admin)."""
        return engine_ops(self)

    def rule_enabled(self, name: str) -> bool:
        return self.rules.enabled(name)

    def set_rule_enabled(self, name: str, enabled: bool) -> None:
        self.rules.set_enabled(name, enabled)

    async def set_certificate_status(self, certificate_id: str, status: CertificateStatus) -> None:
        self.registry.set_certificate_status(certificate_id, status)
        if status is not CertificateStatus.ACTIVE:
            await self.broker.disconnect(certificate_id)

    def create_job(self, request: JobRequest) -> None:
        operations.create_job(self.registry, self.jobs, request)
        self.rollout.schedule(request.job_id)

    async def cancel_job(self, job_id: str, force: bool = False) -> None:
        for execution in self.jobs.cancel(job_id, force, time.time()):
            self._execution_changed(execution)
        self.terminal_work.run_due()

    def connections(self) -> list[Connection]:
        return self.broker.connections()

    def fault_released(self, thing: str) -> None:
        """The fault plan's driver killed `thing`'s device (see local.fault_hooks)."""
        if self.faults is not None:
            self.faults.released(thing)

    def add_periodic(self, name: str, interval_s: float, task: Callable[[], object]) -> None:
        """Run `task` every `interval_s` seconds on the engine's loop, as one unit of work (one
        transaction), from start until stop; an exception is logged and the next run still comes.
        The CLI adds `local up --reconcile-every` this way (the engine knows nothing of ops/)."""
        self._periodic.add(name, interval_s, task)

    def _run_periodic(self, task: Callable[[], object]) -> None:
        try:
            with self._unit_of_work():
                task()
        finally:
            self.terminal_work.run_due()

    # ------------------------------------------------------------------------ executions, timers

    def _released(self, job_id: str, things: list[str]) -> None:
        """The rollout made these things' executions of the job QUEUED: tell each device whose next
        execution it now is."""
        now = time.time()
        for thing in things:
            self.events.execution_changed(JobExecutionStatus.QUEUED)
            head = self.jobs.next_execution(thing)
            if head is not None and head.job_id == job_id:
                self.outbox.publish(Topics.notify_next(thing), notify_next_message(head, now))

    def _execution_changed(self, execution: Execution) -> None:
        self.events.execution_changed(execution.status)
        for listener in self.listeners:
            listener(execution)
        if execution.timeout_at is not None:
            self._timeouts.fire_by(execution.timeout_at)
        if not execution.status.is_terminal:
            return
        now = time.time()
        head = self.jobs.next_execution(execution.thing)
        self.outbox.publish(Topics.notify_next(execution.thing), notify_next_message(head, now))
        # Recorded with the status change (JobStore.save_execution); handled once that has committed.
        self.terminal_work.due(execution.thing, execution.job_id)
        self.rollout.execution_ended(execution.job_id, now)

    def _terminal(self, work: TerminalWork) -> None:
        self.rules.execution_ended(work.event())

    def _subscribed(self, connection: Connection, filters: list[str]) -> None:
        """A client now holds these filters: if one takes its thing's notify-next, tell it its current
        job (the SUBACK has gone out). No head execution: nothing to say."""
        topic = Topics.notify_next(connection.thing)
        if self._stopping or not any(filter_matches(f, topic) for f in filters):
            return
        head = self.jobs.next_execution(connection.thing)
        if head is not None:
            message = encode(notify_next_message(head, time.time()))
            self.broker.publish_to(connection.client_id, topic, message, qos=0)

    def _timeouts_due(self) -> None:
        self._expire_due(time.time())
        self.terminal_work.run_due()

    def _expire_due(self, now: float) -> None:
        for execution in self.jobs.expire_timeouts(now):
            self._execution_changed(execution)
        next_timeout = self.jobs.next_timeout()
        if next_timeout is not None:
            self._timeouts.fire_by(next_timeout)

    # ------------------------------------------------------------------------------- messages

    def _on_message(self, topic: str, payload: bytes, connection: Connection) -> None:
        if self.faults is not None and self.faults.incoming(topic, payload, connection):
            return  # dropped or delayed by the fault plan (a delayed one comes back to _handle_message)
        self._handle_message(topic, payload, connection)

    def _handle_message(self, topic: str, payload: bytes, connection: Connection) -> None:
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
            work = partial(self.rules.certificate_request, parsed, topic, payload, connection)
        else:
            return
        self._inbox.put(topic, connection, work)

    @contextmanager
    def _unit_of_work(self) -> Iterator[None]:
        """Everything changed inside is one transaction (Database.batch; see docs/performance.md, fix 6),
        and what is published goes out once that transaction has committed (Outbox.holding), or not at
        all if the block or the commit fails."""
        with self.outbox.holding(), self.db.batch():
            yield

    def _unit(self, topic: str, connection: Connection, handle: Callable[[], None]) -> None:
        """Handle one message as one unit of work, then the terminal work it recorded (committed now)."""
        try:
            with self._unit_of_work():
                try:
                    handle()
                except Exception:
                    # A failing handler is logged and never takes the engine down.
                    log.exception("handling %s from %s failed", topic, connection.client_id)
        except Exception:
            log.exception("committing what %s from %s changed failed", topic, connection.client_id)
        self.terminal_work.run_due()

    def _jobs_request(self, topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        outcome = handle_jobs_request(self.jobs, topic, parsed, payload, time.time())
        for reply_topic, reply in outcome.replies:
            self.outbox.publish(reply_topic, reply)
        if outcome.changed is not None:
            self._execution_changed(outcome.changed)

