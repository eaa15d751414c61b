"""Fault plans: what goes wrong, where, deterministically from a seed (docs/reliability.md, "Fault plans").

Pure: the plan, parsed from TOML with every error naming the key at fault. What the plan decides for each
message or protocol step is `fault_decisions`; the engine's shell (`fault_hooks`) carries the decisions
out; the simulated fleet (`sim.faults`) does the device side (key-store crash points, killed processes
restarted, clock skew).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any

from certrotator.tomlcompat import tomllib


class FaultPlanError(ValueError):
    """A plan that cannot be used; the message names the key (e.g. `message[2].step`)."""


class Step(IntEnum):
    """The protocol's steps (DESIGN.md §2)."""

    NOTIFY_NEXT = 1
    TAKE_JOB = 2
    TAKEN = 3
    CREATE = 4
    CREATED = 5
    GET_WITH_NEW_PAIR = 6
    GOT_IN_PROGRESS = 7
    COMMIT = 8
    COMMITTED = 9
    SUCCEEDED = 10
    TERMINAL = 11


class Direction(Enum):
    TO_ENGINE = "to_engine"  # device -> engine, at the engine's inbox
    TO_DEVICE = "to_device"  # engine -> device, as the engine publishes
    BOTH = "both"


# Which way each step's message travels; 11 (the terminal event) stays inside the engine.
STEP_DIRECTION: dict[Step, Direction] = {
    s: Direction.TO_DEVICE if s % 2 else Direction.TO_ENGINE for s in Step if s != Step.TERMINAL
}


class MessageAction(Enum):
    DROP = "drop"
    DELAY = "delay"


class StepAction(Enum):
    KILL_DEVICE = "kill_device"  # SIGKILL the device's process (the fleet's fault driver does it)
    DISCONNECT_DEVICE = "disconnect_device"  # close its connections; it reconnects by itself
    RESTART_ENGINE = "restart_engine"  # the engine dies (SIGKILL) and is started again by its owner
    DEACTIVATE_CERTIFICATE = "deactivate_certificate"  # the rotation's old or new certificate
    DISABLE_RULE = "disable_rule"


class When(Enum):
    BEFORE = "before"  # the action happens before the step takes effect
    AFTER = "after"  # the step has happened; the action comes before anything later reaches either side


RULE_NAMES = ("create", "commit", "terminal")
# Actions after which the message at hand is lost with the device's connection or the engine.


@dataclass(frozen=True, slots=True)
class MessageFault:
    action: MessageAction
    direction: Direction
    topic: str | None = None  # an MQTT filter
    step: Step | None = None
    nth: int | None = None  # the N-th matching message of each thing (1-based)
    probability: float | None = None  # else: each matching message with this probability
    things: frozenset[str] | None = None
    delay_s: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True, slots=True)
class StepFault:
    step: Step
    action: StepAction
    when: When = When.BEFORE
    nth: int = 1
    things: frozenset[str] | None = None
    certificate: str = "new"  # deactivate_certificate: "old" | "new"
    rule: str | None = None  # disable_rule


@dataclass(frozen=True, slots=True)
class DeviceFault:
    """For the simulated fleet: what happens to these devices' agent processes."""

    things: frozenset[str] | None = None
    crash_at: str | None = None  # a key-store crash point (CERTROTATOR_CRASH_AT); restarted after it
    clock_skew_s: float = 0.0
    restart_after_s: float = 0.2  # how long a killed or crashed device stays down


@dataclass(frozen=True, slots=True)
class FaultPlan:
    seed: int = 0
    messages: tuple[MessageFault, ...] = ()
    steps: tuple[StepFault, ...] = ()
    disabled_rules: tuple[str, ...] = ()
    slow_issuer_s: float = 0.0
    slow_registry_s: float = 0.0
    devices: tuple[DeviceFault, ...] = ()
    source: str = "<plan>"

    def device_faults(self, thing: str) -> list[DeviceFault]:
        return [d for d in self.devices if d.things is None or thing in d.things]


# ------------------------------------------------------------------------------------------ parsing


class _Table:
    """A TOML table being read: every key taken is ticked off, and what is left over is an error."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise FaultPlanError(f"{where}: must be a table, got {data!r}")
        self.data, self.where, self.seen = data, where, set[str]()

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.data.get(key, default)

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def number(self, key: str, default: float, low: float = 0.0, high: float | None = None) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FaultPlanError(f"{self.name(key)}: must be a number, got {value!r}")
        if value < low or (high is not None and value > high):
            bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise FaultPlanError(f"{self.name(key)}: must be {bounds}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int | None, low: int) -> int | None:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise FaultPlanError(f"{self.name(key)}: must be an integer of at least {low}, got {value!r}")
        return value

    def choice(self, key: str, kind: type[Enum], default: Enum | None = None) -> Any:
        value = self.get(key, default.value if default is not None else None)
        options = [str(e.value) for e in kind]  # type: ignore[var-annotated]
        if value is None:
            raise FaultPlanError(f"{self.name(key)}: required, one of {', '.join(options)}")
        if value not in options:
            raise FaultPlanError(f"{self.name(key)}: must be one of {', '.join(options)}, got {value!r}")
        return kind(value)

    def step(self, key: str, required: bool) -> Step | None:
        value = self.get(key)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= len(Step):
            raise FaultPlanError(f"{self.name(key)}: must be a protocol step 1-{len(Step)}, got {value!r}")
        return Step(value)

    def things(self) -> frozenset[str] | None:
        value = self.get("things")
        if value is None:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
            raise FaultPlanError(f"{self.name('things')}: must be a non-empty list of thing names")
        return frozenset(value)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise FaultPlanError(f"{self.name(unknown[0])}: unknown key")


def _list(top: _Table, key: str) -> list[object]:
    value = top.get(key, [])
    if not isinstance(value, list):
        raise FaultPlanError(f"{key}: must be an array of tables ([[{key}]])")
    return value


def _message(t: _Table) -> MessageFault:
    action = t.choice("action", MessageAction)
    step = t.step("step", required=False)
    topic = t.get("topic")
    if (step is None) == (topic is None):
        raise FaultPlanError(f"{t.where}: give either step or topic")
    if topic is not None and (not isinstance(topic, str) or not topic):
        raise FaultPlanError(f"{t.name('topic')}: must be an MQTT topic filter, got {topic!r}")
    if step is Step.TERMINAL and action is MessageAction.DELAY:
        raise FaultPlanError(f"{t.name('action')}: step 11 (the terminal event) can be dropped, not delayed")
    if step is not None:
        if "direction" in t.data:
            raise FaultPlanError(f"{t.name('direction')}: a step has its own direction; leave it out")
        direction = STEP_DIRECTION.get(step, Direction.TO_ENGINE)
    else:
        direction = t.choice("direction", Direction, Direction.BOTH)
    nth = t.integer("nth", None, 1)
    probability = t.get("probability")
    if probability is not None:
        probability = t.number("probability", 0.0, 0.0, 1.0)
    if nth is not None and probability is not None:
        raise FaultPlanError(f"{t.where}: give nth or probability, not both")
    delay = (0.0, 0.0)
    raw = t.get("delay_s")
    if action is MessageAction.DROP and raw is not None:
        raise FaultPlanError(f'{t.name("delay_s")}: only with action = "delay"')
    if action is MessageAction.DELAY:
        delay = _delay(raw, t.name("delay_s"))
    return MessageFault(action, direction, topic, step, nth, probability, t.things(), delay)


def _delay(raw: object, name: str) -> tuple[float, float]:
    def seconds(x: object) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool) and x >= 0

    if isinstance(raw, list) and len(raw) == 2 and all(seconds(x) for x in raw) and raw[0] <= raw[1]:
        return float(raw[0]), float(raw[1])
    if seconds(raw) and raw:
        return float(raw), float(raw)  # type: ignore[arg-type]
    raise FaultPlanError(f"{name}: seconds (> 0), or [low, high] with 0 <= low <= high; got {raw!r}")


def _step(t: _Table) -> StepFault:
    step = t.step("step", required=True)
    assert step is not None
    action = t.choice("action", StepAction)
    when = t.choice("when", When, When.BEFORE)
    nth = t.integer("nth", 1, 1)
    assert nth is not None
    certificate = t.get("certificate", "new")
    if certificate not in ("old", "new"):
        raise FaultPlanError(f"{t.name('certificate')}: must be 'old' or 'new', got {certificate!r}")
    rule = t.get("rule")
    if action is StepAction.DISABLE_RULE and rule not in RULE_NAMES:
        raise FaultPlanError(f"{t.name('rule')}: must be one of {', '.join(RULE_NAMES)}, got {rule!r}")
    return StepFault(step, action, when, nth, t.things(), certificate, rule)


def _device(t: _Table) -> DeviceFault:
    crash_at = t.get("crash_at")
    if crash_at is not None and (not isinstance(crash_at, str) or "." not in crash_at):
        raise FaultPlanError(f"{t.name('crash_at')}: must name a key-store crash point, got {crash_at!r}")
    skew = t.get("clock_skew_s", 0.0)
    if isinstance(skew, bool) or not isinstance(skew, int | float):
        raise FaultPlanError(f"{t.name('clock_skew_s')}: must be a number of seconds, got {skew!r}")
    return DeviceFault(t.things(), crash_at, float(skew), t.number("restart_after_s", 0.2))


def parse_plan(data: dict[str, Any], source: str = "<plan>") -> FaultPlan:
    """A plan from its TOML document (already parsed); FaultPlanError names the key at fault."""
    top = _Table(data, "")
    seed = top.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FaultPlanError(f"seed: must be an integer, got {seed!r}")
    parsed: dict[str, list[Any]] = {}
    for key, read in (("message", _message), ("at_step", _step), ("device", _device)):
        parsed[key] = []
        for i, raw in enumerate(_list(top, key)):
            table = _Table(raw, f"{key}[{i}]")
            parsed[key].append(read(table))  # type: ignore[operator]
            table.done()
    rules = _Table(top.get("rules", {}), "rules")
    disabled = rules.get("disabled", [])
    if not isinstance(disabled, list) or any(r not in RULE_NAMES for r in disabled):
        raise FaultPlanError(f"rules.disabled: a list of {', '.join(RULE_NAMES)}, got {disabled!r}")
    rules.done()
    slow = _Table(top.get("slow", {}), "slow")
    issuer_s, registry_s = slow.number("issuer_s", 0.0), slow.number("registry_s", 0.0)
    slow.done()
    top.done()
    return FaultPlan(
        seed,
        tuple(parsed["message"]),
        tuple(parsed["at_step"]),
        tuple(disabled),
        issuer_s,
        registry_s,
        tuple(parsed["device"]),
        source,
    )


def load_plan(path: Path) -> FaultPlan:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise FaultPlanError(f"cannot read the fault plan {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise FaultPlanError(f"{path} is not valid TOML: {exc}") from None
    try:
        return parse_plan(data, str(path))
    except FaultPlanError as exc:
        raise FaultPlanError(f"{path}: {exc}") from None
