"""Fault plans, the pure decisions: which protocol step (DESIGN.md §2, 1-11) a message is, and what
the plan says for each message or step: pass, drop, delay, or act. The plan itself and its parsing are in
`faults`; the engine's shell that carries the decisions out is `fault_hooks`.

Randomness never comes from a shared generator: every draw is a hash of (seed, rule, thing, count), so
what happens to one device does not depend on how its messages interleave with other devices'.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from certrotator.local.faults import (
    Direction,
    FaultPlan,
    MessageAction,
    Step,
    StepAction,
    StepFault,
    When,
)
from certrotator.local.topic_tree import filter_matches
from certrotator.protocol import JobExecutionStatus, ParsedTopic, Reply, TopicKind

_LOSES_THE_MESSAGE = {StepAction.KILL_DEVICE, StepAction.DISCONNECT_DEVICE, StepAction.RESTART_ENGINE}

# ------------------------------------------------------------------------------------ protocol steps


def _json(payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


class StepTracker:
    """Which protocol step a message is. One look at the message, plus a memory of each thing's last
    job update (its reply does not say which status it accepted)."""

    def __init__(self) -> None:
        self._updates: dict[tuple[str, str], str] = {}

    def to_engine(self, topic: ParsedTopic, payload: bytes, on_new_pair: Callable[[], bool]) -> Step | None:
        """A device's message. `on_new_pair()`: the connection uses the certificate create just issued."""
        thing, kind = topic.thing, topic.kind
        if thing is None or topic.reply is not None:
            return None
        if kind is TopicKind.UPDATE and topic.job_id is not None:
            status = _json(payload).get("status")
            self._updates[(thing, topic.job_id)] = str(status)
            if status == JobExecutionStatus.IN_PROGRESS.value:
                return Step.TAKE_JOB
            return Step.SUCCEEDED if status == JobExecutionStatus.SUCCEEDED.value else None
        if kind is TopicKind.CREATE:
            return Step.CREATE
        if kind is TopicKind.COMMIT:
            return Step.COMMIT
        if kind is TopicKind.GET and topic.job_id == "$next" and on_new_pair():
            return Step.GET_WITH_NEW_PAIR
        return None

    def to_device(self, topic: ParsedTopic, payload: bytes) -> Step | None:
        thing, kind = topic.thing, topic.kind
        if thing is None:
            return None
        if kind is TopicKind.NOTIFY_NEXT:
            execution = _json(payload).get("execution")
            queued = (
                isinstance(execution, dict) and execution.get("status") == JobExecutionStatus.QUEUED.value
            )
            return Step.NOTIFY_NEXT if queued else None
        if kind is TopicKind.UPDATE and topic.reply is not None and topic.job_id is not None:
            status = self._updates.pop((thing, topic.job_id), None)
            return Step.TAKEN if status == JobExecutionStatus.IN_PROGRESS.value else None
        if kind is TopicKind.CREATE and topic.reply is not None:
            return Step.CREATED
        if kind is TopicKind.COMMIT and topic.reply is not None:
            return Step.COMMITTED
        if kind is TopicKind.GET and topic.reply is Reply.ACCEPTED and topic.job_id == "$next":
            execution = _json(payload).get("execution")
            if (
                isinstance(execution, dict)
                and execution.get("status") == JobExecutionStatus.IN_PROGRESS.value
            ):
                return Step.GOT_IN_PROGRESS
        return None


# ------------------------------------------------------------------------------------------ decisions


def draw(seed: int, *key: object) -> float:
    """A number in [0, 1) fixed by the seed and the key."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True, slots=True)
class Act:
    """A step fault to carry out now, on `thing`."""

    rule: int  # its index in plan.steps
    fault: StepFault
    thing: str
    step: Step

    @property
    def key(self) -> str:
        """Names this firing across engine restarts (a restart_engine fires once per thing)."""
        return f"at_step[{self.rule}]:{self.thing}"


@dataclass
class Verdict:
    drop: bool = False
    delay_s: float = 0.0
    acts: list[Act] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)  # what fired, for the fault log
    cut_off: bool = False  # dropped because the device is being killed


class Decider:
    """The plan's decisions, message by message. `fired` holds the keys of one-shot faults that fired
    in an earlier run of the engine (a restarted engine must not restart again at the same place)."""

    def __init__(self, plan: FaultPlan, fired: set[str] | None = None) -> None:
        self.plan = plan
        self.fired = set(fired or ())
        self._counts: dict[tuple[str, int, str], int] = defaultdict(int)
        self._armed: dict[str, list[Act]] = defaultdict(list)
        self.cut_off: set[str] = set()  # things whose device is being killed: nothing passes

    def message(self, direction: Direction, thing: str, topic: str, step: Step | None) -> Verdict:
        """A message of `thing` passing the engine (`step` if it is one of the protocol's)."""
        verdict = Verdict()
        if thing in self.cut_off:
            verdict.drop = verdict.cut_off = True
            return verdict
        verdict.acts.extend(self._armed.pop(thing, []))  # an "after" of an earlier step: before this one
        self._decide(direction, thing, topic, step, verdict)
        if any(a.fault.action in _LOSES_THE_MESSAGE for a in verdict.acts):
            verdict.drop = True  # lost with the device's connection, or with the engine
        return verdict

    def terminal(self, thing: str) -> Verdict:
        """Step 11, the terminal event of one of `thing`'s executions, before its handler runs. A drop
        here is a handler that fails once (the engine tries again, as Lambda retries an event); what
        the step's actions do to the device does not touch the event."""
        verdict = Verdict()
        armed = self._armed.pop(thing, [])
        verdict.acts.extend(a for a in armed if a.step is not Step.TERMINAL)
        self._armed[thing] = [a for a in armed if a.step is Step.TERMINAL]  # an event tried again
        self._decide(Direction.TO_ENGINE, thing, "", Step.TERMINAL, verdict)
        verdict.delay_s = 0.0
        return verdict

    def after_terminal(self, thing: str) -> list[Act]:
        """What an `after` of step 11 armed: it happens once the handler has run."""
        return [a for a in self._armed.pop(thing, []) if a.step is Step.TERMINAL]

    def _decide(
        self, direction: Direction, thing: str, topic: str, step: Step | None, verdict: Verdict
    ) -> None:
        if step is not None:
            self._steps(thing, step, verdict)
        for i, fault in enumerate(self.plan.messages):
            if fault.direction not in (direction, Direction.BOTH) or not _targets(fault.things, thing):
                continue
            if (fault.step is not None and fault.step != step) or (
                fault.topic is not None and not filter_matches(fault.topic, topic)
            ):
                continue
            key = ("message", i, thing)
            if not self._hit(key, fault.nth, fault.probability):
                continue
            if fault.action is MessageAction.DROP:
                verdict.drop = True
            else:
                low, high = fault.delay_s
                pick = low + (high - low) * draw(self.plan.seed, *key, self._counts[key], "delay")
                verdict.delay_s = max(verdict.delay_s, pick)
            verdict.fired.append(f"message[{i}]")

    def _steps(self, thing: str, step: Step, verdict: Verdict) -> None:
        for i, fault in enumerate(self.plan.steps):
            if fault.step != step or not _targets(fault.things, thing):
                continue
            act = Act(i, fault, thing, step)
            if act.key in self.fired or not self._hit(("at_step", i, thing), fault.nth, None):
                continue
            if fault.action is StepAction.RESTART_ENGINE:
                self.fired.add(act.key)
            verdict.fired.append(f"at_step[{i}]")
            if fault.when is When.BEFORE:
                verdict.acts.append(act)
            else:
                self._armed[thing].append(act)

    def _hit(self, key: tuple[str, int, str], nth: int | None, probability: float | None) -> bool:
        self._counts[key] += 1
        n = self._counts[key]
        if probability is not None:
            return draw(self.plan.seed, *key, n) < probability
        return nth is None or n == nth


def _targets(things: frozenset[str] | None, thing: str) -> bool:
    return things is None or thing in things
