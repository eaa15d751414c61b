"""Subscriptions indexed by topic level, so routing a message costs O(topic depth), not O(subscriptions).

amqtt 0.12.1 matches every published topic against every subscribed filter and scans every filter when
a session ends; with 1,000 devices × 9 filters that is ~9,000 matches per message. This index keeps the
same `filter -> [(session, qos)]` lists amqtt exposes (it shares amqtt's dict) plus a level tree over
them and each client's own filters.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Generic, Protocol, TypeVar


class _Subscriber(Protocol):
    @property
    def client_id(self) -> str | None: ...


S = TypeVar("S", bound=_Subscriber)


def valid_topic_filter(topic_filter: str) -> bool:
    """MQTT 3.1.1 §4.7: non-empty; `#` alone in the last level; `+` alone in its level."""
    if not topic_filter or "\0" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def valid_topic_name(topic: str) -> bool:
    """MQTT 3.1.1 §4.7.3: a topic name is non-empty and has no wildcards."""
    return bool(topic) and "+" not in topic and "#" not in topic and "\0" not in topic


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Does the filter match the topic name (MQTT 3.1.1 §4.7, as `SubscriptionIndex.match`)? Pure."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # MQTT-4.7.2-1
    levels, wanted = topic_filter.split("/"), topic.split("/")
    for depth, level in enumerate(levels):
        if level == "#":
            return True  # "a/#" also matches "a"
        if depth >= len(wanted) or (level != "+" and level != wanted[depth]):
            return False
    return len(levels) == len(wanted)


class _Node(Generic[S]):
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        self.subscribers: list[tuple[S, int]] | None = None


class SubscriptionIndex(Generic[S]):
    def __init__(self, by_filter: MutableMapping[str, list[tuple[S, int]]]) -> None:
        self._by_filter = by_filter
        self._root: _Node[S] = _Node()
        self._filters_of: dict[str, set[str]] = {}

    def add(self, topic_filter: str, session: S, qos: int) -> None:
        """Subscribe; a repeated subscription replaces the old one's QoS (MQTT-3.8.4-3)."""
        client_id = session.client_id or ""
        subscribers = self._by_filter.get(topic_filter)
        if subscribers is None:
            node = self._root
            for level in topic_filter.split("/"):
                node = node.children.setdefault(level, _Node())
            subscribers = node.subscribers = []
            self._by_filter[topic_filter] = subscribers
        for index, (existing, _qos) in enumerate(subscribers):
            if existing.client_id == client_id:
                subscribers[index] = (session, qos)
                break
        else:
            subscribers.append((session, qos))
        self._filters_of.setdefault(client_id, set()).add(topic_filter)

    def remove(self, topic_filter: str, client_id: str | None) -> int:
        """Unsubscribe; returns 1 if there was such a subscription, else 0."""
        subscribers = self._by_filter.get(topic_filter)
        if not subscribers:
            return 0
        for index, (existing, _qos) in enumerate(subscribers):
            if existing.client_id == client_id:
                del subscribers[index]
                break
        else:
            return 0
        own = self._filters_of.get(client_id or "")
        if own is not None:
            own.discard(topic_filter)
            if not own:
                del self._filters_of[client_id or ""]
        if not subscribers:
            del self._by_filter[topic_filter]
            self._prune(topic_filter)
        return 1

    def remove_all(self, client_id: str | None) -> None:
        for topic_filter in list(self._filters_of.get(client_id or "", ())):
            self.remove(topic_filter, client_id)

    def filters_of(self, client_id: str) -> frozenset[str]:
        return frozenset(self._filters_of.get(client_id, ()))

    def count_of(self, client_id: str) -> int:
        """How many filters `client_id` is subscribed to."""
        return len(self._filters_of.get(client_id, ()))

    def holds(self, client_id: str, topic_filter: str) -> bool:
        """Has `client_id` subscribed to exactly `topic_filter`? O(1)."""
        return topic_filter in self._filters_of.get(client_id, ())

    def match(self, topic: str) -> dict[str, tuple[S, int]]:
        """Every subscriber whose filter matches `topic`, once each, with its highest granted QoS."""
        found: dict[str, tuple[S, int]] = {}

        def collect(node: _Node[S]) -> None:
            for session, qos in node.subscribers or ():
                key = session.client_id or ""
                if key not in found or found[key][1] < qos:
                    found[key] = (session, qos)

        levels = topic.split("/")
        # MQTT-4.7.2-1: a topic starting with `$` is not matched by a filter starting with a wildcard.
        wildcards_at_root = not topic.startswith("$")
        nodes = [self._root]
        for depth, level in enumerate(levels):
            following: list[_Node[S]] = []
            for node in nodes:
                if depth > 0 or wildcards_at_root:
                    if (multi := node.children.get("#")) is not None:
                        collect(multi)
                    if (single := node.children.get("+")) is not None:
                        following.append(single)
                if (exact := node.children.get(level)) is not None:
                    following.append(exact)
            if not following:
                return found
            nodes = following
        for node in nodes:
            collect(node)
            if (multi := node.children.get("#")) is not None:  # "a/#" also matches "a"
                collect(multi)
        return found

    def clear(self) -> None:
        self._by_filter.clear()
        self._root = _Node()
        self._filters_of.clear()

    def _prune(self, topic_filter: str) -> None:
        path = [self._root]
        levels = topic_filter.split("/")
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        path[-1].subscribers = None
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.children or node.subscribers is not None:
                return
            del path[depth - 1].children[levels[depth - 1]]
