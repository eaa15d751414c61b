"""Fixtures for the local IoT Core tests: a CA in a temp data dir, device credentials, a running broker.

The broker runs on its own event loop in a background thread (no pytest-asyncio here); tests talk to it
with real MQTT clients over TLS and call its coroutines through `BrokerHarness.call`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from certrotator.crypto import KeyAlgorithm, certificate_id, certificate_pem, generate_private_key
from certrotator.local.broker import Connection, LocalBroker, TopicAction
from certrotator.local.ca import IssuerName, LocalCa, ensure_local_ca
from certrotator.local.policy import default_topic_policy
from certrotator.protocol import client_id_is_for_thing

from .mqtt_clients import WAIT, Device

T = TypeVar("T")


class MemoryAuthorizer:
    """The registry in a dict: certificate id -> thing for ACTIVE certificates attached to a thing."""

    def __init__(self) -> None:
        self.active: dict[str, str] = {}

    def authorize_connect(self, client_id: str, principal: str) -> str | None:
        thing = self.active.get(principal)
        return thing if thing is not None and client_id_is_for_thing(client_id, thing) else None

    def authorize_topic(self, thing: str, topic: str, action: TopicAction) -> bool:
        return default_topic_policy(thing, topic, action)


def write_device(
    ca: LocalCa,
    directory: Path,
    thing: str,
    *,
    issuer: IssuerName = IssuerName.IOT,
    key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256,
    name: str | None = None,
) -> Device:
    """A key and a certificate from one of `ca`'s issuers, written as a device keeps them."""
    key = generate_private_key(key_algorithm)
    cert = ca.issuer(issuer).issue(
        key.public_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, thing)])
    )
    stem = name or f"{thing}-{certificate_id(cert)[:8]}"
    cert_path, key_path = directory / f"{stem}.pem.crt", directory / f"{stem}.pem.key"
    cert_path.write_text(certificate_pem(cert))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return Device(thing, cert_path, key_path, ca.files.root_ca, certificate_id(cert))


@pytest.fixture(scope="session")
def local_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCa:
    return ensure_local_ca(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def rogue_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCa:
    """Another data directory's CAs: well-formed, but nothing our broker trusts."""
    return ensure_local_ca(tmp_path_factory.mktemp("rogue"))


@pytest.fixture
def authorizer() -> MemoryAuthorizer:
    return MemoryAuthorizer()


@pytest.fixture
def make_device(local_ca: LocalCa, authorizer: MemoryAuthorizer, tmp_path: Path) -> Callable[..., Device]:
    """make_device(thing, register=True, issuer=IssuerName.IOT): credentials, registered ACTIVE by default."""

    def make(thing: str, *, register: bool = True, issuer: IssuerName = IssuerName.IOT) -> Device:
        device = write_device(local_ca, tmp_path, thing, issuer=issuer)
        if register:
            authorizer.active[device.principal] = thing
        return device

    return make


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="broker-loop", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT)
        self.loop.close()


class BrokerHarness:
    def __init__(self, broker: LocalBroker, loop: LoopThread) -> None:
        self.broker, self.loop = broker, loop
        self.messages: queue.Queue[tuple[str, bytes, Connection]] = queue.Queue()
        broker.on_message(lambda topic, payload, connection: self.messages.put((topic, payload, connection)))

    @property
    def port(self) -> int:
        return self.broker.port

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.call(coro)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.call(self.broker.publish(topic, payload, qos))

    def disconnect(self, principal: str) -> int:
        return self.call(self.broker.disconnect(principal))

    def on_loop(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the broker's loop (its state is only touched there)."""

        async def run() -> T:
            return fn()

        return self.call(run())

    def next_message(self, timeout: float = WAIT) -> tuple[str, bytes, Connection]:
        return self.messages.get(timeout=timeout)


@pytest.fixture
def broker(local_ca: LocalCa, authorizer: MemoryAuthorizer) -> Iterator[BrokerHarness]:
    loop = LoopThread()
    local = LocalBroker(
        server_cert_path=local_ca.files.server_cert,
        server_key_path=local_ca.files.server_key,
        client_ca_path=local_ca.files.client_ca_bundle,
        authorizer=authorizer,
    )
    loop.call(local.start())
    try:
        yield BrokerHarness(local, loop)
    finally:
        loop.call(local.stop())
        loop.close()
