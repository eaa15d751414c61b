"""Who may connect to the local broker and which topics a thing may use.

The broker asks a `ConnectionAuthorizer` (the engine implements it on its registry); the defaults here
are what AWS IoT enforces for rotation: a certificate connects as its thing (client id = thing name or
`{thing}#...`, as Greengrass's extra connections do), and a thing uses only its own Jobs and
certificate topics, the set the Greengrass recipe grants.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol

from certrotator.protocol import ProtocolError, Topics, validate_thing_name

TopicAction = Literal["publish", "subscribe", "receive"]


@dataclass(frozen=True, slots=True)
class Connection:
    """What the broker knows of one live connection and the client cannot forge."""

    client_id: str
    principal: str  # certificate id (SHA-256 of the DER client certificate) of THIS connection
    thing: str


class ConnectionAuthorizer(Protocol):
    """Called on the broker's event loop; keep both methods fast and non-blocking."""

    def authorize_connect(self, client_id: str, principal: str) -> str | None:
        """The thing name if the certificate is registered ACTIVE, attached to a thing, and the client id
        is that thing's (see `protocol.client_id_is_for_thing`); else None (CONNACK refused)."""
        ...

    def authorize_topic(self, thing: str, topic: str, action: TopicAction) -> bool:
        """May `thing` publish to / subscribe to (a filter) / receive from `topic`?"""
        ...


@lru_cache(maxsize=8192)
def _own_prefixes(thing: str) -> tuple[tuple[str, ...], ...]:
    """The level lists every topic of `thing` starts with, derived from the protocol's topic builders."""
    jobs = Topics.notify_next(thing).split("/")[:-1]  # $aws/things/{thing}/jobs
    certificate = Topics.create(thing).split("/")[:-1]  # awslabs/things/{thing}/certificate
    return tuple(jobs), tuple(certificate)


def default_topic_policy(thing: str, topic: str, action: TopicAction | str) -> bool:
    """A thing may use only `$aws/things/{thing}/jobs/...` and `awslabs/things/{thing}/certificate/...`.

    The prefix levels must match literally, so a wildcard can only appear below them: a subscription
    to `$aws/things/+/jobs/#`, `awslabs/#` or `#` is denied, `$aws/things/{thing}/jobs/+/get/accepted`
    is allowed. Wildcards are never allowed outside subscribe (they are not topic names).
    """
    if action not in ("publish", "subscribe", "receive"):
        return False
    try:
        validate_thing_name(thing)
    except ProtocolError:
        return False
    if action != "subscribe" and ("+" in topic or "#" in topic):
        return False
    levels = topic.split("/")
    for prefix in _own_prefixes(thing):
        if len(levels) > len(prefix) and tuple(levels[: len(prefix)]) == prefix:
            return True
    return False
