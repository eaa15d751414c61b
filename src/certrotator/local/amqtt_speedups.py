"""PERF: process-wide changes to amqtt 0.12.1 and asyncio that make the local broker cheaper per
connection. `install()` applies them; `amqtt_fixes` calls it when the broker is imported (the local broker
is this process's only amqtt user and its only asyncio TLS server). Measurements: docs/performance.md.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto

from amqtt.session import Session
from transitions import MachineError

# asyncio gives every TLS connection a 256 KB read buffer (see install()); a TLS record carries at most
# 16 KB, so 32 KB reads lose nothing for the protocol's small messages.
TLS_READ_BUFFER_BYTES = 32 * 1024


class SessionStates:
    """PERF: amqtt gives every Session its own `transitions.Machine` (new / connected / disconnected):
    building it took ~13% of the engine's CPU in a 1,000-device rotation (each rotation reconnects), and
    each trigger goes through the library's generic dispatch. This is the same three-state machine
    with the same interface amqtt and we use (`state`, `connect()`, `disconnect()`, `is_<state>()`,
    MachineError on a connect while connected) and the same enter callbacks."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> bool:
        if self.state == "connected":
            raise MachineError("Can't trigger event connect from state connected!")
        self.state = "connected"
        self._session._on_enter_connected()
        return True

    def disconnect(self) -> bool:
        self.state = "disconnected"  # allowed from every state, as in amqtt's machine
        self._session._on_enter_disconnected()
        return True

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"


def _init_session_states(session: Session) -> None:
    session.transitions = SessionStates(session)


def install() -> None:
    """Every Session is created inside amqtt (BrokerProtocolHandler.init_from_connect), so the class is
    where the cheaper state machine goes in.

    asyncio's 256 KB TLS read buffer is zero-filled when a connection is accepted: ~0.2-1 ms of the
    engine's CPU per (re)connection and 256 KB of RSS per connected device, most of the broker's memory
    per device. A large message (up to MAX_PAYLOAD_BYTES) takes a few 32 KB reads instead."""
    Session._init_states = _init_session_states
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER_BYTES  # type: ignore[attr-defined]  # not in typeshed
