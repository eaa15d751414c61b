"""boto3 adapters for the ports: jobs data, rotation state, replies to devices, notifications.

The registry and the issuers live in `registry` and `issuers`; everything is re-exported here so
the Lambda entry points have one place to import from. One API call per port method.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

from botocore.exceptions import ClientError

from certrotator.backend.aws.clients import error_code
from certrotator.backend.aws.issuers import IotIssuer, PrivateCaIssuer
from certrotator.backend.aws.registry import IotRegistry, certificate_arn
from certrotator.backend.ports import JobExecution, Notification, RotationState
from certrotator.protocol import JobExecutionStatus, encode

if TYPE_CHECKING:
    from certrotator.backend.aws.clients import Clients

__all__ = [
    "DEFAULT_SHADOW_NAME",
    "IotDataPublisher",
    "IotIssuer",
    "IotJobsData",
    "IotRegistry",
    "PrivateCaIssuer",
    "ShadowStateStore",
    "SnsNotifier",
    "certificate_arn",
]

DEFAULT_SHADOW_NAME: Final = "AWSLabsCertificateRotator"


class IotJobsData:
    """`ports.JobsData` over the IoT Jobs data plane (the API devices use, called as the backend)."""

    def __init__(self, clients: Clients) -> None:
        self._clients = clients

    def describe_execution(self, thing: str, job_id: str) -> JobExecution | None:
        try:
            response = self._clients.iot_jobs_data.describe_job_execution(
                jobId=job_id, thingName=thing, includeJobDocument=True
            )
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return None
            raise
        execution = response["execution"]
        return JobExecution(
            thing=execution.get("thingName", thing),
            job_id=execution.get("jobId", job_id),
            status=JobExecutionStatus(execution.get("status", "")),
            document=_parse_document(execution.get("jobDocument")),
        )


def _parse_document(text: str | None) -> dict[str, Any] | None:
    # A document that is not a JSON object is simply not a rotation document; the handler says so.
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class ShadowStateStore:
    """`ports.RotationStateStore` in a named shadow of the thing, under `state.reported`.

    Every save writes all of RotationState's keys, so the shadow's merge-on-update semantics never
    leave a stale field behind.
    """

    def __init__(self, clients: Clients, shadow_name: str = DEFAULT_SHADOW_NAME) -> None:
        self._clients = clients
        self._shadow = shadow_name

    def load(self, thing: str) -> RotationState | None:
        try:
            response = self._clients.iot_data.get_thing_shadow(thingName=thing, shadowName=self._shadow)
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return None
            raise
        document = json.loads(response["payload"].read() or b"{}")
        reported = (document.get("state") or {}).get("reported") or {}
        if not reported:
            return None
        try:
            return RotationState.from_dict(reported)
        except (KeyError, ValueError) as exc:
            # Not ours to guess at: a state the handlers cannot trust must stop the handler.
            raise ValueError(
                f"shadow {self._shadow!r} of thing {thing!r} holds no valid rotation state: {exc!r}"
            ) from exc

    def save(self, thing: str, state: RotationState) -> None:
        self._clients.iot_data.update_thing_shadow(
            thingName=thing,
            shadowName=self._shadow,
            payload=encode({"state": {"reported": state.to_dict()}}),
        )

    def clear(self, thing: str) -> None:
        try:
            self._clients.iot_data.delete_thing_shadow(thingName=thing, shadowName=self._shadow)
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise


class IotDataPublisher:
    """`ports.Publisher` through the IoT data plane's HTTPS publish.

    QoS 1: the publish call costs the same either way, and a subscriber that asked for QoS 1 (a plain
    device with a persistent session) then gets the reply redelivered. The device agent subscribes
    with QoS 0, so for it delivery stays QoS 0 (delivery QoS is the lower of the two).
    """

    def __init__(self, clients: Clients) -> None:
        self._clients = clients

    def publish(self, topic: str, message: dict[str, Any]) -> None:
        self._clients.iot_data.publish(topic=topic, qos=1, payload=encode(message))


_SUBJECT_MAX: Final = 100  # SNS limit for email subjects


class SnsNotifier:
    """`ports.Notifier` on an SNS topic: JSON message, plus attributes for subscription filters."""

    def __init__(self, clients: Clients, topic_arn: str) -> None:
        self._clients = clients
        self._topic_arn = topic_arn

    def notify(self, notification: Notification) -> None:
        subject = f"Certificate rotation {notification.status} for {notification.thing}"
        self._clients.sns.publish(
            TopicArn=self._topic_arn,
            Subject=subject[:_SUBJECT_MAX],
            Message=json.dumps(notification.to_dict(), indent=2),
            MessageAttributes={
                "status": {"DataType": "String", "StringValue": notification.status},
                "thingName": {"DataType": "String", "StringValue": notification.thing},
            },
        )
