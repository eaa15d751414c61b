"""The announcement topic: part of the protocol, parsed like the others, never a reply topic."""

from __future__ import annotations

import pytest

from certrotator.local.policy import default_topic_policy
from certrotator.protocol import ParsedTopic, ProtocolError, TopicKind, Topics, parse_topic

THING = "core-1"


def test_announce_topic_is_under_the_thing_certificate_topics() -> None:
    assert Topics.announce(THING) == f"awslabs/things/{THING}/certificate/announce"
    assert parse_topic(Topics.announce(THING)) == ParsedTopic(TopicKind.ANNOUNCE, THING)


def test_announce_has_no_replies_and_is_checked_like_the_others() -> None:
    for reply in (Topics.accepted, Topics.rejected):
        with pytest.raises(ProtocolError):
            parse_topic(reply(Topics.announce(THING)))
    with pytest.raises(ProtocolError):
        parse_topic("awslabs/things/bad name/certificate/announce")


def test_the_device_does_not_receive_its_own_announcement() -> None:
    # the agent's subscriptions must not match it (a broker echoes a client's own publishes)
    topic = Topics.announce(THING).split("/")
    for topic_filter in Topics.device_subscriptions(THING):
        levels = topic_filter.split("/")
        matches = len(levels) == len(topic) and all(f in ("+", t) for f, t in zip(levels, topic, strict=True))
        assert not matches, topic_filter


def test_the_local_broker_lets_a_thing_announce_only_for_itself() -> None:
    assert default_topic_policy(THING, Topics.announce(THING), "publish")
    assert not default_topic_policy(THING, Topics.announce("core-2"), "publish")
