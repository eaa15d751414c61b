"""amqtt 0.12.1 made safe and fast enough for the local IoT Core: one subclass of its broker
(`GuardedBroker`: TLS, the connection lifecycle, takeovers), with its parts in modules of their own:
`guarded_handler` (one connection's protocol handler), `amqtt_routing` (subscriptions and delivery),
`mqtt_packets` (packet framing) and `amqtt_speedups` (process-wide PERF changes). Nothing here is
imported outside `local.broker`.

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
import logging
import math
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any, Final

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from certrotator.crypto import certificate_id_from_der
from certrotator.local import amqtt_speedups, mqtt_packets
from certrotator.local.amqtt_routing import (
    CONNECTION_ATTRIBUTE,
    ClientPublishHook,
    SubscribedHook,
    SubscriptionRouting,
)
from certrotator.local.guarded_handler import GuardedHandler
from certrotator.local.mqtt_packets import PacketReader
from certrotator.local.policy import Connection, ConnectionAuthorizer

log = logging.getLogger("certrotator.local.broker")

# A TLS client that never sends CONNECT is dropped after this (amqtt waits forever).
CONNECT_TIMEOUT: Final = 10.0
# How long a takeover waits for the previous connection of the client id to finish closing.
TAKEOVER_TIMEOUT: Final = 5.0

# Only the local broker imports this module: what these change for the whole process is the broker's.
amqtt_speedups.install()
mqtt_packets.install()


class GuardedBroker(SubscriptionRouting, Broker):  # type: ignore[misc]
    def __init__(
        self,
        config: dict[str, Any],
        authorizer: ConnectionAuthorizer,
        on_client_publish: ClientPublishHook,
        on_subscribed: SubscribedHook | None = None,
    ) -> None:
        super().__init__(config)
        self._init_routing(authorizer, on_client_publish, on_subscribed)
        self._live: dict[str, set[GuardedHandler]] = {}  # principal -> its live connections
        self._client_locks = _KeyedLocks()
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
