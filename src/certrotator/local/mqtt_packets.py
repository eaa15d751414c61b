"""FIX: MQTT framing held to each packet's header for the local broker's connected clients
(`PacketReader`), and amqtt's reader loop patched to use it (`install`).

MQTT-4.8.0-1 and AWS IoT close a connection that breaks MQTT's framing; amqtt 0.12.1 reads on. See
PacketReader for what amqtt does and what we check. Regression tests: tests/local/test_hostile_packets.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final, Protocol

import amqtt.mqtt.protocol.handler as amqtt_handler
from amqtt.adapters import ReaderAdapter
from amqtt.errors import MQTTError
from amqtt.mqtt import packet_class
from amqtt.mqtt.packet import (
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)

from certrotator.local.policy import Connection
from certrotator.protocol import MAX_PAYLOAD_BYTES

log = logging.getLogger("certrotator.local.broker")

# What a client may send once connected (MQTT 3.1.1 §2.2.1): a second CONNECT, a server's packet or a
# reserved type is a protocol violation, and so is anything longer than the largest PUBLISH we accept.
CLIENT_PACKET_TYPES: Final = frozenset(
    {PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT}
)
MAX_PACKET_BYTES: Final = MAX_PAYLOAD_BYTES + 2 + 65_535 + 2  # payload, longest topic, packet id


class MalformedPacket(Exception):
    """A packet that breaks MQTT's framing; its connection has been closed (not an MQTTError, which
    amqtt's reader loop answers by skipping the packet and reading on)."""


class PacketOwner(Protocol):
    """The connection a PacketReader reads for (the broker's GuardedHandler): kicked on a breach."""

    @property
    def connection(self) -> Connection | None: ...
    @property
    def kicked(self) -> bool: ...
    def kick(self) -> None: ...


class PacketReader(ReaderAdapter):  # type: ignore[misc]
    """FIX: amqtt frames a connected client's packets loosely. It reads whatever length a header
    announces (a PUBLISH "of 256 MB" is buffered before any size check), waits for a body without a
    time limit (a client that sends half a packet holds its connection forever: the keep-alive covers
    only the next header), and on a malformed packet (bad remaining length, wildcard PUBLISH topic)
    skips it and parses the following bytes as packets. MQTT-4.8.0-1 and AWS IoT close the connection.

    This reader holds each packet to its header: the length and type are checked before the body is
    read, the body must arrive within the keep-alive and may not read past its own length, and the
    next header may not start before the body is used up. Any breach kicks the connection.
    Regression tests: tests/local/test_hostile_packets.py."""

    def __init__(self, inner: ReaderAdapter, handler: PacketOwner, body_timeout: float) -> None:
        self._inner, self._handler, self._body_timeout = inner, handler, body_timeout
        self._left: int | None = None  # bytes of the current packet's body not read yet; None: a header
        self._deadline: asyncio.TimerHandle | None = None

    def _malformed(self, reason: str) -> MalformedPacket:
        self.close()
        connection = self._handler.connection
        log.warning(
            "disconnecting %s: malformed packet: %s", connection.client_id if connection else "?", reason
        )
        self._handler.kick()
        return MalformedPacket(reason)

    async def read(self, n: int = -1) -> bytes:
        left = self._left
        if left is not None:
            if n < 0 or n > left:
                raise self._malformed(f"a field of {n} bytes in a packet with {left} bytes left")
            self._left = left - n
            if self._left == 0 and self._deadline is not None:
                self._deadline.cancel()
        data: bytes = await self._inner.read(n)
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    async def next_header(self) -> MQTTFixedHeader | None:
        if self._left:
            raise self._malformed(f"{self._left} bytes of the previous packet were not part of it")
        self._left = None
        try:
            header: MQTTFixedHeader | None = await MQTTFixedHeader.from_stream(self._inner)
        except MQTTError as exc:
            raise self._malformed(str(exc)) from None
        if header is None:
            return None
        if header.packet_type not in CLIENT_PACKET_TYPES:
            raise self._malformed(f"packet type {header.packet_type} from a connected client")
        if header.remaining_length > MAX_PACKET_BYTES:
            raise self._malformed(f"a packet of {header.remaining_length} bytes (at most {MAX_PACKET_BYTES})")
        self._left = header.remaining_length
        if self._left:
            self._deadline = asyncio.get_running_loop().call_later(self._body_timeout, self._too_slow)
        return header

    def close(self) -> None:
        """The connection has ended: no deadline may outlive it (it would keep the handler alive)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        if self._left and not self._handler.kicked:
            self._malformed(
                f"the rest of a packet ({self._left} bytes) did not come in {self._body_timeout:g} s"
            )


class _FramedFixedHeader(MQTTFixedHeader):  # type: ignore[misc]
    @classmethod
    async def from_stream(cls, reader: ReaderAdapter) -> MQTTFixedHeader | None:
        if isinstance(reader, PacketReader):
            return await reader.next_header()
        return await MQTTFixedHeader.from_stream(reader)


class _StrictPacket:
    """A packet class whose decoding errors close the connection (see PacketReader)."""

    def __init__(self, packet: Any) -> None:
        self._packet = packet

    async def from_stream(self, reader: ReaderAdapter, fixed_header: MQTTFixedHeader) -> Any:
        try:
            return await self._packet.from_stream(reader, fixed_header=fixed_header)
        except MQTTError as exc:
            if isinstance(reader, PacketReader):
                raise reader._malformed(str(exc)) from None
            raise


def install() -> None:
    """Frame every connection's packets through PacketReader: amqtt's reader loop finds both names in
    its module's globals; readers other than PacketReader (amqtt's own client, should anything in this
    process use it) behave as before. `amqtt_fixes` calls this when the broker is imported."""
    amqtt_handler.MQTTFixedHeader = _FramedFixedHeader
    amqtt_handler.packet_class = lambda fixed_header: _StrictPacket(packet_class(fixed_header))
