"""What the agent needs from its connection to AWS IoT Core (or the local IoT Core)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

OnMessage = Callable[[str, bytes], None]
OnReady = Callable[[str | None], None]  # None once subscribed; else why connecting/subscribing failed
# The connection dropped and came back by itself (same credentials): None once the subscriptions are
# in place again; else why restoring them failed.
OnResumed = Callable[[str | None], None]


class Transport(Protocol):
    def start(self, on_message: OnMessage, on_ready: OnReady, on_resumed: OnResumed) -> None:
        """Connect with the credentials in place now and subscribe to the device's topics.
        Non-blocking: the outcome arrives through `on_ready` (on any thread). Later, every time the
        transport reconnects by itself, `on_resumed` (the agent re-synchronises then); a transport that
        cannot see its connection never calls it (see AgentSettings.resync_interval_s)."""
        ...

    def publish(self, topic: str, payload: bytes) -> None: ...

    def stop(self) -> None:
        """Disconnect (non-blocking). A stopped transport is not started again: make a new one."""
        ...
