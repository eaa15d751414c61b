"""Real MQTT clients for the broker tests: paho-mqtt 2.2 and awsiotsdk (awscrt), both over mutual TLS.

Every wait has a timeout and is driven by the client's own callbacks (queues/events), never by sleeps.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from awscrt import mqtt as crt_mqtt
from awsiot import mqtt_connection_builder
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

WAIT = 10.0  # generous upper bound for anything that should happen within milliseconds


@dataclass(frozen=True)
class Device:
    thing: str
    cert_path: Path
    key_path: Path
    root_ca_path: Path
    principal: str  # certificate id


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


class _NoReconnectClient(paho.Client):
    """paho's threaded client (`loop_start`), minus reconnecting: a refused or dropped client must stay
    down during a test, and stopping it must not wait out paho's reconnect back-off."""

    def _thread_main(self) -> None:
        try:
            while not self._thread_terminate:
                if self.loop(timeout=0.05) != paho.MQTT_ERR_SUCCESS:
                    return
        finally:
            self._thread = None


class PahoClient:
    """paho with its network loop in a background thread; callbacks feed thread-safe queues."""

    def __init__(
        self,
        port: int,
        device: Device | None,
        *,
        client_id: str | None = None,
        clean_session: bool = True,
        root_ca_path: Path | None = None,
        keepalive: int = 30,
    ) -> None:
        self.port, self.keepalive = port, keepalive
        cid = client_id if client_id is not None else (device.thing if device else "anonymous")
        self.client = _NoReconnectClient(
            CallbackAPIVersion.VERSION2,
            client_id=cid,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        root = root_ca_path or (device.root_ca_path if device else None)
        assert root is not None
        if device is None:
            self.client.tls_set(ca_certs=str(root))  # no client certificate
        else:
            self.client.tls_set(
                ca_certs=str(root), certfile=str(device.cert_path), keyfile=str(device.key_path)
            )
        self.connacks: queue.Queue[ReasonCode] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.unsubacks: queue.Queue[int] = queue.Queue()
        self.messages: queue.Queue[Received] = queue.Queue()
        self.disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self._started = False

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: ReasonCode, _p: Any) -> None:
        self.connacks.put(reason)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        self.subacks.put(reasons)

    def _on_unsubscribe(self, _c: Any, _u: Any, mid: int, _reasons: Any, _p: Any) -> None:
        self.unsubacks.put(mid)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, _reason: Any, _p: Any) -> None:
        self.disconnected.set()

    def start(self) -> None:
        """Open TCP+TLS and send CONNECT; the CONNACK (if any) arrives in `connacks`."""
        self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        self.client.loop_start()
        self._started = True

    def connect(self) -> ReasonCode:
        self.start()
        return self.connacks.get(timeout=WAIT)

    def subscribe(self, *filters: str, qos: int = 1) -> list[ReasonCode]:
        result, _mid = self.client.subscribe([(f, qos) for f in filters])
        assert result == paho.MQTT_ERR_SUCCESS
        return self.subacks.get(timeout=WAIT)

    def unsubscribe(self, *filters: str) -> None:
        """UNSUBSCRIBE and wait for the UNSUBACK (MQTT 3.1.1's carries no per-filter result)."""
        result, mid = self.client.unsubscribe(list(filters))
        assert result == paho.MQTT_ERR_SUCCESS
        assert self.unsubacks.get(timeout=WAIT) == mid

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)

    def next_message(self, timeout: float = WAIT) -> Received:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        if self._started:
            self._started = False
            if not self.disconnected.is_set():
                self.client.disconnect()
            self.client.loop_stop()


class CrtClient:
    """awsiotsdk's `mtls_from_path` connection (clean_session=False by default, as in the SDK)."""

    def __init__(
        self,
        port: int,
        device: Device,
        *,
        client_id: str | None = None,
        clean_session: bool = False,
        root_ca_path: Path | None = None,
    ) -> None:
        self.interrupted = threading.Event()
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connection = mqtt_connection_builder.mtls_from_path(
            endpoint="127.0.0.1",
            port=port,
            cert_filepath=str(device.cert_path),
            pri_key_filepath=str(device.key_path),
            ca_filepath=str(root_ca_path or device.root_ca_path),
            client_id=client_id if client_id is not None else device.thing,
            clean_session=clean_session,
            keep_alive_secs=30,
            reconnect_min_timeout_secs=60,  # a dropped client must not come back during a test
            reconnect_max_timeout_secs=120,
            on_connection_interrupted=self._on_interrupted,
        )
        # One handler for every message, so it survives reconnecting the same connection object.
        self.connection.on_message(self._on_message)
        self._connected = False

    def _on_interrupted(self, connection: Any, error: Any, **_kwargs: Any) -> None:
        self.interrupted.set()

    def _on_message(
        self, topic: str, payload: bytes, qos: Any = None, retain: bool = False, **_kwargs: Any
    ) -> None:
        self.messages.put(Received(topic, bytes(payload), int(qos) if qos is not None else -1, bool(retain)))

    def connect(self) -> dict[str, Any]:
        result: dict[str, Any] = self.connection.connect().result(timeout=WAIT)
        self._connected = True
        return result

    def subscribe(self, topic_filter: str, qos: int = 1) -> Any:
        future, _packet_id = self.connection.subscribe(topic=topic_filter, qos=crt_mqtt.QoS(qos))
        return future.result(timeout=WAIT)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Future[Any]:
        future, _packet_id = self.connection.publish(topic=topic, payload=payload, qos=crt_mqtt.QoS(qos))
        result: Future[Any] = future
        return result

    def next_message(self, timeout: float = WAIT) -> Received:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        if self._connected:
            self._connected = False
            closed = self.connection.disconnect()
            # After an interruption the CRT sits in its reconnect back-off and completes the disconnect
            # only when that expires; nothing is left to wait for then.
            if not self.interrupted.is_set():
                closed.result(timeout=WAIT)
