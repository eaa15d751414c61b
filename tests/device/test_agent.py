"""The agent shell around the machine: start-up retries and giving up, re-synchronisation on resumed
connections and periodically, and that no failure leaves it waiting forever. A real reactor; the key
store and transport are small stand-ins whose failures the tests choose (real-process tests of the
same behaviour: test_agent_process.py, tests/e2e/test_resync.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from cryptography import x509

from certrotator.crypto import KeyAlgorithm, SigningAlgorithm
from certrotator.device import machine as m
from certrotator.device.agent import Agent, AgentSettings
from certrotator.device.keystores.base import KeyStoreError, TransientKeyStoreError
from certrotator.device.reactor import Reactor
from certrotator.device.startup import (
    AGENT_FAILED_EXIT_CODE,
    STARTUP_FAILED_EXIT_CODE,
    StartupRetry,
    is_transient,
    retry_delay,
)
from certrotator.device.transport import OnMessage, OnReady, OnResumed
from certrotator.protocol import Topics

THING = "thing-1"
NEXT_GET = Topics.next_get(THING)
ANNOUNCE = Topics.announce(THING)
WAIT_S = 10.0
FAST = StartupRetry(attempts=4, first_delay_s=0.02, max_delay_s=0.05)


# ------------------------------------------------------------------------------------- the policy


def test_default_policy_numbers() -> None:
    policy = StartupRetry()
    assert (policy.attempts, policy.first_delay_s, policy.max_delay_s) == (8, 0.5, 10.0)
    assert policy.worst_case_wait_s() == 35.5  # 0.5 + 1 + 2 + 4 + 8 + 10 + 10
    caps = [retry_delay(policy, n, TransientKeyStoreError("busy"), 1.0) for n in range(1, 9)]
    assert caps == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, None]
    lows = [retry_delay(policy, n, TransientKeyStoreError("busy"), 0.0) for n in range(1, 8)]
    assert lows == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]  # jitter draws from [cap/2, cap]


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (TransientKeyStoreError("CKR_GENERAL_ERROR"), True),
        (BlockingIOError(), True),
        (TimeoutError(), True),
        (KeyStoreError("PinIncorrect()"), False),
        (KeyStoreError("rotation journal has an unknown phase 'x'"), False),
        (FileNotFoundError("device.pem.crt"), False),
        (ValueError("bad"), False),
    ],
)
def test_only_failures_that_may_pass_are_retried(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient
    assert (retry_delay(StartupRetry(), 1, error, 0.5) is not None) is transient


def test_the_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        StartupRetry(attempts=0)
    with pytest.raises(ValueError, match="first_delay_s <= max_delay_s"):
        StartupRetry(first_delay_s=5.0, max_delay_s=1.0)


# ---------------------------------------------------------------------------------- stand-ins


class FlakyStore:
    """A key store whose recover() fails with the given errors first (one per call), then works."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = list(failures)
        self.recover_times: list[float] = []

    def recover(self) -> None:
        self.recover_times.append(time.monotonic())
        if self.failures:
            raise self.failures.pop(0)

    def current_certificate(self) -> x509.Certificate:
        raise AssertionError("not needed")

    def has_backup(self) -> bool:
        return False

    def prepare(self, job_id: str, key_algorithm: KeyAlgorithm, signing_algorithm: SigningAlgorithm) -> str:
        raise AssertionError("not needed")

    def install(self, job_id: str, certificate_pem: str) -> None:
        raise AssertionError("not needed")

    def rollback(self) -> None:
        raise AssertionError("not needed")

    def commit(self) -> None:
        raise AssertionError("not needed")

    def discard_prepared(self) -> None:
        pass


@dataclass
class Link:
    """What the stand-in transports share with the test: publishes, and the latest callbacks."""

    published: list[str] = field(default_factory=list)
    started: int = 0
    stopped: int = 0
    on_message: OnMessage | None = None
    on_resumed: OnResumed | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def touch(self) -> None:
        with self.changed:
            self.changed.notify_all()


class StandIn:
    """Connects and subscribes at once; publishing can be made to raise."""

    def __init__(self, link: Link, publish_raises: bool = False) -> None:
        self.link, self.publish_raises = link, publish_raises

    def start(self, on_message: OnMessage, on_ready: OnReady, on_resumed: OnResumed) -> None:
        self.link.started += 1
        self.link.on_message, self.link.on_resumed = on_message, on_resumed
        on_ready(None)
        self.link.touch()

    def publish(self, topic: str, payload: bytes) -> None:
        if self.publish_raises:
            raise RuntimeError("the transport broke")
        self.link.published.append(topic)
        self.link.touch()

    def stop(self) -> None:
        self.link.stopped += 1


@dataclass
class Fatal:
    calls: list[tuple[str, int]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def __call__(self, reason: str, code: int) -> None:
        self.calls.append((reason, code))
        self.done.set()


@contextmanager
def running(
    store: FlakyStore,
    factory: Callable[[], StandIn],
    startup: StartupRetry = FAST,
    resync_interval_s: float | None = None,
) -> Iterator[tuple[Agent, Fatal]]:
    settings = AgentSettings(
        THING,
        KeyAlgorithm.ECDSA_P256,
        SigningAlgorithm.ECDSA_WITH_SHA256,
        state_timeout_s=5.0,
        retry_min_s=0.01,
        retry_max_s=0.02,
        startup=startup,
        resync_interval_s=resync_interval_s,
    )
    reactor = Reactor().start()
    fatal = Fatal()
    agent = Agent(settings, store, factory, reactor, on_fatal=fatal)
    try:
        agent.start()
        yield agent, fatal
    finally:
        agent.stop()
        reactor.stop()


def eventually(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    """For conditions nothing signals (the agent's state, read across threads)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def reply(link: Link, topic: str, body: dict[str, object]) -> None:
    assert link.on_message is not None
    link.on_message(topic, json.dumps(body).encode())


# ------------------------------------------------------------------------------------- start-up


def test_a_store_that_fails_transiently_a_few_times_then_works_comes_up() -> None:
    store = FlakyStore([TransientKeyStoreError("CKR_GENERAL_ERROR")] * 3)
    link = Link()
    with running(store, lambda: StandIn(link)) as (agent, fatal):
        assert link.wait(lambda: NEXT_GET in link.published), "never connected"
    assert fatal.calls == [] and agent.failure is None
    assert len(store.recover_times) == 4
    gaps = [b - a for a, b in zip(store.recover_times, store.recover_times[1:], strict=False)]
    # Back-off: each wait at least half its cap (0.02, 0.04, capped 0.05).
    assert all(gap >= low for gap, low in zip(gaps, [0.01, 0.02, 0.025], strict=True)), gaps


def test_transient_failures_that_outlast_the_tries_end_the_agent() -> None:
    store = FlakyStore([TransientKeyStoreError("no token labelled 'T'")] * 10)
    link = Link()
    started = time.monotonic()
    with running(store, lambda: StandIn(link)) as (agent, fatal):
        assert fatal.done.wait(WAIT_S), "the agent neither came up nor gave up"
    assert time.monotonic() - started < FAST.worst_case_wait_s() + 5
    ((reason, code),) = fatal.calls
    assert code == STARTUP_FAILED_EXIT_CODE
    assert "still failing after 4 tries" in reason and "no token labelled 'T'" in reason
    assert agent.failure == reason
    assert len(store.recover_times) == FAST.attempts
    assert link.started == 0, "it must not connect with credentials it could not recover"


def test_a_persistent_start_up_failure_ends_the_agent_at_once() -> None:
    store = FlakyStore([KeyStoreError("rotation journal has an unknown phase 'bogus'")])
    link = Link()
    with running(store, lambda: StandIn(link)) as (_agent, fatal):
        assert fatal.done.wait(WAIT_S)
    ((reason, code),) = fatal.calls
    assert code == STARTUP_FAILED_EXIT_CODE
    assert "not an error that passes" in reason and "unknown phase 'bogus'" in reason
    assert len(store.recover_times) == 1
    assert link.started == 0


def test_an_unexpected_error_in_the_agent_ends_it_instead_of_leaving_it_waiting() -> None:
    """Before: the reactor logged the exception and the agent waited for a reply it never asked for."""
    link = Link()
    with running(FlakyStore([]), lambda: StandIn(link, publish_raises=True)) as (_agent, fatal):
        assert fatal.done.wait(WAIT_S)
    ((reason, code),) = fatal.calls
    assert code == AGENT_FAILED_EXIT_CODE
    assert "the transport broke" in reason
    assert link.stopped == 1, "a stopped agent lets its connection go"


def test_a_transport_that_cannot_even_be_built_is_a_failed_connection_retried() -> None:
    link = Link()
    builds: list[int] = []

    def factory() -> StandIn:
        builds.append(1)
        if len(builds) < 3:
            raise FileNotFoundError("device.pem.crt")
        return StandIn(link)

    with running(FlakyStore([]), factory) as (_agent, fatal):
        assert link.wait(lambda: NEXT_GET in link.published)
    assert fatal.calls == []
    assert len(builds) == 3


# ----------------------------------------------------------------------------- re-synchronisation


def test_a_resumed_connection_asks_for_the_next_job_again() -> None:
    link = Link()
    with running(FlakyStore([]), lambda: StandIn(link)) as (agent, _fatal):
        assert link.wait(lambda: link.published == [ANNOUNCE, NEXT_GET])
        reply(link, Topics.accepted(NEXT_GET), {"timestamp": 1})
        assert eventually(lambda: agent.state.phase is m.Phase.IDLE)
        assert link.on_resumed is not None
        link.on_resumed(None)
        assert link.wait(lambda: link.published == [ANNOUNCE, NEXT_GET, NEXT_GET]), link.published
        assert link.started == 1, "a resumed connection is not a new one"


def test_a_resume_whose_subscriptions_could_not_be_restored_reconnects() -> None:
    link = Link()
    with running(FlakyStore([]), lambda: StandIn(link)) as (_agent, fatal):
        assert link.wait(lambda: link.started == 1)
        assert link.on_resumed is not None
        link.on_resumed("resubscribe refused for ['$aws/things/thing-1/jobs/notify-next']")
        assert link.wait(lambda: link.started == 2), "the agent must not go on without its subscriptions"
    assert link.stopped >= 1
    assert fatal.calls == []


def test_a_stale_connections_resume_is_ignored() -> None:
    link = Link()
    with running(FlakyStore([]), lambda: StandIn(link)) as (_agent, _fatal):
        assert link.wait(lambda: link.started == 1)
        stale = link.on_resumed
        assert stale is not None
        stale("refused")  # -> reconnect: connection 2
        assert link.wait(lambda: link.started == 2 and link.published.count(NEXT_GET) == 2)
        stale(None)  # the first connection's late callback
        time.sleep(0.2)  # nothing to wait for: the absence of a publish is the point
        assert link.published.count(NEXT_GET) == 2


def test_the_periodic_resync_asks_while_idle() -> None:
    link = Link()
    with running(FlakyStore([]), lambda: StandIn(link), resync_interval_s=0.05) as (agent, _fatal):
        assert link.wait(lambda: link.published == [ANNOUNCE, NEXT_GET])
        reply(link, Topics.accepted(NEXT_GET), {"timestamp": 1})
        assert link.wait(lambda: link.published.count(NEXT_GET) >= 2)
        reply(link, Topics.accepted(NEXT_GET), {"timestamp": 2})
        assert link.wait(lambda: link.published.count(NEXT_GET) >= 3)
        assert link.published.count(ANNOUNCE) == 1  # announced per connection, not per resync
        assert agent.failure is None
