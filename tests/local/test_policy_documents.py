"""IoT policy document evaluation (the registry's policies, beyond the protocol's own topics)."""

from __future__ import annotations

from typing import Any

import pytest

from certrotator.local.policy_documents import policy_allows

TELEMETRY: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["iot:Publish", "iot:Receive"],
            "Resource": "arn:aws:iot:*:*:topic/telemetry/${iot:Connection.Thing.ThingName}/*",
        },
        {
            "Effect": "Allow",
            "Action": "iot:Subscribe",
            "Resource": ["arn:aws:iot:*:*:topicfilter/telemetry/${iot:Connection.Thing.ThingName}/*"],
        },
        {"Effect": "Deny", "Action": "iot:*", "Resource": "arn:aws:iot:*:*:topic/telemetry/*/secret"},
    ],
}


@pytest.mark.parametrize(
    ("topic", "action", "allowed"),
    [
        ("telemetry/dev1/temp", "publish", True),
        ("telemetry/dev1/temp", "receive", True),
        ("telemetry/dev2/temp", "publish", False),
        ("telemetry/dev1/+", "subscribe", True),
        ("telemetry/dev1/temp", "subscribe", True),
        ("telemetry/+/temp", "subscribe", False),
        ("telemetry/dev1/secret", "publish", False),  # explicit Deny wins over Allow
        ("other/dev1", "publish", False),
        ("telemetry/dev1/temp", "connect", False),
    ],
)
def test_policy_evaluation(topic: str, action: str, allowed: bool) -> None:
    assert policy_allows([TELEMETRY], "dev1", "dev1", topic, action) is allowed


def test_no_documents_or_malformed_documents_deny() -> None:
    assert not policy_allows([], "dev1", "dev1", "a/b", "publish")
    assert not policy_allows([{"Statement": "nonsense"}, {}], "dev1", "dev1", "a/b", "publish")


def test_wildcards_are_glob_not_character_classes() -> None:
    doc = {
        "Statement": {"Effect": "Allow", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/a/[x]?"}
    }
    assert policy_allows([doc], "t", "t", "a/[x]1", "publish")
    assert not policy_allows([doc], "t", "t", "a/x1", "publish")


def test_client_id_variable() -> None:
    doc = {
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "iot:Publish",
                "Resource": "arn:aws:iot:*:*:topic/c/${iot:ClientId}",
            }
        ]
    }
    assert policy_allows([doc], "t", "t#2", "c/t#2", "publish")
    assert not policy_allows([doc], "t", "t#2", "c/t", "publish")
