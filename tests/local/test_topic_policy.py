"""The default topic policy, the client-id rule and the subscription index the broker routes with."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from certrotator.local.policy import default_topic_policy
from certrotator.local.topic_tree import SubscriptionIndex, valid_topic_filter, valid_topic_name
from certrotator.protocol import Topics, client_id_is_for_thing


@pytest.mark.parametrize(
    ("topic", "action", "allowed"),
    [
        (Topics.job_update("t1", "job-1"), "publish", True),
        (Topics.next_get("t1"), "publish", True),
        (Topics.create("t1"), "publish", True),
        (Topics.accepted(Topics.commit("t1")), "receive", True),
        (Topics.notify_next("t1"), "subscribe", True),
        ("$aws/things/t1/jobs/+/update/accepted", "subscribe", True),
        ("awslabs/things/t1/certificate/#", "subscribe", True),
        ("$aws/things/t1/jobs/#", "subscribe", True),
        # another thing, wildcards over things, everything else
        (Topics.create("t2"), "publish", False),
        (Topics.notify_next("t2"), "subscribe", False),
        ("$aws/things/+/jobs/#", "subscribe", False),
        ("$aws/things/#", "subscribe", False),
        ("awslabs/#", "subscribe", False),
        ("#", "subscribe", False),
        ("+/things/t1/jobs/notify-next", "subscribe", False),
        ("$aws/+/t1/jobs/notify-next", "subscribe", False),
        ("$aws/things/t1/jobs", "subscribe", False),  # the prefix itself is no topic of the thing
        ("$aws/things/t1/shadow/update", "publish", False),
        ("$aws/things/t1/jobs/+/update", "publish", False),  # wildcards are not topic names
        ("$aws/things/t1/jobs/j/get", "delete", False),  # unknown action
        ("$aws/things/t1x/jobs/j/get", "publish", False),
    ],
)
def test_default_topic_policy(topic: str, action: str, allowed: bool) -> None:
    assert default_topic_policy("t1", topic, action) is allowed


def test_default_topic_policy_refuses_an_invalid_thing_name() -> None:
    assert not default_topic_policy("+", "$aws/things/+/jobs/x", "subscribe")
    assert not default_topic_policy("a/b", "$aws/things/a/b/jobs/x", "publish")


@pytest.mark.parametrize(
    ("client_id", "matches"),
    [
        ("t1", True),
        ("t1#ipc", True),
        ("t1#", True),
        ("t10", False),
        ("t", False),
        ("x#t1", False),
        ("", False),
    ],
)
def test_client_id_is_for_thing(client_id: str, matches: bool) -> None:
    assert client_id_is_for_thing(client_id, "t1") is matches


@pytest.mark.parametrize(
    ("topic_filter", "valid"),
    [
        ("a/b", True),
        ("a/+/c", True),
        ("a/#", True),
        ("#", True),
        ("+", True),
        ("a/b#", False),
        ("a/#/c", False),
        ("a+/b", False),
        ("", False),
    ],
)
def test_valid_topic_filter(topic_filter: str, valid: bool) -> None:
    assert valid_topic_filter(topic_filter) is valid


def test_valid_topic_name() -> None:
    assert valid_topic_name("a/b")
    assert not valid_topic_name("a/+")
    assert not valid_topic_name("a/#")
    assert not valid_topic_name("")


@dataclass(frozen=True)
class FakeSession:
    client_id: str


def test_index_matches_like_mqtt() -> None:
    by_filter: dict[str, list[tuple[FakeSession, int]]] = {}
    index: SubscriptionIndex[FakeSession] = SubscriptionIndex(by_filter)
    a, b, c, d = FakeSession("a"), FakeSession("b"), FakeSession("c"), FakeSession("d")
    index.add("x/y/z", a, 1)
    index.add("x/+/z", b, 0)
    index.add("x/#", c, 1)
    index.add("#", d, 0)
    assert set(index.match("x/y/z")) == {"a", "b", "c", "d"}
    assert set(index.match("x")) == {"c", "d"}  # "x/#" also matches its parent
    assert set(index.match("x/y")) == {"c", "d"}
    assert set(index.match("q")) == {"d"}
    # MQTT-4.7.2-1: "$" topics are not matched by a leading wildcard
    index.add("$aws/+/t1", a, 1)
    assert set(index.match("$aws/things/t1")) == {"a"}
    assert by_filter.keys() == {"x/y/z", "x/+/z", "x/#", "#", "$aws/+/t1"}  # amqtt's view is kept in sync


def test_index_keeps_one_subscription_per_client_and_filter_with_the_highest_qos() -> None:
    index: SubscriptionIndex[FakeSession] = SubscriptionIndex({})
    a = FakeSession("a")
    index.add("t", a, 0)
    index.add("t", a, 1)  # resubscribing replaces (MQTT-3.8.4-3)
    index.add("#", a, 0)
    assert index.match("t") == {"a": (a, 1)}  # overlapping filters deliver once, at the highest QoS


def test_index_removal_prunes_and_remove_all_touches_only_the_clients_filters() -> None:
    by_filter: dict[str, list[tuple[FakeSession, int]]] = {}
    index: SubscriptionIndex[FakeSession] = SubscriptionIndex(by_filter)
    a, b = FakeSession("a"), FakeSession("b")
    for topic_filter in ("p/1", "p/2", "p/+"):
        index.add(topic_filter, a, 1)
    index.add("p/1", b, 1)
    assert index.remove("p/1", "a") == 1
    assert index.remove("p/1", "a") == 0
    assert index.filters_of("a") == {"p/2", "p/+"}
    index.remove_all("a")
    assert index.filters_of("a") == frozenset()
    assert by_filter == {"p/1": [(b, 1)]}
    assert set(index.match("p/1")) == {"b"}
    index.remove_all("b")
    assert by_filter == {}
    assert index.match("p/1") == {}


def test_index_counts_each_clients_distinct_filters() -> None:
    """What the broker's per-connection subscription limit counts."""
    index: SubscriptionIndex[FakeSession] = SubscriptionIndex({})
    a, b = FakeSession("a"), FakeSession("b")
    index.add("p/1", a, 0)
    index.add("p/1", a, 1)  # the same filter again: still one
    index.add("p/+", a, 1)
    index.add("p/1", b, 1)
    assert (index.count_of("a"), index.count_of("b"), index.count_of("nobody")) == (2, 1, 0)
    assert index.holds("a", "p/+") and not index.holds("b", "p/+") and not index.holds("a", "p/2")
    index.remove("p/+", "a")
    assert index.count_of("a") == 1 and not index.holds("a", "p/+")
