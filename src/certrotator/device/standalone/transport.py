"""Standalone transport: direct MQTT over mutual TLS with the AWS IoT Device SDK (awsiotsdk).

Every start() builds a new connection, and with it a new TLS context, from the credentials in place
at that moment: the AWS CRT keeps key handles in a TLS context, so one built before a rotation would
go on presenting the old certificate (and, for PKCS#11, the old token key).
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awscrt import io, mqtt
from awsiot import _iot_metrics, mqtt_connection_builder

from certrotator.device.transport import OnMessage, OnReady, OnResumed
from certrotator.protocol import Topics, thing_of_client_id

log = logging.getLogger("certrotator.device")


@dataclass(frozen=True, slots=True)
class FileCredentials:
    certificate: Path
    private_key: Path


@dataclass(frozen=True, slots=True)
class Pkcs11Credentials:
    library: Path
    user_pin: str
    key_label: str
    certificate: Path  # the CRT needs the certificate as a file even when the key is in the token
    token_label: str | None = None
    slot_id: int | None = None


def _cache_sdk_version() -> None:
    """PERF: awsiotsdk reads its own version from the installed package metadata for every connection
    it builds (importlib.metadata walks sys.path: ~0.9 ms of CPU with the GIL held, per connection; a
    fleet simulated in one process builds two per device and rotation). The version cannot change
    while the process runs, so look it up once. Without the private helper (another awsiotsdk), skip."""
    get_version = getattr(_iot_metrics, "_get_sdk_version", None)
    if callable(get_version) and not hasattr(get_version, "cache_info"):
        _iot_metrics._get_sdk_version = functools.cache(get_version)


_cache_sdk_version()

_pkcs11_libs: dict[Path, Any] = {}
_pkcs11_lock = threading.Lock()


def _pkcs11_lib(path: Path) -> Any:
    # One Pkcs11Lib per process and library, and OMIT: the PKCS#11 key store (python-pkcs11) is always
    # created first and has already called C_Initialize, which STRICT turns into an error.
    with _pkcs11_lock:
        if path not in _pkcs11_libs:
            _pkcs11_libs[path] = io.Pkcs11Lib(
                file=str(path), behavior=io.Pkcs11Lib.InitializeFinalizeBehavior.OMIT
            )
        return _pkcs11_libs[path]


class MqttTransport:
    def __init__(
        self,
        endpoint: str,
        port: int,
        client_id: str,
        root_ca: Path,
        credentials: FileCredentials | Pkcs11Credentials,
        keep_alive_s: int = 60,
        subscriptions: list[str] | None = None,
    ) -> None:
        self.endpoint, self.port, self.client_id = endpoint, port, client_id
        self.root_ca, self.credentials, self.keep_alive_s = root_ca, credentials, keep_alive_s
        self.subscriptions = subscriptions or Topics.device_subscriptions(thing_of_client_id(client_id))
        self._connection: mqtt.Connection | None = None
        self._on_resumed: OnResumed | None = None
        self._stopped = False

    def _build(self) -> mqtt.Connection:
        common: dict[str, Any] = {
            "endpoint": self.endpoint,
            "port": self.port,
            "client_id": self.client_id,
            "ca_filepath": str(self.root_ca),
            "clean_session": True,  # we subscribe and ask $next/get after every connect anyway
            "keep_alive_secs": self.keep_alive_s,
            "on_connection_resumed": self._resumed,
        }
        creds = self.credentials
        if isinstance(creds, FileCredentials):
            return mqtt_connection_builder.mtls_from_path(
                cert_filepath=str(creds.certificate), pri_key_filepath=str(creds.private_key), **common
            )
        return mqtt_connection_builder.mtls_with_pkcs11(
            pkcs11_lib=_pkcs11_lib(creds.library),
            user_pin=creds.user_pin,
            slot_id=creds.slot_id,
            token_label=creds.token_label,
            private_key_label=creds.key_label,
            cert_filepath=str(creds.certificate),
            **common,
        )

    def start(self, on_message: OnMessage, on_ready: OnReady, on_resumed: OnResumed) -> None:
        self._on_resumed = on_resumed
        try:
            connection = self._build()
        except Exception as exc:  # bad key file, token unavailable: a connection failure like any other
            on_ready(f"cannot build the TLS connection: {exc}")
            return
        self._connection = connection
        connection.on_message(lambda topic, payload, **_kw: on_message(topic, bytes(payload)))

        def connected(future: Future[Any]) -> None:
            if (error := future.exception()) is not None:
                on_ready(f"connect failed: {error}")
                return
            self._subscribe_all(connection, on_ready)

        connection.connect().add_done_callback(connected)

    def _subscribe_all(self, connection: mqtt.Connection, on_ready: OnReady) -> None:
        pending = len(self.subscriptions)
        failures: list[str] = []
        lock = threading.Lock()

        def subscribed(topic: str, future: Future[Any]) -> None:
            nonlocal pending
            error = future.exception()
            if error is None and future.result().get("qos") is None:
                error = RuntimeError("subscription refused")  # SUBACK 0x80
            with lock:
                if error is not None:
                    failures.append(f"subscribe {topic}: {error}")
                pending -= 1
                done = pending == 0
            if done:
                on_ready("; ".join(failures) if failures else None)

        # Pipelined: all SUBSCRIBEs are in flight at once, one round trip instead of four.
        for topic in self.subscriptions:
            future, _packet_id = connection.subscribe(topic, mqtt.QoS.AT_LEAST_ONCE)
            future.add_done_callback(lambda f, t=topic: subscribed(t, f))

    def _resumed(
        self, connection: mqtt.Connection, return_code: Any, session_present: bool, **_kw: Any
    ) -> None:
        # The CRT reconnects by itself after a drop and tells nobody but this callback. With a clean
        # session the broker forgot our subscriptions: restore them, and only then tell the agent, which
        # asks $next/get (a reply must not arrive before the subscription that receives it).
        on_resumed = self._on_resumed
        if self._stopped or on_resumed is None:
            return
        if session_present:
            on_resumed(None)
            return

        def resubscribed(future: Future[Any]) -> None:
            if (error := future.exception()) is not None:
                on_resumed(f"resubscribe failed: {error}")
                return
            refused = [topic for topic, qos in future.result().get("topics", []) if qos is None]
            on_resumed(f"resubscribe refused for {refused}" if refused else None)

        try:
            future, _packet_id = connection.resubscribe_existing_topics()
        except Exception as exc:  # the connection went away again: its next resume tries again
            log.warning("%s: resubscribing after a reconnect failed: %s", self.client_id, exc)
            return
        future.add_done_callback(resubscribed)

    def publish(self, topic: str, payload: bytes) -> None:
        if self._connection is not None and not self._stopped:
            self._connection.publish(topic, payload, mqtt.QoS.AT_LEAST_ONCE)

    def stop(self) -> None:
        self._stopped = True
        if self._connection is not None:
            self._connection.disconnect()
            self._connection = None
