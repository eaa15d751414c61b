"""IoT policy documents as AWS IoT evaluates them, for what the default topic policy does not cover.

Supported: Allow/Deny statements over iot:Publish, iot:Receive (resource `...:topic/<topic>`),
iot:Subscribe (`...:topicfilter/<filter>`) and iot:* ; `*` and `?` wildcards in resources; the
policy variables `${iot:Connection.Thing.ThingName}` and `${iot:ClientId}`. An explicit Deny wins.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any

_ACTIONS = {"publish": "iot:Publish", "receive": "iot:Receive", "subscribe": "iot:Subscribe"}
_RESOURCE_KIND = {"publish": "topic", "receive": "topic", "subscribe": "topicfilter"}


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    return []


def _matches(pattern: str, resource: str) -> bool:
    # fnmatch's [] classes do not exist in IAM patterns: escape them, keep * and ?
    translated = "".join("[[]" if c == "[" else c for c in pattern)
    return re.fullmatch(fnmatch.translate(translated), resource) is not None


def policy_allows(
    documents: Iterable[dict[str, Any]], thing: str, client_id: str, topic: str, action: str
) -> bool:
    if action not in _ACTIONS:
        return False
    resource = f"{_RESOURCE_KIND[action]}/{topic}"
    allowed = False
    for document in documents:
        for statement in _as_list_of_dicts(document.get("Statement")):
            actions = _as_list(statement.get("Action"))
            if not any(a in (_ACTIONS[action], "iot:*", "*") for a in actions):
                continue
            for raw in _as_list(statement.get("Resource")):
                pattern = raw.replace("${iot:Connection.Thing.ThingName}", thing).replace(
                    "${iot:ClientId}", client_id
                )
                # arn:aws:iot:region:account:topic/...: compare from the resource type on
                tail = (
                    pattern.split(":", 5)[5]
                    if pattern.startswith("arn:") and pattern.count(":") >= 5
                    else pattern
                )
                if _matches(tail, resource):
                    if statement.get("Effect") == "Deny":
                        return False
                    if statement.get("Effect") == "Allow":
                        allowed = True
    return allowed


def _as_list_of_dicts(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []
