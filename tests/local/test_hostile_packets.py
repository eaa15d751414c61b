"""Malformed MQTT over real mutual TLS against the whole local IoT Core (issue 13, hostile input).

A raw client (python `ssl` + hand-built bytes, with a registered device certificate, so it gets past
TLS) sends what no MQTT library would: truncated packets, bad remaining-length encodings, topics that
are not UTF-8, wildcards in a PUBLISH topic, payloads over the limit, floods of connections that never
CONNECT, CONNECTs full of garbage. Each such client is dropped; a paho device beside it keeps getting
its replies; the engine's memory does not grow with the number of bad connections.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import ssl
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from certrotator.local import amqtt_fixes
from certrotator.local.engine import EngineConfig, LocalIoTCore
from certrotator.local.handles.thread import EngineThread
from certrotator.local.provision import CERT_FILE, KEY_FILE, ROOT_CA_FILE, provision_thing
from certrotator.protocol import MAX_PAYLOAD_BYTES, Topics

from .mqtt_clients import WAIT, Device, PahoClient

pytestmark = pytest.mark.timeout(90)

VICTIM, ATTACKER = "victim1", "attacker1"
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


# -------------------------------------------------------------------------------------- MQTT bytes


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + remaining_length(len(body)) + body


def connect(client_id: bytes, keepalive: int = 30, protocol: bytes = b"MQTT", flags: int = 0x02) -> bytes:
    return packet(0x10, field(protocol) + bytes([4, flags]) + struct.pack("!H", keepalive) + field(client_id))


def publish(topic: bytes, payload: bytes, qos: int = 0) -> bytes:
    packet_id = struct.pack("!H", 1) if qos else b""
    return packet(0x30 | (qos << 1), field(topic) + packet_id + payload)


def subscribe(topic_filter: bytes) -> bytes:
    return packet(0x82, struct.pack("!H", 7) + field(topic_filter) + b"\x01")


# ------------------------------------------------------------------------------------- raw client


@dataclass
class Credentials:
    cert: Path
    key: Path
    root_ca: Path


class RawClient:
    """One TLS connection with a device certificate; bytes in and out, nothing else."""

    def __init__(self, port: int, creds: Credentials, *, tls: bool = True) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        if not tls:
            self.sock: socket.socket = raw
            return
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(creds.root_ca))
        context.load_cert_chain(str(creds.cert), str(creds.key))
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(self, client_id: str = ATTACKER, keepalive: int = 30) -> None:
        self.send(connect(client_id.encode(), keepalive))
        assert self.read(4) == CONNACK_ACCEPTED

    def read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def drain(self, within: float = WAIT) -> tuple[bytes, bool]:
        """Everything the broker sends until it closes the connection (EOF or reset) or `within`
        seconds pass; and whether it closed."""
        received = b""
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                return received, False
            except (ConnectionError, ssl.SSLError, OSError):
                return received, True
            if not chunk:
                return received, True
            received += chunk
        return received, False

    def dropped(self, within: float = WAIT) -> bool:
        """True once the broker has closed the connection, False if it is still open after `within`."""
        return self.drain(within)[1]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ---------------------------------------------------------------------------------------- fixtures


# One engine, attacker and victim for the module: every test ends with the victim served again, and
# the broker's own count of connections in hand (not the test's order) tells when it is done.
@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-packets")


@pytest.fixture(scope="module")
def engine(state_dir: Path) -> Iterator[EngineThread]:
    with EngineThread(EngineConfig(state_dir / "data", port=0)) as running:
        yield running


def _provision(engine: EngineThread, root: Path, thing: str) -> Device:
    directory = root / thing

    def run(e: LocalIoTCore) -> str:
        return provision_thing(e.registry, e.ca, thing, directory, group="g", port=e.port).certificate_id

    principal = engine.call(run)
    return Device(thing, directory / CERT_FILE, directory / KEY_FILE, directory / ROOT_CA_FILE, principal)


@pytest.fixture(scope="module")
def attacker(engine: EngineThread, state_dir: Path) -> Credentials:
    device = _provision(engine, state_dir, ATTACKER)
    return Credentials(device.cert_path, device.key_path, device.root_ca_path)


@pytest.fixture(scope="module")
def victim(engine: EngineThread, state_dir: Path) -> Iterator[PahoClient]:
    client = PahoClient(engine.port, _provision(engine, state_dir, VICTIM))
    assert client.connect() == 0
    assert all(not r.is_failure for r in client.subscribe(*Topics.device_subscriptions(VICTIM)))
    yield client
    client.close()


@pytest.fixture
def raw(engine: EngineThread, attacker: Credentials) -> Iterator[Callable[..., RawClient]]:
    opened: list[RawClient] = []

    def open_one(*, tls: bool = True) -> RawClient:
        client = RawClient(engine.port, attacker, tls=tls)
        opened.append(client)
        return client

    yield open_one
    for client in opened:
        client.close()


def still_served(victim: PahoClient) -> None:
    """The paho device beside the attacker still gets its reply."""
    get = Topics.next_get(VICTIM)
    victim.publish(get, b"{}")
    assert victim.next_message().topic == Topics.accepted(get)


def client_tasks(engine: EngineThread) -> int:
    """Connections the broker is still handling, authenticated or not (its own task count)."""
    return engine.call(lambda e: len(e.broker._require()._client_tasks))


def wait_client_tasks(engine: EngineThread, at_most: int, timeout: float = WAIT) -> int:
    deadline = time.monotonic() + timeout
    while (count := client_tasks(engine)) > at_most and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


# ----------------------------------------------------------------------------- before the CONNECT


GARBAGE_INSTEAD_OF_CONNECT = {
    "random bytes": b"\x00\xff\x13\x37" * 16,
    "an HTTP request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "a PUBLISH first": publish(Topics.create(ATTACKER).encode(), b"{}"),
    "a wrong protocol name": connect(ATTACKER.encode(), protocol=b"MQTX"),
    "a reserved CONNECT flag": connect(ATTACKER.encode(), flags=0x03),
    "MQTT 3.1": packet(0x10, field(b"MQIsdp") + bytes([3, 2]) + b"\x00\x1e" + field(ATTACKER.encode())),
    "a client id that is not UTF-8": connect(b"\xff\xfe" + ATTACKER.encode()),
    "a client id with NUL": connect(ATTACKER.encode() + b"\x00"),
    "a length beyond the body": packet(
        0x10, field(b"MQTT") + bytes([4, 2]) + b"\x00\x1e" + b"\xff\xff" + b"ab"
    ),
    "a bad remaining length": b"\x10\xff\xff\xff\xff\x7f",
    "a will without its topic": connect(ATTACKER.encode(), flags=0x06),
}


@pytest.mark.parametrize("payload", GARBAGE_INSTEAD_OF_CONNECT.values(), ids=GARBAGE_INSTEAD_OF_CONNECT)
def test_garbage_instead_of_a_connect_is_dropped_and_others_are_served(
    raw: Callable[..., RawClient], victim: PahoClient, payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What does not even parse as a complete CONNECT is dropped when the CONNECT timeout ends it.
    monkeypatch.setattr(amqtt_fixes, "CONNECT_TIMEOUT", 0.3)
    client = raw()
    client.send(payload)
    answer, closed = client.drain()
    assert closed, "the broker kept a connection that never sent a valid CONNECT"
    assert not answer.startswith(CONNACK_ACCEPTED)  # nothing, or a refusal (CONNACK with a return code)
    still_served(victim)


def test_a_connect_cut_short_is_dropped_after_the_connect_timeout(
    raw: Callable[..., RawClient], victim: PahoClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(amqtt_fixes, "CONNECT_TIMEOUT", 0.5)
    client = raw()
    client.send(connect(ATTACKER.encode())[:9])  # and then silence
    assert client.dropped(WAIT)
    still_served(victim)


# ------------------------------------------------------------------------------ after the CONNECT


def _own_topic() -> bytes:
    return Topics.create(ATTACKER).encode()


AFTER_CONNECT = {
    "a bad remaining length": b"\x30\xff\xff\xff\xff\x7f" + publish(_own_topic(), b"{}"),
    "a topic that is not UTF-8": publish(
        b"awslabs/things/" + ATTACKER.encode() + b"/certificate/\xff\xfe", b"{}"
    ),
    "a topic with NUL": publish(_own_topic() + b"\x00", b"{}"),
    "a wildcard topic (+)": publish(b"$aws/things/" + ATTACKER.encode() + b"/jobs/+/update", b"{}"),
    "a wildcard topic (#)": publish(b"awslabs/things/" + ATTACKER.encode() + b"/#", b"{}"),
    "an empty topic": publish(b"", b"{}"),
    "QoS 3": publish(_own_topic(), b"{}", qos=3),
    "QoS 2": publish(_own_topic(), b"{}", qos=2),
    "a payload over the limit": publish(_own_topic(), b"x" * (MAX_PAYLOAD_BYTES + 1)),
    "a second CONNECT": connect(ATTACKER.encode()),
    "reserved packet type 0": b"\x00\x00",
    "reserved packet type 15": b"\xf0\x00",
    "a string longer than its packet": packet(0x30, b"\xff\xff" + b"abc"),
}


@pytest.mark.parametrize("payload", AFTER_CONNECT.values(), ids=AFTER_CONNECT)
def test_a_malformed_or_forbidden_packet_after_connect_drops_the_client(
    engine: EngineThread, raw: Callable[..., RawClient], victim: PahoClient, payload: bytes
) -> None:
    client = raw()
    client.connect()
    client.send(payload)
    assert client.dropped(), "the broker kept serving a client that sent a malformed packet"
    assert engine.call(lambda e: {c.thing for c in e.broker.connections()}) == {VICTIM}
    still_served(victim)


def test_a_huge_announced_length_is_refused_before_it_is_read(
    engine: EngineThread, raw: Callable[..., RawClient], victim: PahoClient
) -> None:
    """A PUBLISH announcing ~256 MB is dropped at its header: the broker must not buffer what follows."""
    client = raw()
    client.connect()
    client.send(b"\x30" + remaining_length(268_435_455) + field(_own_topic()) + b"x" * 60_000)
    assert client.dropped(), "the broker is reading a 256 MB packet"
    still_served(victim)


def test_a_truncated_packet_is_dropped_within_one_and_a_half_keepalives(
    raw: Callable[..., RawClient], victim: PahoClient
) -> None:
    client = raw()
    client.connect(keepalive=1)
    client.send(publish(_own_topic(), b"{}" * 50)[:20])  # the rest never comes
    started = time.monotonic()
    assert client.dropped(WAIT)
    assert time.monotonic() - started < 1.5 * 1 + 2.0
    still_served(victim)


def test_a_subscription_filter_that_is_not_utf8_is_refused_and_the_client_stays(
    raw: Callable[..., RawClient], victim: PahoClient
) -> None:
    """amqtt decodes a bad UTF-8 string to the text of its bytes (b'...'), which no policy grants: the
    SUBACK says failure (0x80). AWS IoT would disconnect; either way nothing is subscribed."""
    client = raw()
    client.connect()
    client.send(subscribe(b"$aws/things/" + ATTACKER.encode() + b"/jobs/\xff/get/+"))
    assert client.read(5) == b"\x90\x03\x00\x07\x80"
    still_served(victim)


# ------------------------------------------------------------------------------- floods and memory


def test_a_flood_of_connections_that_never_connect_does_not_stop_the_engine(
    engine: EngineThread, raw: Callable[..., RawClient], victim: PahoClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """150 TCP connections without TLS and 50 TLS connections without CONNECT at once: a device still
    gets its replies meanwhile, and every one of them is dropped by the broker within the timeouts."""
    monkeypatch.setattr(amqtt_fixes, "CONNECT_TIMEOUT", 1.0)
    baseline = client_tasks(engine)
    silent = [raw(tls=False) for _ in range(150)] + [raw() for _ in range(50)]
    still_served(victim)
    assert all(client.dropped(WAIT) for client in silent[150:]), "TLS clients without CONNECT kept"
    for client in silent:
        client.close()
    assert wait_client_tasks(engine, baseline) <= baseline
    still_served(victim)


def test_a_tcp_connection_that_never_starts_tls_is_dropped_after_the_connect_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No certificate is needed to open TCP connections: each one that never completes its TLS handshake
    is closed after the CONNECT timeout (asyncio alone keeps it 60 s). The timeout is fixed when the
    listener starts, hence an engine of its own."""
    monkeypatch.setattr(amqtt_fixes, "CONNECT_TIMEOUT", 0.5)
    with EngineThread(EngineConfig(tmp_path / "data", port=0)) as own:
        silent = [RawClient(own.port, Credentials(Path(), Path(), Path()), tls=False) for _ in range(20)]
        try:
            started = time.monotonic()
            assert all(client.dropped(WAIT) for client in silent)
            assert time.monotonic() - started < 0.5 + 3.0
        finally:
            for client in silent:
                client.close()


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


BAD_CONNECTIONS = 150
# Generous: what the broker may keep per bad connection after it has been dropped (it should be ~0;
# asyncio and ssl keep small caches that do not grow with the count).
RETAINED_BYTES_PER_CONNECTION = 1024


def test_memory_stays_bounded_over_many_bad_connections(
    engine: EngineThread,
    raw: Callable[..., RawClient],
    victim: PahoClient,
    attacker: Credentials,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """Python heap growth (tracemalloc, every thread) over a loop of bad connections, measured once the
    broker has finished with all of them: garbage instead of a CONNECT (the client leaves at once), a
    malformed packet after CONNECT (the broker drops it), half a packet (the client leaves mid-body)."""
    monkeypatch.setattr(amqtt_fixes, "CONNECT_TIMEOUT", 0.5)
    before_connect = [*GARBAGE_INSTEAD_OF_CONNECT.values()]
    after_connect = [*AFTER_CONNECT.values()]

    # Every bad connection is logged; records kept by the test's log capture are not the broker's.
    quiet = [logging.getLogger(name) for name in ("amqtt", "certrotator")]
    levels = [logger.level for logger in quiet]
    request.addfinalizer(lambda: [lg.setLevel(lv) for lg, lv in zip(quiet, levels, strict=True)])
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)

    def one_round(i: int) -> None:
        client = RawClient(engine.port, attacker)  # not kept by the `raw` fixture's list
        if i % 3 == 0:
            client.send(before_connect[i % len(before_connect)])
        elif i % 3 == 1:
            client.connect()
            client.send(after_connect[i % len(after_connect)])
            assert client.dropped()
        else:
            client.connect()
            client.send(publish(_own_topic(), b"x" * 1000)[:100])
        client.close()

    baseline = client_tasks(engine)
    for i in range(20):  # warm-up: caches, lazily built objects, the allocator's first arenas
        one_round(i)
    wait_client_tasks(engine, baseline)
    gc.collect()
    tracemalloc.start()
    try:
        before, rss_before = tracemalloc.get_traced_memory()[0], _rss_kib()
        started = time.monotonic()
        for i in range(BAD_CONNECTIONS):
            one_round(i)
        elapsed = time.monotonic() - started
        assert wait_client_tasks(engine, baseline) <= baseline
        gc.collect()
        grown, peak = tracemalloc.get_traced_memory()[0] - before, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    rss_grown = _rss_kib() - rss_before
    with capsys.disabled():
        print(
            f"\n[hostile packets] {BAD_CONNECTIONS} bad connections in {elapsed:.1f} s: Python heap "
            f"+{grown / 1024:.1f} KiB retained (peak +{peak / 1024:.1f} KiB), RSS +{rss_grown} KiB"
        )
    assert grown < BAD_CONNECTIONS * RETAINED_BYTES_PER_CONNECTION, f"{grown} bytes retained"
    still_served(victim)
