"""The agent: the imperative shell around the pure state machine.

It feeds events (messages, timeouts, connection outcomes, key-store failures) to `machine.transition`
and carries out the actions against a transport and a key store. Everything runs on one reactor
thread; several agents may share one reactor.

Never stuck: a start-up that fails is retried or ends the agent (`certrotator.device.startup`), and an
unexpected error in any of the agent's callbacks ends it too, through `on_fatal` (the runtimes exit
non-zero, so systemd or the nucleus restarts the process, and start-up recovery finishes or undoes
whatever credential step was under way). An agent never waits on in a state nothing will change.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from certrotator.algorithms import KeyAlgorithm, SigningAlgorithm
from certrotator.device import machine as m
from certrotator.device.journal import atomic_write, remove
from certrotator.device.keystores.base import KeyStore, KeyStoreError
from certrotator.device.reactor import Reactor, TimerHandle
from certrotator.device.startup import (
    AGENT_FAILED_EXIT_CODE,
    STARTUP_FAILED_EXIT_CODE,
    StartupRetry,
    is_transient,
    retry_delay,
)
from certrotator.device.transport import Transport
from certrotator.protocol import CreateCertificateRequest, Topics, encode

log = logging.getLogger("certrotator.device")


@dataclass(frozen=True, slots=True)
class AgentSettings:
    thing: str
    key_algorithm: KeyAlgorithm
    signing_algorithm: SigningAlgorithm
    state_timeout_s: float = 30.0
    # Reconnect back-off after a connection failure that is not part of a rotation.
    retry_min_s: float = 1.0
    retry_max_s: float = 60.0
    # Start-up (key store recovery) retries of failures that may pass by themselves.
    startup: StartupRetry = field(default_factory=StartupRetry)
    # Ask $next/get this often while idle (None: never), for a transport that cannot see its
    # connection's drops and reconnects (Greengrass IPC). A direct connection re-synchronises on every
    # reconnect instead. Jittered by +-20% so that a fleet does not ask in step.
    resync_interval_s: float | None = None


# Observers see every transition (the fleet simulator and tests use this; the CLI logs it).
Observer = Callable[[m.State, m.Event, list[m.Action]], None]
# Called once when the agent gives up: the reason and the exit status the process should end with.
OnFatal = Callable[[str, int], None]


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        store: KeyStore,
        transport_factory: Callable[[], Transport],
        reactor: Reactor,
        restart: Callable[[str], bool] | None = None,
        observer: Observer | None = None,
        commit_marker: Path | None = None,
        on_fatal: OnFatal | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.transport_factory = transport_factory
        self.reactor = reactor
        # Greengrass: restart = exit so the nucleus restarts (returns True). Standalone: reconnect here.
        self.restart_hook = restart
        self.observer = observer
        # Names the job whose new pair was committed, until the cloud has settled it (see Started).
        self.commit_marker = commit_marker
        self.on_fatal = on_fatal
        self.state = m.initial(
            settings.thing, settings.key_algorithm, settings.signing_algorithm, settings.state_timeout_s
        )
        self.transport: Transport | None = None
        self._connection = 0  # which start() the transport callbacks belong to
        self._subscribed = 0  # the connection whose Started the machine has seen
        self._state_timer: TimerHandle | None = None
        self._connect_timer: TimerHandle | None = None
        self._resync_timer: TimerHandle | None = None
        self._retry_s = settings.retry_min_s
        self._boot_failures = 0
        self.stopped = False
        self.failure: str | None = None  # why the agent gave up, once it has

    # ---------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._submit(self._boot)

    def stop(self) -> None:
        self.reactor.submit(self._shutdown)

    def reconfigure(
        self, key_algorithm: KeyAlgorithm, signing_algorithm: SigningAlgorithm, timeout_s: float
    ) -> None:
        """Apply a validated configuration change (takes effect for the next rotation)."""
        self._submit(lambda: self.feed(m.ConfigChanged(key_algorithm, signing_algorithm, timeout_s)))

    def _boot(self) -> None:
        if self.stopped:
            return
        try:
            self.store.recover()  # finish or undo a credential change a power cut interrupted
            has_backup = self.store.has_backup()
        except Exception as exc:
            self._boot_failed(exc)
            return
        if self._boot_failures:
            log.info("%s: start-up succeeded after %d failed tries", self.settings.thing, self._boot_failures)
        self.state = replace(self.state, has_backup=has_backup)
        self._connect()

    def _boot_failed(self, error: Exception) -> None:
        self._boot_failures += 1
        policy, tries = self.settings.startup, self._boot_failures
        reason = f"{type(error).__name__}: {error}"
        delay = retry_delay(policy, tries, error, random.random())
        if delay is None:
            why = f"still failing after {tries} tries" if is_transient(error) else "not an error that passes"
            self._fatal(f"start-up failed ({why}): {reason}", STARTUP_FAILED_EXIT_CODE)
            return
        log.warning(
            "%s: start-up failed (try %d of %d), retrying in %.2f s: %s",
            self.settings.thing,
            tries,
            policy.attempts,
            delay,
            reason,
        )
        self._later(delay, self._boot)

    def _fatal(self, reason: str, exit_code: int) -> None:
        """Give up: stop, and let the process end (on_fatal) so that it is restarted from scratch."""
        if self.failure is not None:
            return
        self.failure = reason
        log.error("%s: agent stopped: %s", self.settings.thing, reason)
        self._shutdown()
        if self.on_fatal is not None:
            self.on_fatal(reason, exit_code)

    def _guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        """`fn` for the reactor: an exception ends the agent instead of leaving it waiting for an event
        that the failed callback would have caused."""

        def run() -> None:
            if self.failure is not None:
                return
            try:
                fn()
            except Exception as exc:
                log.exception("%s: unexpected error in the agent", self.settings.thing)
                self._fatal(f"unexpected error: {type(exc).__name__}: {exc}", AGENT_FAILED_EXIT_CODE)

        return run

    def _submit(self, fn: Callable[[], None]) -> None:
        self.reactor.submit(self._guarded(fn))

    def _later(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        return self.reactor.call_later(delay, self._guarded(fn))

    def _shutdown(self) -> None:
        self.stopped = True
        self._cancel_timers()
        if self.transport is not None:
            self.transport.stop()
            self.transport = None

    def _connect(self) -> None:
        if self.stopped:
            return
        self._connection += 1
        connection = self._connection
        # A connect or subscribe that hangs instead of failing counts as a failure (seed #21).
        self._connect_timer = self._later(
            self.settings.state_timeout_s,
            lambda: self._ready(connection, f"no connection within {self.settings.state_timeout_s:g} s"),
        )
        try:
            self.transport = self.transport_factory()
            self.transport.start(
                on_message=lambda topic, payload: self._submit(
                    lambda: self._message(connection, topic, payload)
                ),
                on_ready=lambda error: self._submit(lambda: self._ready(connection, error)),
                on_resumed=lambda error: self._submit(lambda: self._resumed(connection, error)),
            )
        except Exception as exc:  # e.g. credentials that cannot even be loaded: a failed connection
            self._ready(connection, f"cannot start the connection: {type(exc).__name__}: {exc}")

    def _ready(self, connection: int, error: str | None) -> None:
        if connection != self._connection or self.stopped or self._connect_timer is None:
            return  # a stale callback of an earlier connection, or already decided
        self._connect_timer.cancel()
        self._connect_timer = None
        if error is None:
            log.info("%s: connected and subscribed", self.settings.thing)
            self._retry_s = self.settings.retry_min_s
            self._subscribed = connection
            self._arm_resync()
            self.feed(m.Started(self.store.has_backup(), self._committed_job()))
        else:
            log.warning("%s: connection failed: %s", self.settings.thing, error)
            self.feed(m.ConnectFailed(error))

    def _message(self, connection: int, topic: str, payload: bytes) -> None:
        # Messages that beat the subscription's completion to the reactor are dropped: the machine
        # must see Started first (it asks $next/get then, so nothing is lost). Otherwise a notify-next
        # taken before Started makes the get reply look like a rotation interrupted by a restart.
        if connection == self._subscribed == self._connection and not self.stopped:
            self.feed(m.Message(topic, payload))

    def _resumed(self, connection: int, error: str | None) -> None:
        """The transport reconnected by itself (same credentials) and restored its subscriptions: the
        machine asks $next/get again, since whatever was sent meanwhile may be lost."""
        if not connection == self._subscribed == self._connection or self.stopped:
            return  # an earlier connection's, or before the first Started (which asks anyway)
        if error is not None:
            log.warning(
                "%s: reconnected, but restoring the subscriptions failed: %s", self.settings.thing, error
            )
            self.feed(m.ConnectFailed(f"resubscribing after a reconnect failed: {error}"))
            return
        log.info("%s: connection resumed: re-synchronising", self.settings.thing)
        self.feed(m.ConnectionResumed(self._committed_job()))

    def _arm_resync(self) -> None:
        interval = self.settings.resync_interval_s
        if interval is None or self.stopped:
            return
        if self._resync_timer is not None:
            self._resync_timer.cancel()
        connection = self._connection

        def due() -> None:
            self._resync_timer = None
            if connection == self._subscribed == self._connection and not self.stopped:
                self.feed(m.ResyncDue(self._committed_job()))
                self._arm_resync()

        self._resync_timer = self._later(interval * random.uniform(0.8, 1.2), due)

    # ------------------------------------------------------------------------------ machine

    def feed(self, event: m.Event) -> None:
        state, actions = m.transition(self.state, event)
        previous, self.state = self.state, state
        if self.observer is not None:
            self.observer(previous, event, actions)
        for action in actions:
            failure = self._perform(action)
            if failure is not None:
                # The rest of this batch (e.g. the restart after an install) must not happen.
                self.feed(m.StoreFailed(failure))
                return

    def _perform(self, action: m.Action) -> str | None:
        """Carry out one action; returns a failure reason for key-store steps that failed."""
        if isinstance(action, m.Publish):
            self._publish(action.topic, encode(action.message))
        elif isinstance(action, m.ArmTimer):
            if self._state_timer is not None:
                self._state_timer.cancel()
            epoch = action.epoch
            self._state_timer = self._later(action.seconds, lambda: self.feed(m.Timeout(epoch)))
        elif isinstance(action, m.RequestCertificate):
            try:
                csr = self.store.prepare(action.job_id, action.key_algorithm, action.signing_algorithm)
            except (KeyStoreError, ValueError) as exc:
                return f"generating the new key failed: {exc}"
            request = CreateCertificateRequest(action.job_id, csr)
            self._publish(Topics.create(self.settings.thing), encode(request.to_payload()))
        elif isinstance(action, m.InstallCertificate):
            try:
                self.store.install(action.job_id, action.certificate_pem)
            except (KeyStoreError, OSError) as exc:
                return f"installing the new certificate failed: {exc}"
        elif isinstance(action, m.DiscardPreparedKey):
            self.store.discard_prepared()
        elif isinstance(action, m.RollBack):
            self.store.rollback()
        elif isinstance(action, m.DeleteBackup):
            if action.job_id is not None and self.commit_marker is not None:
                # Written before the backup goes: after a crash in between, the journal still shows the
                # backup and the commit is simply redone; after it, the marker proves the commit.
                atomic_write(self.commit_marker, action.job_id.encode(), 0o600)
            self.store.commit()
        elif isinstance(action, m.ForgetCommitted):
            if self.commit_marker is not None:
                remove(self.commit_marker)
        elif isinstance(action, m.Restart):
            self._restart(action)
        return None

    def _committed_job(self) -> str | None:
        if self.commit_marker is None:
            return None
        try:
            return self.commit_marker.read_text().strip() or None
        except FileNotFoundError:
            return None

    def _publish(self, topic: str, payload: bytes) -> None:
        if self.transport is not None:
            self.transport.publish(topic, payload)

    def _restart(self, action: m.Restart) -> None:
        log.info("%s: restarting: %s", self.settings.thing, action.reason)
        if self.restart_hook is not None and self.restart_hook(action.reason):
            return
        self._cancel_timers()
        if self.transport is not None:
            self.transport.stop()
            self.transport = None
        delay = 0.0
        if action.backoff:
            delay = self._retry_s * random.uniform(0.8, 1.2)  # jitter: a fleet must not reconnect in step
            self._retry_s = min(self._retry_s * 2, self.settings.retry_max_s)
        self._later(delay, self._connect)

    def _cancel_timers(self) -> None:
        for timer in (self._state_timer, self._connect_timer, self._resync_timer):
            if timer is not None:
                timer.cancel()
        self._state_timer = self._connect_timer = self._resync_timer = None
