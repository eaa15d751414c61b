"""amqtt 0.12.1 made safe and fast enough for the local IoT Core: one subclass of its broker, one of its
protocol handler. Nothing here is imported outside `local.broker`.

Every departure from amqtt is one method marked `FIX n` (the defects in the local IoT Core issue, each
with a regression test in tests/local/test_broker.py), `FIX` (further defects found reading the code),
or `PERF`. The overridden methods are private to amqtt, hence the exact pin; the regression tests
exercise behaviour over real TLS, so an upgrade that breaks a fix fails them.

We load no amqtt plugins: authentication and topic checks call our `ConnectionAuthorizer` directly.
That also removes amqtt's plugin dispatch (several tasks per check) and its habit of logging plugin
exceptions only at DEBUG.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import math
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any, Final

import amqtt.mqtt.protocol.handler as amqtt_handler
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
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
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session
from transitions import MachineError

from certrotator.crypto import certificate_id_from_der
from certrotator.local.policy import Connection, ConnectionAuthorizer, TopicAction
from certrotator.local.topic_tree import SubscriptionIndex, valid_topic_filter, valid_topic_name
from certrotator.protocol import MAX_PAYLOAD_BYTES

log = logging.getLogger("certrotator.local.broker")

# AWS IoT speaks QoS 0 and 1 only: subscriptions are granted at most 1, a QoS 2 PUBLISH disconnects.
MAX_QOS: Final = 1
SUBACK_FAILURE: Final = 0x80
# AWS IoT's quota of subscriptions per connection: a SUBSCRIBE beyond it gets failure (0x80) per filter.
# Counted per client id, over the filters its session holds (a resumed session keeps its filters).
MAX_SUBSCRIPTIONS_PER_CONNECTION: Final = 50
# A TLS client that never sends CONNECT is dropped after this (amqtt waits forever).
CONNECT_TIMEOUT: Final = 10.0
# How long a takeover waits for the previous connection of the client id to finish closing.
TAKEOVER_TIMEOUT: Final = 5.0
# QoS 1 messages kept for an offline persistent session (amqtt's queue is unbounded).
MAX_OFFLINE_MESSAGES: Final = 100
CONNECTION_ATTRIBUTE: Final = "certrotator.connection"

ClientPublishHook = Callable[[str, bytes, Connection], None]
# Told which topic filters a connection now holds: those a SUBACK just granted, and those a resumed
# persistent session brought back (no SUBSCRIBE is sent for them). Runs on the broker's loop, after the
# SUBACK / CONNACK went out, so what the hook sends reaches a client that is already subscribed.
SubscribedHook = Callable[[Connection, list[str]], None]


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


# Every Session is created inside amqtt (BrokerProtocolHandler.init_from_connect), so the class is
# where the cheaper state machine goes in; only the local broker imports this module.
Session._init_states = _init_session_states

# PERF: asyncio gives every TLS connection a 256 KB read buffer, zero-filled when the connection is
# accepted: ~0.2-1 ms of the engine's CPU per (re)connection and 256 KB of RSS per connected device,
# most of the broker's memory per device. A TLS record carries at most 16 KB, so 32 KB reads lose
# nothing for the protocol's small messages; a large one (up to MAX_PAYLOAD_BYTES) takes a few reads.
# Process-wide, like the Session change: the local broker is this process's only asyncio TLS server.
asyncio.sslproto.SSLProtocol.max_size = 32 * 1024  # type: ignore[attr-defined]  # not in typeshed


# What a client may send once connected (MQTT 3.1.1 §2.2.1): a second CONNECT, a server's packet or a
# reserved type is a protocol violation, and so is anything longer than the largest PUBLISH we accept.
CLIENT_PACKET_TYPES: Final = frozenset(
    {PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT}
)
MAX_PACKET_BYTES: Final = MAX_PAYLOAD_BYTES + 2 + 65_535 + 2  # payload, longest topic, packet id


class MalformedPacket(Exception):
    """A packet that breaks MQTT's framing; its connection has been closed (not an MQTTError, which
    amqtt's reader loop answers by skipping the packet and reading on)."""


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

    def __init__(self, inner: ReaderAdapter, handler: GuardedHandler, body_timeout: float) -> None:
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


# amqtt's reader loop finds both through its module's globals; readers other than PacketReader (amqtt's
# own client, should anything in this process use it) behave as before.
amqtt_handler.MQTTFixedHeader = _FramedFixedHeader
amqtt_handler.packet_class = lambda fixed_header: _StrictPacket(packet_class(fixed_header))


class GuardedHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's per-connection protocol handler, bound to the identity of its own TLS connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection: Connection | None = None
        self.broker: GuardedBroker | None = None
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


class GuardedBroker(Broker):  # type: ignore[misc]
    def __init__(
        self,
        config: dict[str, Any],
        authorizer: ConnectionAuthorizer,
        on_client_publish: ClientPublishHook,
        on_subscribed: SubscribedHook | None = None,
    ) -> None:
        super().__init__(config)
        self._authorizer = authorizer
        self._on_client_publish = on_client_publish
        self._on_subscribed = on_subscribed
        self.index: SubscriptionIndex[Session] = SubscriptionIndex(self._subscriptions)
        self._live: dict[str, set[GuardedHandler]] = {}  # principal -> its live connections
        self._client_locks = _KeyedLocks()
        self._deliveries: set[asyncio.Future[Any]] = set()
        self._client_tasks: set[asyncio.Task[Any]] = set()

    # --------------------------------------------------------------------------------------- TLS

    @staticmethod
    def _create_ssl_context(listener: ListenerConfig) -> ssl.SSLContext:
        context: ssl.SSLContext = Broker._create_ssl_context(listener)
        # FIX 1: amqtt hard-codes CERT_OPTIONAL, so a client without a certificate completes the TLS
        # handshake. Identity here *is* the client certificate: require one, signed by a trusted issuer.
        context.verify_mode = ssl.CERT_REQUIRED
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.num_tickets = 0  # MQTT clients here never resume TLS sessions: tickets are wasted work
        return context

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        """FIX: a TCP connection that never completes its TLS handshake held its socket for asyncio's
        default 60 s (no certificate needed for that); it gets the CONNECT timeout, like a TLS
        connection that never sends CONNECT. Regression test: tests/local/test_hostile_packets.py."""
        if listener_type is not ListenerType.TCP or ssl_context is None:
            return await super()._create_server_instance(
                listener_name, listener_type, address, port, ssl_context
            )
        return await asyncio.start_server(
            partial(self.stream_connected, listener_name=listener_name),
            address,
            port,
            reuse_address=True,
            ssl=ssl_context,
            ssl_handshake_timeout=CONNECT_TIMEOUT,
        )

    # ------------------------------------------------------------------------------- connections

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        """Replaces amqtt's connection lifecycle (FIX 2, FIX 3 and the takeover below)."""
        server = self._servers.get(listener_name)
        if server is None:
            raise BrokerError(f"Invalid listener name {listener_name!r}")
        task = asyncio.current_task()
        if task is not None:
            self._client_tasks.add(task)
        await server.acquire_connection()
        handler: GuardedHandler | None = None
        session: Session | None = None
        try:
            received = await self._read_connect(reader, writer)
            if received is None:
                return
            # FIX 2: authenticate *before* any session is looked up, taken over or deleted. amqtt
            # resolves (for clean_session: deletes) the client id's session first, runs the auth plugins
            # afterwards, and registers even a refused connection in its session table.
            connection = self._authenticate(writer, received[1])
            if connection is None:
                await _refuse(writer)
                return
            handler = received[0]
            handler.connection, handler.broker = connection, self
            # Registered before the next await, so a disconnect(principal) racing with this connect sees it.
            self._live.setdefault(connection.principal, set()).add(handler)
            async with self._client_locks.hold(connection.client_id):  # one connect at a time per client id
                session = await self._resolve_session(received[1], connection)
                body_timeout = float(session.keep_alive) if session.keep_alive > 0 else CONNECT_TIMEOUT
                handler.packets = PacketReader(reader, handler, body_timeout)
                handler.attach(session, handler.packets, writer)
                session.transitions.connect()
                self._sessions[connection.client_id] = (session, handler)
            await handler.mqtt_connack_authorize(True)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id, client_session=session
            )
            await handler.start()
            if handler.kicked:  # kicked before start() created the disconnect waiter
                handler.kick()
            await self._publish_session_retained_messages(session)  # QoS 1 queued while offline
            if session.parent == 1:  # a resumed persistent session: its filters came back without SUBSCRIBE
                self._subscribed(connection, sorted(self.index.filters_of(connection.client_id)))
            await self._client_message_loop(session, handler)
        except (OSError, EOFError, AMQTTError, MQTTError, NoDataError) as exc:
            log.info("connection %s ended: %r", handler.connection if handler else "(unauthenticated)", exc)
        except Exception:
            log.exception("connection %s failed", handler.connection if handler else "(unauthenticated)")
        finally:
            if handler is not None:
                await self._finish(handler, session)
            await _close_quietly(writer)  # a no-op if the handler already closed it
            server.release_connection()
            if task is not None:
                self._client_tasks.discard(task)

    async def _read_connect(
        self, reader: ReaderAdapter, writer: WriterAdapter
    ) -> tuple[GuardedHandler, Session] | None:
        try:
            handler, incoming = await asyncio.wait_for(
                GuardedHandler.init_from_connect(reader, writer, self.plugins_manager, loop=self._loop),
                CONNECT_TIMEOUT,
            )
        except Exception as exc:  # no CONNECT in time, a malformed one, or one amqtt already answered
            log.info("dropping a connection without a valid CONNECT: %r", exc)
            await _close_quietly(writer)
            return None
        return handler, incoming

    def _authenticate(self, writer: WriterAdapter, incoming: Session) -> Connection | None:
        ssl_object = writer.get_ssl_info()
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:  # impossible with CERT_REQUIRED; never trust that alone
            return None
        principal = certificate_id_from_der(der)
        client_id = str(incoming.client_id or "")
        try:
            thing = self._authorizer.authorize_connect(client_id, principal)
        except Exception:
            log.exception("authorize_connect failed for client %r", client_id)
            return None
        if thing is None:
            log.info("refused client %r with certificate %s", client_id, principal)
            return None
        # FIX: amqtt broadcasts a will message without any topic check. Check it now, as a publish.
        if incoming.will_flag and not self._may(thing, str(incoming.will_topic or ""), "publish"):
            log.info("refused client %r: will topic %r not allowed", client_id, incoming.will_topic)
            return None
        return Connection(client_id=client_id, principal=principal, thing=thing)

    async def _resolve_session(self, incoming: Session, connection: Connection) -> Session:
        client_id = connection.client_id
        existing = self._sessions.get(client_id)
        if existing is not None and existing[0].transitions.state == "connected":
            await self._take_over(existing[0], existing[1])
        if incoming.clean_session:
            await self._delete_session(client_id)
            session = incoming
            session.parent = 0
        elif (existing := self._sessions.get(client_id)) is not None:
            # FIX 3: a resumed session (clean_session=0, awsiotsdk's default) keeps the *first*
            # connection's ssl_object in amqtt, so after a rotation the broker would still see the old
            # certificate. Take every connection-scoped field from this connection; identity also lives
            # on the handler (`handler.connection`), which is what message delivery uses.
            session = existing[0]
            for name in (
                "ssl_object",
                "remote_address",
                "remote_port",
                "username",
                "password",
                "keep_alive",
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
            ):
                setattr(session, name, getattr(incoming, name))
            session.parent = 1
        else:
            session = incoming
            session.parent = 0
        session.attributes[CONNECTION_ATTRIBUTE] = connection
        if session.keep_alive > 0:
            session.keep_alive = math.ceil(session.keep_alive * 1.5)  # MQTT-3.1.2-24
        return session

    async def _take_over(self, old_session: Session, old_handler: BrokerProtocolHandler) -> None:
        """FIX: a new connection with a connected client id closes the old one *and waits for it*.

        amqtt stops the old handler but lets its client loop run on, which later marks the shared
        session disconnected under the new connection (and, for clean sessions, leaves the old
        connection open and orphaned).
        """
        if isinstance(old_handler, GuardedHandler):
            old_handler.kick()
            try:
                await asyncio.wait_for(old_handler.finished.wait(), TAKEOVER_TIMEOUT)
            except TimeoutError:
                log.warning("previous connection of %s did not close in time", old_session.client_id)
        if old_session.transitions.state == "connected":
            old_session.transitions.disconnect()

    async def _client_message_loop(self, client_session: Session, handler: GuardedHandler) -> None:
        """PERF: amqtt's loop runs `logger.debug(repr(self._subscriptions))` after every SUBSCRIBE, which
        formats every subscription of every client even with DEBUG off (O(fleet) per SUBSCRIBE), and it
        waits on a delivery queue our handler never fills (see GuardedHandler.handle_publish)."""
        disconnect = asyncio.ensure_future(handler.wait_disconnect())
        subscribe = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        try:
            while True:
                done, _ = await asyncio.wait(
                    [disconnect, subscribe, unsubscribe], return_when=asyncio.FIRST_COMPLETED
                )
                if disconnect in done:
                    await self._handle_disconnect(client_session, handler, disconnect)
                    return
                if subscribe in done:
                    await self._handle_subscription(client_session, handler, subscribe)
                    subscribe = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe)
                    unsubscribe = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        finally:
            for waiter in (disconnect, subscribe, unsubscribe):
                waiter.cancel()
            await asyncio.gather(disconnect, subscribe, unsubscribe, return_exceptions=True)

    async def _handle_disconnect(self, client_session: Session, handler: Any, disconnect_waiter: Any) -> None:
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        # PERF: drop a clean session at once instead of in amqtt's once-a-second scan of all sessions.
        current = self._sessions.get(client_session.client_id)
        if client_session.clean_session and current is not None and current[1] is handler:
            await self._delete_session(client_session.client_id)

    async def _finish(self, handler: GuardedHandler, session: Session | None) -> None:
        """Whatever ended the connection: forget it, and never leave a session "connected" without it."""
        if handler.packets is not None:
            handler.packets.close()
        connection = handler.connection
        if connection is not None:
            live = self._live.get(connection.principal)
            if live is not None:
                live.discard(handler)
                if not live:
                    del self._live[connection.principal]
        if session is not None and session.transitions.state == "connected":
            current = self._sessions.get(session.client_id)
            if current is not None and current[1] is handler:
                await self._stop_handler(handler)
                session.transitions.disconnect()
                if session.clean_session:
                    await self._delete_session(session.client_id)
        handler.finished.set()

    def kick_principal(self, principal: str) -> list[GuardedHandler]:
        handlers = list(self._live.get(principal, ()))
        for handler in handlers:
            handler.kick()
        return handlers

    async def wait_closed(self, principal: str, timeout: float) -> bool:
        """Wait until `principal` has no live connection; False if some remain after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while handlers := list(self._live.get(principal, ())):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            waits = [asyncio.ensure_future(h.finished.wait()) for h in handlers]
            await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
        return True

    def connections(self) -> list[Connection]:
        return [h.connection for live in self._live.values() for h in live if h.connection and not h.kicked]

    async def wait_clients_closed(self, timeout: float) -> None:
        tasks = [t for t in self._client_tasks if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    # ----------------------------------------------------------------------------- subscriptions

    async def _handle_subscription(
        self, client_session: Session, handler: Any, subscribe_waiter: Any
    ) -> None:
        """Policy per filter, SUBACK failure (0x80) for a denied one; granted QoS at most 1.

        A new filter beyond the client's MAX_SUBSCRIPTIONS_PER_CONNECTION fails too, in packet order
        (the filters before it in the same SUBSCRIBE still succeed); subscribing again to a filter the
        client holds only updates its QoS (MQTT-3.8.4-3) and takes no room.

        Replaces amqtt's version, which also scanned every retained message per filter (we keep none).
        """
        subscription = subscribe_waiter.result()
        connection = handler.connection if isinstance(handler, GuardedHandler) else None
        client_id = client_session.client_id or ""
        held = self.index.count_of(client_id)
        codes: list[int] = []
        for topic_filter, qos in subscription.topics:
            if (
                connection is None
                or not valid_topic_filter(topic_filter)
                or not self._may(connection.thing, topic_filter, "subscribe")
            ):
                log.info("%s: subscription to %r denied", client_id, topic_filter)
                codes.append(SUBACK_FAILURE)
                continue
            if not self.index.holds(client_id, topic_filter):
                if held >= MAX_SUBSCRIPTIONS_PER_CONNECTION:
                    log.info(
                        "%s: subscription to %r refused: already %d subscriptions (AWS IoT's limit)",
                        client_id,
                        topic_filter,
                        held,
                    )
                    codes.append(SUBACK_FAILURE)
                    continue
                held += 1
            granted = min(qos, MAX_QOS)
            self.index.add(topic_filter, client_session, granted)
            codes.append(granted)
        await handler.mqtt_acknowledge_subscription(subscription.packet_id, codes)
        if connection is not None:
            filters = [
                f
                for (f, _qos), code in zip(subscription.topics, codes, strict=True)
                if code != SUBACK_FAILURE
            ]
            self._subscribed(connection, filters)

    def _subscribed(self, connection: Connection, filters: list[str]) -> None:
        if self._on_subscribed is None or not filters:
            return
        try:
            self._on_subscribed(connection, filters)
        except Exception:
            log.exception("subscription hook failed for %s", connection.client_id)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """In-process subscription (amqtt's BrokerContext); kept consistent with our index."""
        topic_filter, qos = subscription
        if not valid_topic_filter(topic_filter):
            return SUBACK_FAILURE
        self.index.add(topic_filter, session, min(qos, MAX_QOS))
        return min(qos, MAX_QOS)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        return self.index.remove(a_filter, session.client_id)

    async def _del_all_subscriptions(self, session: Session) -> None:
        # PERF: amqtt scans every filter of every client; the index knows the session's own.
        self.index.remove_all(session.client_id)

    # ---------------------------------------------------------------------------------- messages

    def may_publish(self, connection: Connection, topic: str) -> bool:
        return valid_topic_name(topic) and self._may(connection.thing, topic, "publish")

    def client_published(self, connection: Connection, topic: str, data: bytes, qos: int) -> None:
        # Retained PUBLISHes are delivered but not stored: the local IoT Core keeps no retained messages.
        self._on_client_publish(topic, data, connection)
        self.route(topic, data, qos)

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        # PERF: route at once instead of through amqtt's broadcast queue and loop (several tasks per
        # message). amqtt sends will messages and internal_message_broadcast() through here.
        if topic is not None:
            self.route(topic, bytes(data or b""), force_qos)

    def route(self, topic: str, data: bytes, qos: int | None) -> None:
        """Deliver to every subscriber: O(topic depth + matching subscribers), never O(fleet)."""
        for session, granted in self.index.match(topic).values():
            self._route_to(session, granted, topic, data, qos)

    def route_to(self, client_id: str, topic: str, data: bytes, qos: int | None) -> bool:
        """Deliver to one client, if it is subscribed to `topic` and may receive it; False if not."""
        match = self.index.match(topic).get(client_id)
        return match is not None and self._route_to(match[0], match[1], topic, data, qos)

    def _route_to(self, session: Session, granted: int, topic: str, data: bytes, qos: int | None) -> bool:
        # FIX 4: deliver at min(publish QoS, granted QoS). amqtt uses the subscription's QoS, so a
        # QoS 0 message reaches a QoS 1 subscriber at QoS 1 (and a forced QoS overrides the grant).
        delivery_qos = granted if qos is None else min(qos, granted)
        connection: Connection | None = session.attributes.get(CONNECTION_ATTRIBUTE)
        if connection is None or not self._may(connection.thing, topic, "receive"):
            return False
        if session.transitions.state != "connected":
            # MQTT-3.1.2-5: queue QoS 1 for an offline persistent session (bounded, unlike amqtt).
            queue = session.retained_messages
            if not session.clean_session and delivery_qos > 0 and queue.qsize() < MAX_OFFLINE_MESSAGES:
                queue.put_nowait(RetainedApplicationMessage(None, topic, data, delivery_qos))
                return True
            return False
        handler = self._sessions.get(session.client_id, (None, None))[1]
        if handler is None:
            return False
        self._deliver(handler, topic, data, delivery_qos)
        return True

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """FIX: amqtt sends the messages queued for an offline persistent session with RETAIN=1
        (MQTT-3.3.1-9 says 0: they match an established subscription) and holds the new connection's
        SUBSCRIBE/UNSUBSCRIBE handling until every one of them is acknowledged."""
        handler = self._sessions.get(session.client_id, (None, None))[1]
        queued = session.retained_messages
        while not queued.empty():
            message = queued.get_nowait()
            if handler is not None:
                self._deliver(handler, message.topic, bytes(message.data), message.qos)

    def _deliver(self, handler: BrokerProtocolHandler, topic: str, data: bytes, qos: int) -> None:
        delivery = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._delivery_done)

    def _delivery_done(self, delivery: asyncio.Future[Any]) -> None:
        self._deliveries.discard(delivery)
        if not delivery.cancelled() and (exc := delivery.exception()) is not None:
            # Typically the subscriber went away, or sent no PUBACK within amqtt's 5 s.
            log.info("delivery failed: %r", exc)

    def cancel_deliveries(self) -> None:
        for delivery in list(self._deliveries):
            delivery.cancel()

    def _may(self, thing: str, topic: str, action: TopicAction) -> bool:
        try:
            return bool(self._authorizer.authorize_topic(thing, topic, action))
        except Exception:
            log.exception("authorize_topic failed for %s %s %r", thing, action, topic)
            return False


class _KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]


async def _refuse(writer: WriterAdapter) -> None:
    with suppress(OSError):
        await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
    await _close_quietly(writer)


async def _close_quietly(writer: WriterAdapter) -> None:
    with suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.close(), 2.0)
