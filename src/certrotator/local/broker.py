"""The local IoT Core's MQTT broker: MQTT 3.1.1 over mutual TLS, identities and topics checked per
connection, as AWS IoT Core does for the rotation protocol.

This is our interface; amqtt (pinned 0.12.1, patched in `amqtt_fixes`) is the implementation behind it
and can be replaced without touching callers. Everything runs on the event loop that called `start()`;
call the methods from that loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from certrotator.local.amqtt_fixes import GuardedBroker
from certrotator.local.policy import (
    Connection,
    ConnectionAuthorizer,
    TopicAction,
    default_topic_policy,
)

__all__ = [
    "Connection",
    "ConnectionAuthorizer",
    "LocalBroker",
    "MessageHandler",
    "SubscribedHandler",
    "TopicAction",
    "default_topic_policy",
]

log = logging.getLogger("certrotator.local.broker")

# Called for every PUBLISH a client was allowed to make, on the broker's loop, in arrival order per
# connection. A coroutine result runs as a task; exceptions are logged at ERROR and never reach the broker.
MessageHandler = Callable[[str, bytes, Connection], Awaitable[None] | None]

# Called with a connection and the topic filters it now holds (just granted, or back with a resumed
# persistent session), on the broker's loop once the client has its SUBACK / CONNACK. Exceptions are
# logged at ERROR and never reach the broker.
SubscribedHandler = Callable[[Connection, list[str]], None]

# AWS IoT's default persistent-session expiry.
SESSION_EXPIRY_SECONDS = 3600
_STOP_TIMEOUT = 5.0


class LocalBroker:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        server_cert_path: str | os.PathLike[str],
        server_key_path: str | os.PathLike[str],
        client_ca_path: str | os.PathLike[str],
        authorizer: ConnectionAuthorizer,
        session_expiry_seconds: int = SESSION_EXPIRY_SECONDS,
        quiet_amqtt: bool = True,
    ) -> None:
        """`port` 0 takes a free port from the OS (read it from `.port` after `start()`).
        `client_ca_path` is the trust bundle for client certificates (both issuers' CAs).
        `quiet_amqtt` sets amqtt's loggers to WARNING unless they were configured explicitly."""
        if ":" in host:
            raise ValueError("IPv6 listen addresses are not supported by the amqtt backend; use an IPv4 host")
        self.host = host
        self._requested_port = port
        self._paths = (os.fspath(server_cert_path), os.fspath(server_key_path), os.fspath(client_ca_path))
        self._authorizer = authorizer
        self._session_expiry = session_expiry_seconds
        self._handlers: list[MessageHandler] = []
        self._subscribed_handlers: list[SubscribedHandler] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._amqtt: GuardedBroker | None = None
        self._port: int | None = None
        if quiet_amqtt:
            for name in ("amqtt", "transitions"):
                logger = logging.getLogger(name)
                if logger.level == logging.NOTSET:
                    logger.setLevel(logging.WARNING)

    @property
    def port(self) -> int:
        """The port actually bound (meaningful after start())."""
        if self._port is None:
            raise RuntimeError("broker not started")
        return self._port

    def on_message(self, callback: MessageHandler) -> None:
        """Register a handler for messages published by clients (after the topic policy allowed them)."""
        self._handlers.append(callback)

    def on_subscribed(self, callback: SubscribedHandler) -> None:
        """Register a handler told of the topic filters a client has just been granted (or got back)."""
        self._subscribed_handlers.append(callback)

    async def start(self) -> None:
        if self._amqtt is not None:
            raise RuntimeError("broker already started")
        cert, key, client_ca = self._paths
        config: dict[str, Any] = {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{self.host}:{self._requested_port}",
                    "ssl": True,
                    "certfile": cert,
                    "keyfile": key,
                    "cafile": client_ca,
                }
            },
            "plugins": {},  # no amqtt plugins: GuardedBroker asks our authorizer directly
            "session_expiry_interval": self._session_expiry,
        }
        broker = GuardedBroker(config, self._authorizer, self._client_published, self._client_subscribed)
        await broker.start()
        self._amqtt = broker
        server = broker._servers["default"].instance
        self._port = int(server.sockets[0].getsockname()[1])
        log.info("broker listening on %s:%d", self.host, self._port)

    async def stop(self) -> None:
        broker, self._amqtt = self._amqtt, None
        if broker is None:
            return
        await broker.shutdown()  # closes the listener and every session's connection
        await broker.wait_clients_closed(_STOP_TIMEOUT)
        broker.cancel_deliveries()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=_STOP_TIMEOUT)

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish from inside the broker (the cloud side) to every allowed subscriber."""
        self.publish_nowait(topic, payload, qos)

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """`publish` without the coroutine: routing is synchronous, delivery runs in background tasks."""
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1 (AWS IoT has no QoS 2), got {qos}")
        self._require().route(topic, bytes(payload), qos)

    def publish_to(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Publish to one client only, if it is subscribed to `topic` and may receive it (the policy's
        receive check, as for any delivery); False if it is not."""
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1 (AWS IoT has no QoS 2), got {qos}")
        return self._require().route_to(client_id, topic, bytes(payload), qos)

    async def disconnect(self, principal: str) -> int:
        """Close every live connection authenticated by the certificate `principal`; returns how many.

        Returns once they are closed (or after a few seconds if one does not finish closing). A new
        connection with the certificate is up to the authorizer: deactivate it in the registry first.
        """
        kicked = self._require().kick_principal(principal)
        if kicked:
            await asyncio.wait(
                [asyncio.ensure_future(h.finished.wait()) for h in kicked], timeout=_STOP_TIMEOUT
            )
        return len(kicked)

    async def wait_closed(self, principal: str, timeout: float = _STOP_TIMEOUT) -> bool:
        """Wait until no connection authenticated by `principal` is live (e.g. after a client disconnected)."""
        return await self._require().wait_closed(principal, timeout)

    def connections(self) -> list[Connection]:
        """The live, authenticated connections."""
        return self._require().connections()

    def session_client_ids(self) -> set[str]:
        """Client ids with a session in the broker's table (connected or persisted); for diagnostics."""
        return set(self._require().sessions)

    def subscriptions_of(self, client_id: str) -> frozenset[str]:
        return self._require().index.filters_of(client_id)

    def _require(self) -> GuardedBroker:
        if self._amqtt is None:
            raise RuntimeError("broker not started")
        return self._amqtt

    def _client_published(self, topic: str, payload: bytes, connection: Connection) -> None:
        for handler in self._handlers:
            try:
                result = handler(topic, payload, connection)
            except Exception:
                log.exception("message handler failed for %s from %s", topic, connection.client_id)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._handler_done)

    def _client_subscribed(self, connection: Connection, filters: list[str]) -> None:
        for handler in self._subscribed_handlers:
            try:
                handler(connection, filters)
            except Exception:
                log.exception("subscription handler failed for %s", connection.client_id)

    def _handler_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("message handler failed", exc_info=exc)
