"""The local broker over real mutual TLS, with paho-mqtt 2.2 and awsiotsdk clients.

The `test_fix*` tests are the regression tests for the amqtt 0.12.1 defects listed in the local IoT Core
issue. Each checks what a client observes, so an amqtt upgrade that undoes a fix makes it fail.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from certrotator.local.broker import Connection
from certrotator.local.ca import IssuerName, LocalCa
from certrotator.local.topic_tree import SubscriptionIndex, filter_matches
from certrotator.protocol import Topics

from .conftest import BrokerHarness, MemoryAuthorizer, write_device
from .mqtt_clients import WAIT, CrtClient, Device, PahoClient, Received

pytestmark = pytest.mark.timeout(60)

NOT_AUTHORIZED = 135  # paho's reason code for CONNACK return code 5 (MQTT 3.1.1)
SUBACK_FAILURE = 0x80

MakeDevice = Callable[..., Device]


class Clients:
    """Opens clients and closes them all at the end of the test, whatever happened."""

    def __init__(self) -> None:
        self._opened: list[PahoClient | CrtClient] = []

    def paho(self, port: int, device: Device | None, **kwargs: Any) -> PahoClient:
        client = PahoClient(port, device, **kwargs)
        self._opened.append(client)
        return client

    def crt(self, port: int, device: Device, **kwargs: Any) -> CrtClient:
        client = CrtClient(port, device, **kwargs)
        self._opened.append(client)
        return client

    def close_all(self) -> None:
        for client in reversed(self._opened):
            with contextlib.suppress(Exception):  # a dropped client may refuse a clean disconnect
                client.close()


@pytest.fixture
def clients() -> Iterator[Clients]:
    opened = Clients()
    yield opened
    opened.close_all()


def assert_next_payload(client: PahoClient | CrtClient, expected: bytes) -> None:
    """The next message the client gets is `expected`: nothing unexpected was delivered before it."""
    assert client.next_message().payload == expected


# ----------------------------------------------------------------------------------------- basics


def test_paho_and_awsiotsdk_connect_subscribe_receive_and_publish(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    alpha, beta = make_device("alpha"), make_device("beta")
    p = clients.paho(broker.port, alpha)
    assert not p.connect().is_failure
    own = Topics.device_subscriptions("alpha")
    assert [r.value for r in p.subscribe(*own)] == [1] * len(own)
    c = clients.crt(broker.port, beta)
    c.connect()
    c.subscribe(Topics.notify_next("beta"))

    broker.publish(Topics.notify_next("alpha"), b"to alpha")
    broker.publish(Topics.notify_next("beta"), b"to beta")
    assert p.next_message().payload == b"to alpha"
    assert c.next_message().payload == b"to beta"

    p.publish(Topics.create("alpha"), b'{"jobId":"j1"}').wait_for_publish(WAIT)
    assert broker.next_message() == (
        Topics.create("alpha"),
        b'{"jobId":"j1"}',
        Connection("alpha", alpha.principal, "alpha"),
    )
    c.publish(Topics.next_get("beta"), b"{}").result(WAIT)
    assert broker.next_message() == (
        Topics.next_get("beta"),
        b"{}",
        Connection("beta", beta.principal, "beta"),
    )


def test_private_ca_certificates_connect(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    device = make_device("gamma", issuer=IssuerName.PRIVATE_CA)
    client = clients.crt(broker.port, device)
    client.connect()
    client.publish(Topics.commit("gamma"), b"{}").result(WAIT)
    assert broker.next_message()[2].principal == device.principal


def test_greengrass_style_client_id_connects_as_its_thing(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    alpha = make_device("alpha")
    client = clients.paho(broker.port, alpha, client_id="alpha#ipc")
    assert not client.connect().is_failure
    client.publish(Topics.create("alpha"), b"x").wait_for_publish(WAIT)
    assert broker.next_message()[2] == Connection("alpha#ipc", alpha.principal, "alpha")


# ------------------------------------------------------------------------------- refused connects


def test_unregistered_certificate_is_refused(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    unknown = make_device("alpha", register=False)
    client = clients.paho(broker.port, unknown)
    assert client.connect().value == NOT_AUTHORIZED
    crt = clients.crt(broker.port, unknown)
    # aws-c-mqtt reports any refusing CONNACK as a protocol error and drops the return code.
    with pytest.raises(Exception, match=r"MQTT_PROTOCOL_ERROR|NOT_AUTHORIZED"):
        crt.connect()
    assert broker.on_loop(broker.broker.connections) == []


def test_client_id_of_another_thing_is_refused(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    alpha = make_device("alpha")
    make_device("beta")
    for client_id in ("beta", "alphabet", "beta#alpha", ""):
        client = clients.paho(broker.port, alpha, client_id=client_id)
        assert client.connect().value == NOT_AUTHORIZED, client_id


def test_will_on_another_things_topic_is_refused(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    alpha = make_device("alpha")
    client = clients.paho(broker.port, alpha)
    client.client.will_set(Topics.notify_next("beta"), b"spoofed", qos=1)
    assert client.connect().value == NOT_AUTHORIZED


# --------------------------------------------------------------------- FIX 1: certificate required


def _raw_tls(port: int, root_ca: Path, device: Device | None) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(root_ca))
    if device is not None:
        context.load_cert_chain(device.cert_path, device.key_path)
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def _connect_packet(client_id: str, keepalive: int) -> bytes:
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big")  # MQTT 3.1.1, clean session
    body = variable + len(cid).to_bytes(2, "big") + cid
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


def _read_until_closed(sock: ssl.SSLSocket) -> bytes:
    """Everything the server sends until it closes the connection (or fails it)."""
    data = b""
    try:
        while chunk := sock.recv(1024):
            data += chunk
    except (ssl.SSLError, ConnectionError):
        pass
    return data


def _answer_to_connect(port: int, root_ca: Path, device: Device | None) -> bytes:
    """What the server sends back to a CONNECT over TLS with `device`'s certificate (or none)."""
    try:
        with _raw_tls(port, root_ca, device) as sock:
            sock.sendall(_connect_packet("alpha", 30))
            return _read_until_closed(sock)
    except (ssl.SSLError, ConnectionError):  # TLS 1.2 fails in the handshake, 1.3 on first use
        return b""


def test_fix1_client_without_certificate_fails_the_tls_handshake(
    broker: BrokerHarness, local_ca: LocalCa, make_device: MakeDevice, clients: Clients
) -> None:
    make_device("alpha")
    # paho without a client certificate: never gets a CONNACK (with CERT_OPTIONAL it would get a refusal).
    client = clients.paho(broker.port, None, client_id="alpha", root_ca_path=local_ca.files.root_ca)
    try:
        client.start()
    except ssl.SSLError:
        pass  # TLS 1.2 fails inside connect()
    else:
        assert client.disconnected.wait(
            WAIT
        )  # TLS 1.3: the server's alert arrives after the client's Finished
    assert client.connacks.empty()

    # The same at the socket level: the server fails the handshake and never speaks MQTT
    # (with CERT_OPTIONAL it would answer with a refusing CONNACK).
    assert _answer_to_connect(broker.port, local_ca.files.root_ca, None) == b""


def test_fix1_certificate_from_an_untrusted_ca_fails_the_tls_handshake(
    broker: BrokerHarness,
    local_ca: LocalCa,
    rogue_ca: LocalCa,
    authorizer: MemoryAuthorizer,
    tmp_path: Path,
    clients: Clients,
) -> None:
    rogue = write_device(rogue_ca, tmp_path, "alpha")
    authorizer.active[rogue.principal] = "alpha"  # registered: only TLS stands in the way
    client = clients.crt(broker.port, rogue, root_ca_path=local_ca.files.root_ca)
    # s2n sees the server's handshake failure as the socket closing.
    with pytest.raises(Exception, match=r"(?i)tls|ssl|handshake|negotiation|SOCKET_CLOSED"):
        client.connect()
    assert _answer_to_connect(broker.port, local_ca.files.root_ca, rogue) == b""
    assert broker.on_loop(broker.broker.connections) == []


# --------------------------------------------------------- FIX 2: authenticate before sessions


@pytest.mark.parametrize("attacker_clean_session", [True, False], ids=["clean", "resume"])
def test_fix2_refused_client_cannot_take_over_or_delete_the_victims_session(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients, attacker_clean_session: bool
) -> None:
    victim_device = make_device("alpha")
    victim = clients.crt(broker.port, victim_device)  # persistent session, like every device
    victim.connect()
    victim.subscribe(Topics.notify_next("alpha"))

    attacker_device = make_device("alpha", register=False)  # valid CA, not registered
    attacker = clients.paho(
        broker.port, attacker_device, client_id="alpha", clean_session=attacker_clean_session
    )
    assert attacker.connect().value == NOT_AUTHORIZED

    broker.publish(Topics.notify_next("alpha"), b"still yours")
    assert_next_payload(victim, b"still yours")
    assert not victim.interrupted.is_set()
    victim.publish(Topics.next_get("alpha"), b"{}").result(WAIT)
    assert broker.next_message()[2].principal == victim_device.principal
    assert broker.on_loop(broker.broker.session_client_ids) == {"alpha"}
    assert [c.principal for c in broker.on_loop(broker.broker.connections)] == [victim_device.principal]


def test_fix2_refused_connection_leaves_no_session(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    unknown = make_device("ghost", register=False)
    client = clients.paho(broker.port, unknown, clean_session=False)
    assert client.connect().value == NOT_AUTHORIZED
    assert broker.on_loop(broker.broker.session_client_ids) == set()


# ------------------------------------------------- FIX 3: each connection judged by its own certificate


def test_fix3_resumed_session_is_judged_by_the_new_certificate(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    old, new = make_device("alpha"), make_device("alpha")  # a rotation: both ACTIVE for a moment
    first = clients.crt(broker.port, old)
    assert first.connect()["session_present"] is False
    first.subscribe(Topics.notify_next("alpha"))
    first.publish(Topics.create("alpha"), b"with old").result(WAIT)
    assert broker.next_message()[2].principal == old.principal
    first.close()
    assert broker.call(broker.broker.wait_closed(old.principal))

    second = clients.crt(broker.port, new)  # same client id, clean_session=False (SDK default)
    assert second.connect()["session_present"] is True  # the resumed-session path, really
    second.publish(Topics.commit("alpha"), b"with new").result(WAIT)
    topic, payload, connection = broker.next_message()
    assert (topic, payload) == (Topics.commit("alpha"), b"with new")
    assert connection.principal == new.principal
    # The session itself carried over: its subscription still delivers.
    broker.publish(Topics.notify_next("alpha"), b"kept")
    assert_next_payload(second, b"kept")


def test_takeover_closes_the_old_connection_and_the_new_one_keeps_working(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    old, new = make_device("alpha"), make_device("alpha")
    first = clients.crt(broker.port, old)
    first.connect()
    first.subscribe(Topics.notify_next("alpha"))
    second = clients.crt(broker.port, new)
    assert second.connect()["session_present"] is True
    assert first.interrupted.wait(WAIT)
    broker.publish(Topics.notify_next("alpha"), b"for the new one")
    assert_next_payload(second, b"for the new one")
    second.publish(Topics.create("alpha"), b"x").result(WAIT)
    assert broker.next_message()[2].principal == new.principal
    assert [c.principal for c in broker.on_loop(broker.broker.connections)] == [new.principal]


# ------------------------------------------------------------- FIX 4: QoS = min(publish, granted)


def test_fix4_qos0_publish_reaches_a_qos1_subscriber_at_qos0(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    alpha = make_device("alpha")
    subscriber = clients.paho(broker.port, alpha)
    subscriber.connect()
    topic = Topics.accepted(Topics.create("alpha"))
    assert [r.value for r in subscriber.subscribe(topic, qos=1)] == [1]
    publisher = clients.paho(broker.port, alpha, client_id="alpha#publisher")
    publisher.connect()

    publisher.publish(topic, b"qos0", qos=0)
    assert subscriber.next_message() == Received(topic, b"qos0", 0)
    publisher.publish(topic, b"qos1", qos=1)
    assert subscriber.next_message() == Received(topic, b"qos1", 1)
    broker.publish(topic, b"internal qos0", qos=0)
    assert subscriber.next_message() == Received(topic, b"internal qos0", 0)


def test_qos1_publish_reaches_a_qos0_subscriber_at_qos0(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    alpha = make_device("alpha")
    subscriber = clients.paho(broker.port, alpha)
    subscriber.connect()
    assert [r.value for r in subscriber.subscribe(Topics.notify_next("alpha"), qos=0)] == [0]
    broker.publish(Topics.notify_next("alpha"), b"x", qos=1)
    assert subscriber.next_message().qos == 0


# ------------------------------------------------------------ FIX 5: denied PUBLISH disconnects


def test_fix5_publish_to_another_things_topic_disconnects_and_is_not_delivered(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    alpha, beta = make_device("alpha"), make_device("beta")
    victim = clients.paho(broker.port, beta)
    victim.connect()
    forged_topic = Topics.accepted(Topics.create("beta"))
    victim.subscribe(forged_topic)
    attacker = clients.paho(broker.port, alpha)
    attacker.connect()

    info = attacker.publish(forged_topic, b'{"certificatePem":"forged"}', qos=1)
    assert attacker.disconnected.wait(WAIT)
    # No PUBACK for a denied message. Not `info.is_published()`: once paho notices the connection is
    # gone it marks the in-flight message failed and is_published() raises instead of answering, a
    # race with the disconnect event this test waits for (paho 2.2, pinned).
    assert not info._published
    assert broker.messages.empty()  # the engine never saw it
    broker.publish(forged_topic, b"marker")
    assert_next_payload(victim, b"marker")  # the forged message was not delivered before it
    assert not victim.disconnected.is_set()


def test_fix5_awsiotsdk_client_publishing_outside_its_topics_is_disconnected(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    alpha = make_device("alpha")
    client = clients.crt(broker.port, alpha)
    client.connect()
    client.publish("some/other/topic", b"x", qos=0)
    assert client.interrupted.wait(WAIT)
    assert broker.messages.empty()


def test_qos2_publish_disconnects(broker: BrokerHarness, make_device: MakeDevice, clients: Clients) -> None:
    alpha = make_device("alpha")
    client = clients.paho(broker.port, alpha)
    client.connect()
    client.publish(Topics.create("alpha"), b"x", qos=2)
    assert client.disconnected.wait(WAIT)
    assert broker.messages.empty()


# ----------------------------------------------------------------------- subscriptions and policy


def test_subscriptions_outside_the_things_topics_fail_and_the_connection_stays(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    alpha = make_device("alpha")
    make_device("beta")
    client = clients.paho(broker.port, alpha)
    client.connect()
    filters = {
        Topics.notify_next("alpha"): 1,
        "$aws/things/alpha/jobs/+/get/accepted": 1,
        "awslabs/things/alpha/certificate/#": 1,
        "$aws/things/+/jobs/#": SUBACK_FAILURE,
        "#": SUBACK_FAILURE,
        "+/things/alpha/jobs/notify-next": SUBACK_FAILURE,
        "awslabs/things/#": SUBACK_FAILURE,
        Topics.notify_next("beta"): SUBACK_FAILURE,
        "$aws/things/alpha/shadow/update": SUBACK_FAILURE,
    }
    assert [r.value for r in client.subscribe(*filters)] == list(filters.values())
    broker.publish(Topics.notify_next("beta"), b"not yours")
    broker.publish(Topics.notify_next("alpha"), b"yours")
    assert_next_payload(client, b"yours")
    assert not client.disconnected.is_set()


def _own_filters(thing: str, first: int, count: int) -> list[str]:
    """`count` distinct filters the thing may subscribe to (under its certificate topics)."""
    return [f"awslabs/things/{thing}/certificate/n{i}" for i in range(first, first + count)]


def test_at_most_50_subscriptions_per_connection(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    """AWS IoT's quota: a new filter beyond 50 gets failure (0x80) in the SUBACK; the others of the same
    SUBSCRIBE still succeed; denied filters and re-subscriptions take no room; unsubscribing frees it."""
    alpha = make_device("alpha")
    client = clients.paho(broker.port, alpha)
    client.connect()
    first = [*_own_filters("alpha", 0, 10), Topics.notify_next("beta"), "#"]  # the last two are denied
    assert [r.value for r in client.subscribe(*first)] == [1] * 10 + [SUBACK_FAILURE] * 2
    # 40 more fit; in one packet, the 41st and 42nd new filters fail and the filters between them don't,
    # and repeating filters (held already, or earlier in the packet) costs nothing
    second = [
        *_own_filters("alpha", 10, 39),
        _own_filters("alpha", 0, 1)[0],  # held since the first SUBSCRIBE
        _own_filters("alpha", 10, 1)[0],  # earlier in this packet
        *_own_filters("alpha", 49, 2),  # the 50th new filter, then the 51st
        _own_filters("alpha", 5, 1)[0],  # held: a re-subscription still succeeds at the limit
        *_own_filters("alpha", 51, 1),
    ]
    codes = [r.value for r in client.subscribe(*second)]
    assert codes == [1] * 39 + [1, 1] + [1, SUBACK_FAILURE] + [1] + [SUBACK_FAILURE]
    held = broker.on_loop(lambda: broker.broker.subscriptions_of("alpha"))
    assert held == frozenset(_own_filters("alpha", 0, 50))
    # a refused filter gets nothing; the connection stays
    broker.publish(_own_filters("alpha", 50, 1)[0], b"refused filter")
    broker.publish(_own_filters("alpha", 49, 1)[0], b"50th filter")
    assert_next_payload(client, b"50th filter")
    # unsubscribing makes room for exactly one more
    client.unsubscribe(_own_filters("alpha", 3, 1)[0])
    assert [r.value for r in client.subscribe(*_own_filters("alpha", 60, 2))] == [1, SUBACK_FAILURE]
    assert not client.disconnected.is_set()


def test_subscription_limit_counts_a_resumed_sessions_filters_and_not_another_clients(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    alpha = make_device("alpha")
    client = clients.paho(broker.port, alpha, clean_session=False)
    client.connect()
    assert [r.value for r in client.subscribe(*_own_filters("alpha", 0, 50))] == [1] * 50
    client.close()
    assert broker.call(broker.broker.wait_closed(alpha.principal))
    resumed = clients.paho(broker.port, alpha, clean_session=False)
    resumed.connect()
    # the session kept its 50 filters (as AWS IoT restores a persistent session's subscriptions)
    assert [r.value for r in resumed.subscribe(*_own_filters("alpha", 50, 1))] == [SUBACK_FAILURE]
    # a Greengrass-style second connection of the thing is another client with its own 50
    component = clients.paho(broker.port, alpha, client_id="alpha#component")
    component.connect()
    assert [r.value for r in component.subscribe(*_own_filters("alpha", 0, 50))] == [1] * 50
    fresh = clients.paho(broker.port, alpha, clean_session=True)  # takes over; a clean session has none
    fresh.connect()
    assert [r.value for r in fresh.subscribe(*_own_filters("alpha", 50, 1))] == [1]


def test_message_handler_failures_are_contained(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    def failing(topic: str, payload: bytes, connection: Connection) -> None:
        raise RuntimeError("handler bug")

    async def failing_async(topic: str, payload: bytes, connection: Connection) -> None:
        raise RuntimeError("async handler bug")

    broker.on_loop(lambda: broker.broker.on_message(failing))
    broker.on_loop(lambda: broker.broker.on_message(failing_async))
    alpha = make_device("alpha")
    client = clients.paho(broker.port, alpha)
    client.connect()
    client.subscribe(Topics.create("alpha"))
    client.publish(Topics.create("alpha"), b"x").wait_for_publish(WAIT)
    assert broker.next_message()[1] == b"x"
    assert_next_payload(client, b"x")
    assert not client.disconnected.is_set()


# --------------------------------------------------------------- told of subscriptions (issue 12)


def test_the_subscription_hook_hears_what_was_granted_and_what_a_resumed_session_brings_back(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    heard: queue.Queue[tuple[str, list[str]]] = queue.Queue()
    broker.on_loop(lambda: broker.broker.on_subscribed(lambda c, f: heard.put((c.client_id, f))))
    alpha = make_device("alpha")
    client = clients.paho(broker.port, alpha, clean_session=False)
    client.connect()
    mine, denied, other = Topics.notify_next("alpha"), Topics.notify_next("beta"), Topics.create("alpha")
    assert [r.value for r in client.subscribe(mine, denied, other)] == [1, SUBACK_FAILURE, 1]
    assert heard.get(timeout=WAIT) == ("alpha", [mine, other])  # the denied filter is not among them
    client.close()
    assert broker.call(broker.broker.wait_closed(alpha.principal))
    # a resumed persistent session holds its filters again without any SUBSCRIBE
    resumed = clients.paho(broker.port, alpha, clean_session=False)
    resumed.connect()
    assert heard.get(timeout=WAIT) == ("alpha", sorted([mine, other]))
    # a clean session starts with none: nothing to hear until it subscribes
    fresh = clients.paho(broker.port, alpha, clean_session=True)
    fresh.connect()
    fresh.subscribe(other)
    assert heard.get(timeout=WAIT) == ("alpha", [other])


def test_what_the_subscription_hook_publishes_reaches_that_client_only_after_its_suback(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    topic = Topics.notify_next("alpha")

    def tell(connection: Connection, filters: list[str]) -> None:
        assert broker.broker.publish_to(connection.client_id, topic, f"to {connection.client_id}".encode(), 0)

    def failing(_connection: Connection, _filters: list[str]) -> None:
        raise RuntimeError("hook bug")  # contained: the other hook still runs, the connection stays

    broker.on_loop(lambda: broker.broker.on_subscribed(failing))
    broker.on_loop(lambda: broker.broker.on_subscribed(tell))
    alpha = make_device("alpha")
    main = clients.paho(broker.port, alpha)
    main.connect()
    main.subscribe(topic)
    assert_next_payload(main, b"to alpha")
    component = clients.paho(broker.port, alpha, client_id="alpha#component")
    component.connect()
    component.subscribe(topic)
    assert_next_payload(component, b"to alpha#component")
    broker.publish(topic, b"to both", qos=0)
    assert_next_payload(main, b"to both")  # main got nothing when the component subscribed
    assert_next_payload(component, b"to both")
    # nobody subscribed, no such client: nothing is sent
    assert not broker.on_loop(lambda: broker.broker.publish_to("alpha", Topics.create("alpha"), b"x", 0))
    assert not broker.on_loop(lambda: broker.broker.publish_to("nobody", topic, b"x", 0))
    assert not main.disconnected.is_set() and not component.disconnected.is_set()


@pytest.mark.parametrize(
    "topic_filter",
    [
        "$aws/things/alpha/jobs/notify-next",
        "$aws/things/alpha/jobs/#",
        "$aws/things/+/jobs/notify-next",
        "$aws/things/alpha/jobs/notify-next/#",
        "#",
        "+/things/alpha/jobs/notify-next",
        "$aws/things/alpha/jobs",
        "$aws/things/alpha/jobs/+",
        "$aws/things/alpha/jobs/notify-next/+",
        "$aws/things/beta/jobs/notify-next",
    ],
)
@pytest.mark.parametrize("topic", ["$aws/things/alpha/jobs/notify-next", "a/b", "a"])
def test_filter_matches_agrees_with_the_subscription_index(topic_filter: str, topic: str) -> None:
    index: SubscriptionIndex[Connection] = SubscriptionIndex({})
    subscriber = Connection("alpha", "0" * 64, "alpha")
    for f in (topic_filter, topic_filter.replace("$aws/things/alpha/jobs", "a/b")):
        index.clear()
        index.add(f, subscriber, 1)
        assert filter_matches(f, topic) == ("alpha" in index.match(topic)), (f, topic)


# ------------------------------------------------------------------------------ kicking clients


def test_disconnect_kicks_every_live_connection_of_the_certificate(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    alpha, beta = make_device("alpha"), make_device("beta")
    main = clients.paho(broker.port, alpha)
    main.connect()
    extra = clients.crt(broker.port, alpha, client_id="alpha#2")
    extra.connect()
    bystander = clients.paho(broker.port, beta)
    bystander.connect()
    bystander.subscribe(Topics.notify_next("beta"))

    assert broker.disconnect(alpha.principal) == 2
    assert main.disconnected.wait(WAIT)
    assert extra.interrupted.wait(WAIT)
    assert broker.disconnect("0" * 64) == 0
    broker.publish(Topics.notify_next("beta"), b"unaffected")
    assert_next_payload(bystander, b"unaffected")
    assert [c.principal for c in broker.on_loop(broker.broker.connections)] == [beta.principal]


def test_persistent_session_receives_qos1_sent_while_offline(
    broker: BrokerHarness, make_device: MakeDevice, clients: Clients
) -> None:
    alpha = make_device("alpha")
    client = clients.crt(broker.port, alpha)
    client.connect()
    client.subscribe(Topics.notify_next("alpha"))
    client.close()
    assert broker.call(broker.broker.wait_closed(alpha.principal))
    broker.publish(Topics.notify_next("alpha"), b"qos1 while away", qos=1)
    broker.publish(Topics.notify_next("alpha"), b"qos0 while away", qos=0)  # not queued (MQTT-3.1.2-5)
    assert client.connect()["session_present"] is True
    # Delivered as a message of the established subscription: RETAIN 0 (MQTT-3.3.1-9; amqtt sends 1).
    assert client.next_message() == Received(Topics.notify_next("alpha"), b"qos1 while away", 1, retain=False)
    broker.publish(Topics.notify_next("alpha"), b"after")
    assert_next_payload(client, b"after")


# --------------------------------------------------------------------------------- keep-alive


def test_silent_client_is_dropped_after_one_and_a_half_keepalives(
    broker: BrokerHarness, local_ca: LocalCa, make_device: MakeDevice
) -> None:
    alpha = make_device("alpha")
    with _raw_tls(broker.port, local_ca.files.root_ca, alpha) as sock:
        sock.sendall(_connect_packet("alpha", keepalive=1))
        assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK accepted
        started = time.monotonic()
        assert _read_until_closed(sock) == b""  # then silence (no PINGREQ) until the broker closes
        assert 1.0 <= time.monotonic() - started < WAIT


def test_broker_publish_rejects_qos2(broker: BrokerHarness) -> None:
    with pytest.raises(ValueError, match="qos"):
        broker.publish(Topics.notify_next("alpha"), b"x", qos=2)
