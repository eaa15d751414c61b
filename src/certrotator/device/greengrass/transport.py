"""Greengrass transport: the agent's MQTT through the nucleus, over Greengrass IPC
(`GreengrassCoreIPCClientV2.publish_to_iot_core` / `subscribe_to_iot_core`).

QoS as the seed component: publishes use QoS 0 because Greengrass does not tell components whether
the nucleus is connected to AWS IoT Core; with QoS 0 (and the nucleus's default
`keepQos0WhenOffline: false`) a request is delivered promptly or fails, instead of being spooled and
delivered long after the state machine gave up on it. Subscriptions use QoS 1 so replies that do
arrive are not dropped between the nucleus and AWS IoT Core.

A restart in Greengrass mode is not done here: the nucleus owns the connection, so the agent exits
and the recipe restarts the Greengrass service (see `certrotator.device.greengrass.runtime`).

Reconnects: the nucleus owns the MQTT connection and IPC tells a component nothing about it, so this
transport never reports a resumed connection. The nucleus keeps a persistent session (clean session
off) and restores its subscriptions itself when the session is gone, so AWS IoT Core queues QoS 1
messages for the component's subscriptions while the nucleus is away -- for as long as the session
lives (1 hour by default). Beyond that, a notify-next is lost; the Greengrass runtime therefore asks
`$next/get` periodically while idle (AgentSettings.resync_interval_s). A restarted nucleus restarts
this component, which asks at start-up. See docs/reliability.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from certrotator.device.transport import OnMessage, OnReady, OnResumed
from certrotator.protocol import Topics

if TYPE_CHECKING:
    from awsiot.greengrasscoreipc.model import IoTCoreMessage

log = logging.getLogger("certrotator.device")

# The values of awsiot's `model.QOS` (IPC sends them as strings). Spelled out so that importing this
# module (e.g. by `certrotator component build`) does not need the device extra.
QOS_AT_MOST_ONCE = "0"
QOS_AT_LEAST_ONCE = "1"


class StreamOperation(Protocol):
    def close(self) -> Future[Any]: ...


class IotCoreIpc(Protocol):
    """The part of `GreengrassCoreIPCClientV2` this transport uses (keyword arguments as in awsiot)."""

    def publish_to_iot_core_async(
        self, *, topic_name: str | None = None, qos: str | None = None, payload: bytes | str | None = None
    ) -> Future[Any]: ...

    def subscribe_to_iot_core_async(
        self,
        *,
        topic_name: str | None = None,
        qos: str | None = None,
        on_stream_event: Callable[[IoTCoreMessage], None] | None = None,
        on_stream_error: Callable[[Exception], bool] | None = None,
        on_stream_closed: Callable[[], None] | None = None,
    ) -> tuple[Future[Any], StreamOperation]: ...


class GreengrassTransport:
    """One "connection": the agent's subscriptions as IPC streams. A new transport per (re)start."""

    def __init__(self, client: IotCoreIpc, thing: str, subscriptions: list[str] | None = None) -> None:
        self.client = client
        self.thing = thing
        self.subscriptions = subscriptions or Topics.device_subscriptions(thing)
        self._operations: list[StreamOperation] = []
        self._publishes: set[Future[Any]] = set()
        self._lock = threading.Lock()
        self._on_message: OnMessage | None = None
        self._stopped = False

    # --------------------------------------------------------------------------------- start

    def start(self, on_message: OnMessage, on_ready: OnReady, on_resumed: OnResumed) -> None:
        del on_resumed  # never called: the nucleus does not tell components about its reconnects
        self._on_message = on_message
        pending = len(self.subscriptions)
        failures: list[str] = []

        def settled(topic: str, error: BaseException | None) -> None:
            nonlocal pending
            with self._lock:
                if error is not None:
                    failures.append(f"subscribe {topic}: {describe(error)}")
                pending -= 1
                done = pending == 0
            if done and not self._stopped:
                on_ready("; ".join(failures) if failures else None)

        # All subscriptions in flight at once; the agent's connect timer covers one that never
        # completes (a hanging subscribe is a failure too, seed #21).
        for topic in self.subscriptions:
            try:
                future, operation = self.client.subscribe_to_iot_core_async(
                    topic_name=topic,
                    qos=QOS_AT_LEAST_ONCE,
                    on_stream_event=self._event,
                    on_stream_error=partial(self._stream_error, topic),
                    on_stream_closed=partial(self._stream_closed, topic),
                )
            except Exception as exc:  # IPC connection gone, or refused before the request went out
                settled(topic, exc)
                continue
            with self._lock:
                self._operations.append(operation)
            future.add_done_callback(partial(_settle, settled, topic))

    def _event(self, event: IoTCoreMessage) -> None:
        message = event.message
        if self._stopped or self._on_message is None or message is None or message.topic_name is None:
            return
        self._on_message(message.topic_name, bytes(message.payload or b""))

    def _stream_error(self, topic: str, error: Exception) -> bool:
        log.warning("%s: IPC stream error on %s: %s", self.thing, topic, describe(error))
        return False  # keep the stream: one bad event must not end the subscription

    def _stream_closed(self, topic: str) -> None:
        if not self._stopped:
            # Lost replies are covered by the state machine's timeouts; the nucleus closes streams
            # when it shuts down, and then this process is about to be stopped as well.
            log.warning("%s: IPC subscription %s closed by the nucleus", self.thing, topic)

    # ------------------------------------------------------------------------------- publish

    def publish(self, topic: str, payload: bytes) -> None:
        if self._stopped:
            return
        try:
            future = self.client.publish_to_iot_core_async(
                topic_name=topic, qos=QOS_AT_MOST_ONCE, payload=payload
            )
        except Exception as exc:
            log.warning("%s: publish to %s failed: %s", self.thing, topic, describe(exc))
            return
        with self._lock:
            self._publishes.add(future)
        future.add_done_callback(lambda f: self._published(topic, f))

    def _published(self, topic: str, future: Future[Any]) -> None:
        with self._lock:
            self._publishes.discard(future)
        if (error := _exception(future)) is not None:
            # QoS 0 through the nucleus: a failure means it is offline. The state machine's timeout
            # for the awaited reply decides what follows; nothing to retry here.
            log.warning("%s: publish to %s failed: %s", self.thing, topic, describe(error))

    def flush(self, timeout: float) -> bool:
        """Wait until the publishes handed to the nucleus completed; True if none is left. Called
        before the process exits, so a final job update (e.g. FAILED before a rollback) goes out."""
        with self._lock:
            pending = list(self._publishes)
        if not pending:
            return True
        _done, not_done = wait(pending, timeout=timeout)
        return not not_done

    # ---------------------------------------------------------------------------------- stop

    def stop(self) -> None:
        self._stopped = True
        with self._lock:
            operations, self._operations = self._operations, []
        for operation in operations:
            try:
                operation.close()  # non-blocking: returns a future we do not wait for
            except Exception as exc:
                log.debug("%s: closing an IPC subscription failed: %s", self.thing, exc)


def _settle(settled: Callable[[str, BaseException | None], None], topic: str, future: Future[Any]) -> None:
    settled(topic, _exception(future))


def describe(error: BaseException) -> str:
    """IPC errors (awsiot model error shapes) have an empty str(); their repr names type and message."""
    return str(error) or repr(error)


def _exception(future: Future[Any]) -> BaseException | None:
    if future.cancelled():
        return RuntimeError("cancelled")
    return future.exception()
