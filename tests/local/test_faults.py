"""Fault plans (local/faults.py): parsing with errors that name the key, the protocol step of a message,
and the decisions (which message is dropped or delayed, which step acts), deterministic from the seed.
The engine's side is exercised end to end in tests/e2e/test_fault_matrix.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from certrotator.local.fault_decisions import Decider, StepTracker, draw
from certrotator.local.faults import (
    Direction,
    FaultPlan,
    FaultPlanError,
    MessageAction,
    Step,
    StepAction,
    When,
    load_plan,
    parse_plan,
)
from certrotator.protocol import Topics, parse_topic

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "fault-plan.example.toml"


def plan(**data: Any) -> FaultPlan:
    return parse_plan(data)


def test_the_documented_example_plan_parses() -> None:
    example = load_plan(EXAMPLE)
    assert example.messages and example.steps and example.devices
    assert example.seed == 7


def test_a_full_plan_parses_into_typed_faults() -> None:
    p = plan(
        seed=3,
        message=[
            {"step": 4, "action": "drop", "nth": 1, "things": ["a"]},
            {"topic": "$aws/things/+/jobs/#", "action": "delay", "delay_s": [0.1, 0.5], "probability": 0.5},
        ],
        at_step=[{"step": 5, "action": "kill_device", "when": "after"}],
        rules={"disabled": ["commit"]},
        slow={"issuer_s": 0.5},
        device=[{"things": ["b"], "crash_at": "files.install.staged", "clock_skew_s": -60}],
    )
    drop, delay = p.messages
    assert (drop.step, drop.direction, drop.action, drop.nth) == (
        Step.CREATE,
        Direction.TO_ENGINE,
        MessageAction.DROP,
        1,
    )
    assert (delay.direction, delay.delay_s, delay.probability) == (Direction.BOTH, (0.1, 0.5), 0.5)
    assert (p.steps[0].action, p.steps[0].when) == (StepAction.KILL_DEVICE, When.AFTER)
    assert p.disabled_rules == ("commit",) and p.slow_issuer_s == 0.5
    assert p.device_faults("b")[0].crash_at == "files.install.staged" and p.device_faults("a") == []


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"mesage": []}, "mesage: unknown key"),
        ({"message": [{"step": 12, "action": "drop"}]}, "message[0].step: must be a protocol step 1-11"),
        ({"message": [{"step": 4, "action": "lose"}]}, "message[0].action: must be one of drop, delay"),
        ({"message": [{"action": "drop"}]}, "message[0]: give either step or topic"),
        (
            {"message": [{"step": 4, "action": "drop", "nth": 0}]},
            "message[0].nth: must be an integer of at least 1",
        ),
        (
            {"message": [{"step": 4, "action": "drop", "probability": 2}]},
            "message[0].probability: must be between 0 and 1",
        ),
        (
            {"message": [{"step": 4, "action": "drop", "nth": 1, "probability": 0.5}]},
            "message[0]: give nth or probability",
        ),
        ({"message": [{"step": 4, "action": "delay"}]}, "message[0].delay_s: seconds"),
        ({"message": [{"step": 4, "action": "drop", "delay_s": 1}]}, "message[0].delay_s: only with action"),
        (
            {"message": [{"step": 4, "action": "drop", "direction": "to_device"}]},
            "message[0].direction: a step has its own",
        ),
        ({"message": [{"step": 4, "action": "drop", "colour": 1}]}, "message[0].colour: unknown key"),
        (
            {"at_step": [{"step": 3, "action": "disable_rule", "rule": "jobs"}]},
            "at_step[0].rule: must be one of create",
        ),
        (
            {"at_step": [{"step": 3, "action": "kill_device", "when": "during"}]},
            "at_step[0].when: must be one of before",
        ),
        (
            {"at_step": [{"step": 3, "action": "kill_device", "things": []}]},
            "at_step[0].things: must be a non-empty list",
        ),
        ({"rules": {"disabled": ["x"]}}, "rules.disabled: a list of create, commit, terminal"),
        ({"slow": {"issuer_s": -1}}, "slow.issuer_s: must be at least 0"),
        ({"device": [{"crash_at": 3}]}, "device[0].crash_at: must name a key-store crash point"),
        ({"seed": "x"}, "seed: must be an integer"),
    ],
)
def test_a_bad_plan_is_refused_naming_the_key(data: dict[str, Any], names: str) -> None:
    with pytest.raises(FaultPlanError) as error:
        parse_plan(data)
    assert str(error.value).startswith(names), str(error.value)


def test_a_plan_file_that_is_not_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.toml"
    path.write_text("seed = [")
    with pytest.raises(FaultPlanError, match=r"plan\.toml is not valid TOML"):
        load_plan(path)
    path.write_text("[[message]]\nstep = 0\naction = 'drop'\n")
    with pytest.raises(FaultPlanError, match=r"plan\.toml: message\[0\]\.step"):
        load_plan(path)


# ------------------------------------------------------------------------------------------ steps


def test_each_message_of_a_rotation_is_its_protocol_step() -> None:
    thing, job = "dev-1", "job-1"
    steps = StepTracker()

    def to_device(topic: str, body: dict[str, Any]) -> Step | None:
        return steps.to_device(parse_topic(topic), json.dumps(body).encode())

    def to_engine(topic: str, body: dict[str, Any], new_pair: bool = False) -> Step | None:
        return steps.to_engine(parse_topic(topic), json.dumps(body).encode(), lambda: new_pair)

    update = Topics.job_update(thing, job)
    queued = {"execution": {"jobId": job, "status": "QUEUED"}}
    in_progress = {"execution": {"jobId": job, "status": "IN_PROGRESS"}}
    assert to_engine(Topics.next_get(thing), {}) is None  # the start-up get
    assert to_device(Topics.accepted(Topics.next_get(thing)), {}) is None  # no job yet
    assert to_device(Topics.notify_next(thing), queued) is Step.NOTIFY_NEXT
    assert to_engine(update, {"status": "IN_PROGRESS"}) is Step.TAKE_JOB
    assert to_device(Topics.accepted(update), {}) is Step.TAKEN
    assert to_engine(Topics.create(thing), {"jobId": job, "csr": "x"}) is Step.CREATE
    assert to_device(Topics.accepted(Topics.create(thing)), {"certificatePem": "x"}) is Step.CREATED
    assert to_engine(Topics.next_get(thing), {}, new_pair=True) is Step.GET_WITH_NEW_PAIR
    assert to_device(Topics.accepted(Topics.next_get(thing)), in_progress) is Step.GOT_IN_PROGRESS
    assert to_engine(Topics.commit(thing), {"jobId": job}) is Step.COMMIT
    assert to_device(Topics.accepted(Topics.commit(thing)), {}) is Step.COMMITTED
    assert to_engine(update, {"status": "SUCCEEDED"}) is Step.SUCCEEDED
    assert to_device(Topics.accepted(update), {}) is None  # the reply to SUCCEEDED is no step
    assert to_device(Topics.notify_next(thing), {}) is None  # nothing queued any more
    assert to_engine(update, {"status": "FAILED"}) is None


# -------------------------------------------------------------------------------------- decisions


def test_the_nth_message_of_each_thing_is_dropped_and_only_that() -> None:
    decider = Decider(plan(message=[{"step": 4, "action": "drop", "nth": 2}]))
    topic = Topics.create("a")
    seen = [
        decider.message(Direction.TO_ENGINE, t, topic, Step.CREATE).drop for t in ("a", "b", "a", "b", "a")
    ]
    assert seen == [False, False, True, True, False]
    assert not decider.message(Direction.TO_DEVICE, "a", topic, Step.CREATE).drop  # the other way


def test_topic_filters_and_directions_select_messages() -> None:
    decider = Decider(
        plan(
            message=[{"topic": "awslabs/things/+/certificate/#", "action": "drop", "direction": "to_device"}]
        )
    )
    assert decider.message(
        Direction.TO_DEVICE, "a", "awslabs/things/a/certificate/create/accepted", None
    ).drop
    assert not decider.message(
        Direction.TO_ENGINE, "a", "awslabs/things/a/certificate/create", Step.CREATE
    ).drop
    assert not decider.message(
        Direction.TO_DEVICE, "a", "$aws/things/a/jobs/notify-next", Step.NOTIFY_NEXT
    ).drop


def test_random_faults_follow_the_seed_per_thing_whatever_the_interleaving() -> None:
    def run(seed: int, order: list[str]) -> dict[str, list[bool]]:
        decider = Decider(plan(seed=seed, message=[{"topic": "#", "action": "drop", "probability": 0.3}]))
        out: dict[str, list[bool]] = {}
        for thing in order:
            out.setdefault(thing, []).append(decider.message(Direction.BOTH, thing, "x/y", None).drop)
        return out

    order = ["a", "b"] * 200
    first = run(1, order)
    assert first == run(1, sorted(order))  # b's fate does not depend on a's messages
    assert first != run(2, order)
    rate = sum(first["a"] + first["b"]) / 400
    assert 0.2 < rate < 0.4


def test_delays_are_drawn_in_their_range() -> None:
    decider = Decider(plan(message=[{"topic": "#", "action": "delay", "delay_s": [0.5, 1.5]}]))
    delays = [decider.message(Direction.TO_ENGINE, "a", "x", None).delay_s for _ in range(50)]
    assert all(0.5 <= d <= 1.5 for d in delays) and len(set(delays)) > 10
    assert 0 <= draw(1, "k") < 1 and draw(1, "k") == draw(1, "k") != draw(2, "k")


def test_a_step_action_before_happens_at_the_step_and_loses_the_message() -> None:
    decider = Decider(plan(at_step=[{"step": 5, "action": "kill_device", "things": ["a"]}]))
    verdict = decider.message(Direction.TO_DEVICE, "a", "t", Step.CREATED)
    assert verdict.drop and [a.fault.action for a in verdict.acts] == [StepAction.KILL_DEVICE]
    assert not decider.message(Direction.TO_DEVICE, "b", "t", Step.CREATED).acts  # another thing


def test_a_step_action_after_waits_for_the_things_next_message() -> None:
    decider = Decider(plan(at_step=[{"step": 4, "action": "kill_device", "when": "after"}]))
    at_step = decider.message(Direction.TO_ENGINE, "a", "create", Step.CREATE)
    assert not at_step.drop and not at_step.acts  # the create is handled
    assert not decider.message(Direction.TO_DEVICE, "b", "other", None).acts  # another thing's message
    reply = decider.message(Direction.TO_DEVICE, "a", "create/accepted", Step.CREATED)
    assert reply.drop and [a.step for a in reply.acts] == [Step.CREATE]


def test_a_killed_device_is_cut_off_until_released() -> None:
    decider = Decider(plan())
    decider.cut_off.add("a")
    assert decider.message(Direction.TO_ENGINE, "a", "x", Step.CREATE).cut_off
    decider.cut_off.discard("a")
    assert not decider.message(Direction.TO_ENGINE, "a", "x", Step.CREATE).drop


def test_an_engine_restart_fires_once_even_after_the_restart() -> None:
    faults = plan(at_step=[{"step": 3, "action": "restart_engine"}])
    first = Decider(faults)
    (act,) = first.message(Direction.TO_DEVICE, "a", "t", Step.TAKEN).acts
    again = Decider(faults, fired={act.key})  # what the restarted engine reads back
    assert not again.message(Direction.TO_DEVICE, "a", "t", Step.TAKEN).acts


def test_the_terminal_event_is_lost_once_and_acts_after_its_handler() -> None:
    decider = Decider(
        plan(
            message=[{"step": 11, "action": "drop", "nth": 1}],
            at_step=[{"step": 11, "action": "disconnect_device", "when": "after"}],
        )
    )
    first = decider.terminal("a")
    assert first.drop and not first.acts  # the handler fails: nothing after it happens yet
    again = decider.terminal("a")  # tried again
    assert not again.drop and not again.acts
    assert [a.fault.action for a in decider.after_terminal("a")] == [StepAction.DISCONNECT_DEVICE]
