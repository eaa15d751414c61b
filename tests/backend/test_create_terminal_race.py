"""Create and the terminal handler racing: one test per interleaving (docs/reliability.md, "Create/terminal
race"). The device gives up after 30 s while create may still be issuing (60-90 s with a private CA), so
the execution can end, and its terminal event be handled, at any point of a create.

Each test runs the terminal handler at one point inside a create (by wrapping the fake port create calls
there) and checks the outcome the design promises: the thing ends with its one old certificate, no
other certificate is left in the registry, the rotation state says the rotation is over, and the
operator is told.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from certrotator.backend.handlers import (
    HandlerResult,
    handle_commit_certificate,
    handle_create_certificate,
    handle_job_execution_terminal,
)
from certrotator.backend.ports import RotationState
from certrotator.protocol import JobExecutionStatus, RotationProgress

from .fakes import World

S = JobExecutionStatus
P = RotationProgress


class Crash(BaseException):
    """The Lambda is stopped mid-handler (timeout, out of memory): nothing in the handler runs on."""


@pytest.fixture
def world() -> World:
    return World()


def around(
    obj: Any,
    name: str,
    *,
    before: Callable[[], None] | None = None,
    after: Callable[[], None] | None = None,
    when: Callable[..., bool] = lambda *args: True,
) -> None:
    """Run `before` / `after` around the first call of obj.name(...) for which `when(*args)` holds."""
    original = getattr(obj, name)
    fired = False

    def wrapper(*args: Any) -> Any:
        nonlocal fired
        hit = not fired and when(*args)
        if hit:
            fired = True
            if before is not None:
                before()
        result = original(*args)
        if hit and after is not None:
            after()
        return result

    setattr(obj, name, wrapper)


class Terminal:
    """The execution ends (the device gave up) and its terminal event is handled, when called."""

    def __init__(self, world: World, status: JobExecutionStatus = S.FAILED) -> None:
        self.world, self.status = world, status
        self.results: list[HandlerResult] = []

    def __call__(self) -> None:
        event = self.world.end_execution(self.status)
        self.results.append(handle_job_execution_terminal(event, self.world.ports))

    def again(self) -> HandlerResult:
        """The same event delivered once more (IoT rules and Lambda deliver at least once)."""
        result = handle_job_execution_terminal(self.world.terminal_event(self.status), self.world.ports)
        self.results.append(result)
        return result


def create(world: World) -> HandlerResult:
    _, csr = world.new_csr()
    return handle_create_certificate(*world.create_request(csr), world.ports)


def assert_settled(world: World, *, terminated: bool = True) -> None:
    """The invariants after an execution ended mid-rotation: one certificate, the old one, and no
    other certificate left in the registry; the state says the rotation is over; the operator knows."""
    assert world.registry.things["dev1"] == [world.cert_id]
    assert set(world.registry.certificates) == {world.cert_id}, "a certificate was left behind"
    state = world.state.states.get("dev1")
    if terminated:
        assert state is not None and (state.job_id, state.progress) == (world.job_id, P.TERMINATED)
    else:
        assert state is None
    assert world.notifier.notifications, "nobody was told"
    assert all(n.thing == "dev1" and n.job_id == world.job_id for n in world.notifier.notifications)


def replies(world: World) -> list[str]:
    return [topic.rsplit("/", 1)[1] for topic, _ in world.publisher.messages]


# ---------------------------------------------------------------------------------- the interleavings


def test_terminal_before_create_starts(world: World) -> None:
    """The device failed before it asked (and wrote no statusDetails at all): nothing is issued, the
    operator is told the execution failed with nothing to clean up."""
    world.end_execution(S.FAILED)
    ended = handle_job_execution_terminal(world.terminal_event(S.FAILED, details={}), world.ports)
    result = create(world)

    assert ended.outcome == "failed"
    assert result.outcome == "rejected" and "FAILED, not IN_PROGRESS" in result.reason
    assert world.issuer.issued == []
    assert_settled(world, terminated=False)
    (note,) = world.notifier.notifications
    assert "no certificate had been issued" in note.outcome


def test_terminal_after_the_checks_before_the_issuing_record(world: World) -> None:
    """The execution ends just after create's checks passed: the terminal handler finds no state, so
    create's last look (the execution is no longer IN_PROGRESS) withdraws what it issued."""
    terminal = Terminal(world)
    around(world.state, "save", before=terminal, when=lambda thing, state: state.progress is P.ISSUING)

    result = create(world)

    assert terminal.results[0].outcome == "failed"
    assert result.outcome == "rejected" and "execution ended (FAILED)" in result.reason
    assert world.registry.deleted == world.issuer.issued
    assert_settled(world)
    assert replies(world) == ["rejected"]
    assert len(world.notifier.notifications) == 2  # the execution ended; the certificate was withdrawn


def test_terminal_while_issuing(world: World) -> None:
    """The terminal handler finds `issuing` (no certificate id yet): it marks the rotation ended and
    says create will withdraw; create writes `created` over the mark, attaches, then its last look sees
    the execution ended and withdraws."""
    terminal = Terminal(world)
    around(world.issuer, "issue", before=terminal)

    result = create(world)

    (ended,) = terminal.results
    assert ended.outcome == "failed" and "the create handler withdraws" in ended.reason
    assert result.outcome == "rejected"
    assert world.registry.deleted == world.issuer.issued
    assert_settled(world)
    outcomes = [n.outcome for n in world.notifier.notifications]
    assert "while its certificate was being issued" in outcomes[0]
    assert "withdrawn before the device received it" in outcomes[1]


def test_terminal_between_issue_and_attach(world: World) -> None:
    """`created` is recorded, nothing attached yet: the terminal handler deletes the new certificate;
    create's attach then fails on a certificate that no longer exists, and it rejects."""
    terminal = Terminal(world)
    around(world.state, "save", after=terminal, when=lambda thing, state: state.progress is P.CREATED)

    result = create(world)

    assert terminal.results[0].outcome == "failed"
    assert result.outcome == "rejected" and "could not set up the new certificate" in result.reason
    assert world.registry.deleted == world.issuer.issued
    assert_settled(world)
    (note,) = world.notifier.notifications  # the terminal handler's; create sees it was handled
    assert note.details["newCertificateId"] == world.issuer.issued[0]


def test_terminal_after_attach_before_the_last_look(world: World) -> None:
    """Everything is set up (two certificates attached, state `created`) when the execution ends: the
    terminal handler deletes the new one; create's last look finds the rotation terminated and rejects
    instead of handing the device a deleted certificate."""
    terminal = Terminal(world)
    around(world.registry, "attach_exclusive", after=terminal)

    result = create(world)

    assert result.outcome == "rejected" and "execution ended while the certificate was being created" in (
        result.reason
    )
    assert world.registry.deleted == world.issuer.issued
    assert_settled(world)
    assert len(world.notifier.notifications) == 1
    assert replies(world) == ["rejected"]


def test_terminal_after_the_last_look(world: World) -> None:
    """The execution ends after create's last look (the reply is on its way): this is the plain
    FAILED-after-create row of the table, the terminal handler deletes the new certificate."""
    terminal = Terminal(world)
    around(world.publisher, "publish", before=terminal)

    result = create(world)

    assert result.outcome == "accepted"  # the device may install it: its connection will fail, it rolls back
    assert world.registry.deleted == world.issuer.issued
    assert_settled(world)


def test_terminal_after_create_finished(world: World) -> None:
    result = create(world)
    terminal = Terminal(world, S.TIMED_OUT)
    terminal()

    assert result.outcome == "accepted"
    assert terminal.results[0].outcome == "timed_out"
    assert world.registry.deleted == world.issuer.issued
    assert_settled(world)


@pytest.mark.parametrize("status", [S.FAILED, S.TIMED_OUT, S.SUCCEEDED])
def test_duplicate_terminal_delivery(world: World, status: JobExecutionStatus) -> None:
    """The same event twice (the rule or Lambda's retry): the second finds the rotation terminated and
    does nothing: no second deletion, no second (or contradictory) notification, no error."""
    create(world)
    new_id = world.issuer.issued[0]
    if status is S.SUCCEEDED:
        assert handle_commit_certificate(*world.commit_request(new_id), world.ports).outcome == "accepted"
    terminal = Terminal(world, status)
    terminal()
    deleted, notified, writes = (
        list(world.registry.deleted),
        len(world.notifier.notifications),
        len(world.state.writes),
    )

    second = terminal.again()

    assert second.outcome == "duplicate"
    assert world.registry.deleted == deleted == [world.cert_id if status is S.SUCCEEDED else new_id]
    assert len(world.notifier.notifications) == notified == int(status is not S.SUCCEEDED)
    assert len(world.state.writes) == writes


def test_create_retried_after_a_crash_between_record_and_attach(world: World) -> None:
    """The first create stopped after recording `created` and before attaching (the Lambda timed out):
    the certificate it issued is known only to the state. A second create for the job withdraws it
    before it records its own, so it is not orphaned; the terminal handler then finds the second."""

    def crash() -> None:
        raise Crash()

    around(world.registry, "attach_policy", before=crash)
    with pytest.raises(Crash):
        create(world)
    first = world.issuer.issued[0]
    assert world.state.states["dev1"] == RotationState(world.job_id, world.cert_id, first, P.CREATED)

    retried = create(world)

    assert retried.outcome == "accepted"
    second = world.issuer.issued[1]
    assert world.registry.deleted == [first]
    assert world.registry.things["dev1"] == [world.cert_id, second]
    Terminal(world)()
    assert world.registry.deleted == [first, second]
    assert_settled(world)


def test_create_retried_after_a_crash_while_issuing(world: World) -> None:
    """Stopped while issuing: `issuing` is left behind with no certificate id; the retry starts afresh."""

    def crash() -> None:
        raise Crash()

    around(world.issuer, "issue", before=crash)
    with pytest.raises(Crash):
        create(world)
    assert world.state.states["dev1"].progress is P.ISSUING

    assert create(world).outcome == "accepted"
    assert world.state.states["dev1"].progress is P.CREATED
    Terminal(world)()
    assert_settled(world)


def test_two_creates_for_one_job_at_once(world: World) -> None:
    """A redelivered create runs while the first is between its record and its attach: the second
    withdraws the first's certificate and carries on; the first fails to attach and, seeing the state is
    no longer its own, leaves it alone. One new certificate is attached, and it is the recorded one."""
    inner: list[HandlerResult] = []
    around(
        world.state,
        "save",
        after=lambda: inner.append(create(world)),
        when=lambda thing, state: state.progress is P.CREATED,
    )

    outer = create(world)

    (second,) = inner
    first_id, second_id = world.issuer.issued
    assert second.outcome == "accepted" and outer.outcome == "rejected"
    assert world.registry.deleted == [first_id]
    assert world.registry.things["dev1"] == [world.cert_id, second_id]
    assert world.state.states["dev1"] == RotationState(world.job_id, world.cert_id, second_id, P.CREATED)
    Terminal(world)()
    assert_settled(world)


def test_a_withdrawal_that_fails_leaves_the_record_for_the_terminal_handler(world: World) -> None:
    """The execution ended while issuing and create cannot delete what it issued (throttled): it tells the
    operator, and leaves `created` so that the terminal event, when it comes, deletes the certificate."""

    def device_gives_up() -> None:  # the execution times out; its event has not been handled yet
        world.end_execution(S.TIMED_OUT)

    around(world.issuer, "issue", before=device_gives_up)
    original = world.registry.delete_certificate
    refusals: list[str] = []

    def throttled_once(thing: str, certificate_id: str) -> None:
        if not refusals:
            refusals.append(certificate_id)
            raise RuntimeError("ThrottlingException")
        original(thing, certificate_id)

    world.registry.delete_certificate = throttled_once  # type: ignore[method-assign]

    result = create(world)

    assert result.outcome == "rejected"
    (new_id,) = world.issuer.issued
    assert refusals == [new_id]
    assert world.state.states["dev1"] == RotationState(world.job_id, world.cert_id, new_id, P.CREATED)
    (note,) = world.notifier.notifications
    assert note.status == "TIMED_OUT" and "could not be withdrawn" in note.outcome
    assert note.action == f"delete certificate {new_id} and detach it from dev1"

    ended = handle_job_execution_terminal(world.terminal_event(S.TIMED_OUT), world.ports)
    assert ended.outcome == "timed_out"
    assert world.registry.deleted == [new_id]
    assert_settled(world)


def test_create_withdraws_when_its_last_look_cannot_be_taken(world: World) -> None:
    """Not knowing whether the execution is still IN_PROGRESS counts as ended: the certificate is
    withdrawn before the device has it, never handed out unrecorded."""

    def unavailable(thing: str, job_id: str) -> None:
        raise RuntimeError("ServiceUnavailableException")

    around(
        world.registry,
        "attach_exclusive",
        after=lambda: setattr(world.jobs, "describe_execution", unavailable),
    )

    result = create(world)

    assert result.outcome == "rejected"
    assert world.registry.deleted == world.issuer.issued
    assert world.registry.things["dev1"] == [world.cert_id]
    assert world.state.states["dev1"].progress is P.TERMINATED
    (note,) = world.notifier.notifications
    assert note.status == "UNKNOWN"
