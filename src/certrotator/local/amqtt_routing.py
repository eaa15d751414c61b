"""Subscriptions and message delivery of the local broker: which filters a connection may hold, and
who receives each message (FIX 4 and the PERF notes below). `SubscriptionRouting` is a mixin of
`amqtt_fixes.GuardedBroker`, listed before amqtt's Broker so that its methods replace amqtt's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

from amqtt.broker import RetainedApplicationMessage
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from certrotator.local.guarded_handler import GuardedHandler
from certrotator.local.policy import Connection, ConnectionAuthorizer, TopicAction
from certrotator.local.topic_tree import SubscriptionIndex, valid_topic_filter, valid_topic_name

log = logging.getLogger("certrotator.local.broker")

# AWS IoT speaks QoS 0 and 1 only: subscriptions are granted at most 1, a QoS 2 PUBLISH disconnects.
MAX_QOS: Final = 1
SUBACK_FAILURE: Final = 0x80
# AWS IoT's quota of subscriptions per connection: a SUBSCRIBE beyond it gets failure (0x80) per filter.
# Counted per client id, over the filters its session holds (a resumed session keeps its filters).
MAX_SUBSCRIPTIONS_PER_CONNECTION: Final = 50
# QoS 1 messages kept for an offline persistent session (amqtt's queue is unbounded).
MAX_OFFLINE_MESSAGES: Final = 100
# Where a session keeps the identity of the connection that holds it (set when it connects).
CONNECTION_ATTRIBUTE: Final = "certrotator.connection"

ClientPublishHook = Callable[[str, bytes, Connection], None]
# Told which topic filters a connection now holds: those a SUBACK just granted, and those a resumed
# persistent session brought back (no SUBSCRIBE is sent for them). Runs on the broker's loop, after the
# SUBACK / CONNACK went out, so what the hook sends reaches a client that is already subscribed.
SubscribedHook = Callable[[Connection, list[str]], None]


class SubscriptionRouting:
    # Set by amqtt's Broker.__init__.
    _sessions: dict[str, tuple[Session, BrokerProtocolHandler]]
    _subscriptions: dict[str, list[tuple[Session, int]]]

    def _init_routing(
        self,
        authorizer: ConnectionAuthorizer,
        on_client_publish: ClientPublishHook,
        on_subscribed: SubscribedHook | None,
    ) -> None:
        """After amqtt's Broker.__init__ (the index shares its subscription table)."""
        self._authorizer = authorizer
        self._on_client_publish = on_client_publish
        self._on_subscribed = on_subscribed
        self.index: SubscriptionIndex[Session] = SubscriptionIndex(self._subscriptions)
        self._deliveries: set[asyncio.Future[Any]] = set()

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
