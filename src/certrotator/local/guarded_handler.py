"""amqtt's per-connection protocol handler for the local broker (`GuardedHandler`): bound to its own
TLS connection's identity, closable from the broker side, and checking each PUBLISH before it is
acknowledged. FIX markers as in `amqtt_fixes`; regression tests in tests/local/test_broker.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket

from certrotator.local.mqtt_packets import PacketReader
from certrotator.local.policy import Connection
from certrotator.protocol import MAX_PAYLOAD_BYTES

log = logging.getLogger("certrotator.local.broker")


class PublishGate(Protocol):
    """What a handler asks its broker (amqtt_fixes.GuardedBroker) about a client's PUBLISH."""

    def may_publish(self, connection: Connection, topic: str) -> bool: ...
    def client_published(self, connection: Connection, topic: str, data: bytes, qos: int) -> None: ...


class GuardedHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's per-connection protocol handler, bound to the identity of its own TLS connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection: Connection | None = None
        self.broker: PublishGate | None = None
        self.kicked = False
        self.finished = asyncio.Event()
        self.packets: PacketReader | None = None  # the reader once connected

    def kick(self) -> None:
        """Close this connection from the broker side now (FIX: amqtt 0.12.1 has no API for it).

        Resolving the disconnect waiter makes the broker's client loop run its normal disconnect path;
        aborting the transport makes sure a peer that stopped reading cannot hold the close up.
        """
        self.kicked = True
        waiter = self._disconnect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        stream = getattr(self.writer, "_writer", None)  # StreamWriterAdapter's asyncio.StreamWriter
        transport = getattr(stream, "transport", None)
        if transport is not None:
            transport.abort()

    def handle_read_timeout(self) -> None:
        # FIX: amqtt's broker handler ignores keep-alive expiry, so a vanished client stays "connected"
        # forever. The read timeout is 1.5 × the client's keep-alive (set in _resolve_session), MQTT-3.1.2-24.
        self.kick()

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        """FIX 5 + PERF: check the policy *before* acknowledging, and deliver straight from here.

        amqtt PUBACKs a QoS 1 PUBLISH first and checks the ACL later in the broker, silently dropping a
        denied message while the client believes it was delivered. AWS IoT disconnects the client, and
        so do we, before any PUBACK. Delivering from the handler (instead of amqtt's session queue and
        broker loop) also ties each message to the connection that carried it (see FIX 3).
        """
        broker, connection = self.broker, self.connection
        if self.kicked or broker is None or connection is None:
            return
        topic, data, qos = publish_packet.topic_name, publish_packet.data, publish_packet.qos
        if topic is None or data is None:
            return
        if qos not in (0, 1) or len(data) > MAX_PAYLOAD_BYTES or not broker.may_publish(connection, topic):
            log.warning(
                "disconnecting %s (thing %s): PUBLISH to %r at QoS %s with %d bytes is not allowed",
                connection.client_id,
                connection.thing,
                topic,
                qos,
                len(data),
            )
            self.kick()
            return
        broker.client_published(connection, topic, bytes(data), qos)
        if qos == 1 and publish_packet.variable_header is not None:
            await self._send_packet(PubackPacket.build(publish_packet.variable_header.packet_id))
