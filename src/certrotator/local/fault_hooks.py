"""The engine's side of a fault plan (`local up --faults plan.toml`): the imperative shell around
`fault_decisions.Decider`. Installed only when a plan is given; without one the engine has no fault code in its
path but a single `if` (see LocalIoTCore._on_message).

Where it sits: device messages at the engine's inbox (`incoming`), everything the engine publishes at
the broker (`outgoing`, wrapped round the outbox's send), the terminal rule (`terminal`, round the
handler the terminal worker runs), and the issuer and registry ports (`slow_ports`). What fired is
appended to `faults.log` (JSON lines) in the data directory, which the simulated fleet's fault driver
follows: it kills a device's process when asked (the engine cannot: devices are other processes) and
starts an engine again that a `restart_engine` fault killed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from certrotator.backend.ports import (
    CertificateRecord,
    CertificateStatus,
    IssuedCertificate,
    Issuer,
    Ports,
    Registry,
)
from certrotator.local.broker import Connection, LocalBroker
from certrotator.local.fault_decisions import Act, Decider, StepTracker, Verdict
from certrotator.local.faults import (
    Direction,
    FaultPlan,
    StepAction,
)
from certrotator.local.registry import LocalRegistry
from certrotator.local.rules import Rules
from certrotator.local.terminal_work import TerminalWork
from certrotator.protocol import ProtocolError, RotationProgress, parse_topic

log = logging.getLogger("certrotator.local.faults")

FAULT_LOG = "faults.log"  # what fired, one JSON object a line
FIRED_FILE = "faults.fired"  # one-shot faults that fired in an earlier run (restart_engine)
# A device the plan kills is cut off until the fault driver says it is dead; without a driver (a plain
# `local up --faults`), until this long has passed.
CUT_OFF_MAX_S = 30.0

Send = Callable[[str, bytes, int], None]
Deliver = Callable[[str, bytes, Connection], None]


class InjectedFault(RuntimeError):
    """A failure the fault plan asked for (the terminal event "lost": its handler fails once)."""


class EngineParts(Protocol):
    """What the injector touches of `LocalIoTCore`."""

    registry: LocalRegistry
    broker: LocalBroker
    rules: Rules

    async def set_certificate_status(self, certificate_id: str, status: CertificateStatus) -> None: ...


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FaultInjector:
    def __init__(self, plan: FaultPlan, engine: EngineParts, data_dir: Path, deliver: Deliver) -> None:
        self.plan = plan
        self.engine = engine
        self.log_path = data_dir / FAULT_LOG
        self.fired_path = data_dir / FIRED_FILE
        self.deliver = deliver  # hands a message on to the engine, past the faults (a delay's end)
        fired = set(self.fired_path.read_text().split()) if self.fired_path.exists() else set()
        self.decider = Decider(plan, fired)
        self.steps = StepTracker()
        self.kill_engine: Callable[[], None] = _sigkill_self  # a thread-hosted engine replaces it
        self.dropped = 0  # messages dropped, cut-off devices' included
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for rule in self.plan.disabled_rules:
            self.engine.rules.override(rule, False)
        log.warning("fault plan %s in force (seed %d)", self.plan.source, self.plan.seed)

    # ------------------------------------------------------------------------------- messages

    def incoming(self, topic: str, payload: bytes, connection: Connection) -> bool:
        """A device's message at the inbox: True if the plan took it (dropped, or held for later)."""
        try:
            parsed = parse_topic(topic)
        except ProtocolError:
            return False
        thing = connection.thing
        step = self.steps.to_engine(parsed, payload, lambda: self._on_new_pair(thing, connection.principal))
        verdict = self.decider.message(Direction.TO_ENGINE, thing, topic, step)
        self._carry_out(verdict, Direction.TO_ENGINE, thing, topic, step)
        if verdict.drop:
            self.dropped += 1
            return True
        if verdict.delay_s > 0 and self._loop is not None:
            self._loop.call_later(verdict.delay_s, self.deliver, topic, payload, connection)
            return True
        return False

    def outgoing(self, send: Send) -> Send:
        """The broker's publish, with the plan applied to what the engine sends devices."""

        def publish(topic: str, data: bytes, qos: int) -> None:
            try:
                parsed = parse_topic(topic)
            except ProtocolError:
                send(topic, data, qos)
                return
            if parsed.thing is None:
                send(topic, data, qos)
                return
            step = self.steps.to_device(parsed, data)
            verdict = self.decider.message(Direction.TO_DEVICE, parsed.thing, topic, step)
            self._carry_out(verdict, Direction.TO_DEVICE, parsed.thing, topic, step)
            if verdict.drop:
                self.dropped += 1
            elif verdict.delay_s > 0 and self._loop is not None:
                self._loop.call_later(verdict.delay_s, send, topic, data, qos)
            else:
                send(topic, data, qos)

        return publish

    def terminal(self, handle: Callable[[TerminalWork], None]) -> Callable[[TerminalWork], None]:
        """The terminal rule's handler, with step 11's faults: a "lost" event fails once and is
        tried again by the terminal worker (at least once, as AWS's retries)."""

        def run(work: TerminalWork) -> None:
            verdict = self.decider.terminal(work.thing)
            self._carry_out(verdict, Direction.TO_ENGINE, work.thing, "(terminal event)", None, terminal=True)
            if verdict.drop:
                raise InjectedFault(
                    f"the terminal event of {work.thing} / {work.job_id} is lost (fault plan)"
                )
            handle(work)
            for act in self.decider.after_terminal(work.thing):
                self._act(act)

        return run

    def released(self, thing: str) -> None:
        """The fault driver killed the device: let its next process's traffic through."""
        self.decider.cut_off.discard(thing)
        timer = self._expiry.pop(thing, None)
        if timer is not None:
            timer.cancel()
        self._record({"event": "released", "thing": thing})

    # ------------------------------------------------------------------------------ slow ports

    def slow_ports(self, ports: Ports) -> Ports:
        issuer_s, registry_s = self.plan.slow_issuer_s, self.plan.slow_registry_s
        return replace(
            ports,
            issuer=_SlowIssuer(ports.issuer, issuer_s, self._record) if issuer_s else ports.issuer,
            registry=_SlowRegistry(ports.registry, registry_s) if registry_s else ports.registry,
        )

    # --------------------------------------------------------------------------------- acting

    def _on_new_pair(self, thing: str, principal: str) -> bool:
        state = self.engine.registry.load_state(thing)
        return (
            state is not None
            and state.progress in (RotationProgress.CREATED, RotationProgress.COMMITTED)
            and state.new_certificate_id == principal
        )

    def _carry_out(
        self,
        verdict: Verdict,
        direction: Direction,
        thing: str,
        topic: str,
        step: int | None,
        terminal: bool = False,
    ) -> None:
        for name in verdict.fired:
            self._record(
                {
                    "fault": name,
                    "thing": thing,
                    "step": 11 if terminal else step,
                    "direction": direction.value,
                    "topic": topic,
                    "drop": verdict.drop and not verdict.cut_off,
                    "delay_s": round(verdict.delay_s, 3),
                }
            )
        for act in verdict.acts:
            self._act(act)

    def _act(self, act: Act) -> None:
        fault, thing = act.fault, act.thing
        record: dict[str, Any] = {"event": fault.action.value, "fault": f"at_step[{act.rule}]"}
        record |= {"thing": thing, "step": int(act.step), "when": fault.when.value}
        if fault.action is StepAction.KILL_DEVICE:
            self.decider.cut_off.add(thing)
            if self._loop is not None:
                self._expiry[thing] = self._loop.call_later(CUT_OFF_MAX_S, self._expire, thing)
            self._record(record)
        elif fault.action is StepAction.DISCONNECT_DEVICE:
            self._record(record)
            self._spawn(self._disconnect(thing))
        elif fault.action is StepAction.RESTART_ENGINE:
            self._record(record, durable=True)
            with self.fired_path.open("a") as f:
                f.write(act.key + "\n")
                f.flush()
                os.fsync(f.fileno())
            log.warning("fault plan: the engine dies at step %d of %s", act.step, thing)
            self.kill_engine()
        elif fault.action is StepAction.DEACTIVATE_CERTIFICATE:
            certificate = self._certificate(thing, fault.certificate)
            self._record({**record, "certificate": certificate})
            if certificate is not None:
                self._spawn(self.engine.set_certificate_status(certificate, CertificateStatus.INACTIVE))
        elif fault.action is StepAction.DISABLE_RULE:
            assert fault.rule is not None
            self.engine.rules.override(fault.rule, False)
            self._record({**record, "rule": fault.rule})

    def _certificate(self, thing: str, which: str) -> str | None:
        state = self.engine.registry.load_state(thing)
        if state is not None and state.progress is not RotationProgress.TERMINATED:
            return (state.new_certificate_id if which == "new" else state.old_certificate_id) or None
        attached = self.engine.registry.thing_principals(thing)
        return attached[0] if which == "old" and len(attached) == 1 else None

    async def _disconnect(self, thing: str) -> None:
        for principal in {c.principal for c in self.engine.broker.connections() if c.thing == thing}:
            await self.engine.broker.disconnect(principal)

    def _spawn(self, coroutine: Any) -> None:
        if self._loop is None:
            coroutine.close()
            return
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _expire(self, thing: str) -> None:
        log.warning("fault plan: nobody killed %s in %g s; its traffic passes again", thing, CUT_OFF_MAX_S)
        self._expiry.pop(thing, None)
        self.released(thing)

    def _record(self, record: dict[str, Any], durable: bool = False) -> None:
        line = json.dumps({"time": round(time.time(), 3), **record}) + "\n"
        log.info("fault: %s", line.strip())
        with self.log_path.open("a") as f:
            f.write(line)
            if durable:
                f.flush()
                os.fsync(f.fileno())


class _SlowIssuer:
    def __init__(self, inner: Issuer, seconds: float, record: Callable[[dict[str, Any]], None]) -> None:
        self.inner, self.seconds, self.record = inner, seconds, record

    def issue(self, thing: str, csr_pem: str) -> IssuedCertificate:
        self.record({"fault": "slow.issuer_s", "thing": thing, "delay_s": self.seconds})
        time.sleep(self.seconds)  # the engine is one loop: a slow CA holds everything up, as it would
        return self.inner.issue(thing, csr_pem)


class _SlowRegistry:
    def __init__(self, inner: Registry, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds

    def _wait(self) -> None:
        time.sleep(self.seconds)

    def exclusive_principals(self, thing: str) -> list[str]:
        self._wait()
        return self.inner.exclusive_principals(thing)

    def describe_certificate(self, certificate_id: str) -> CertificateRecord | None:
        self._wait()
        return self.inner.describe_certificate(certificate_id)

    def certificate_policies(self, certificate_id: str) -> list[str]:
        self._wait()
        return self.inner.certificate_policies(certificate_id)

    def attach_policy(self, policy_name: str, certificate_id: str) -> None:
        self._wait()
        self.inner.attach_policy(policy_name, certificate_id)

    def attach_exclusive(self, thing: str, certificate_id: str) -> None:
        self._wait()
        self.inner.attach_exclusive(thing, certificate_id)

    def delete_certificate(self, thing: str, certificate_id: str) -> None:
        self._wait()
        self.inner.delete_certificate(thing, certificate_id)
