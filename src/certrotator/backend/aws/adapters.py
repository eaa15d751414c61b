"""boto3 adapters for the ports: jobs data, rotation state, replies to devices, notifications.

The registry and the issuers live in `registry` and `issuers`; everything is re-exported here so
the Lambda entry points have one place to import from. One API call per port method.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from botocore.exceptions import ClientError

from certrotator.backend.aws.clients import error_code, is_not_found, unless_missing
from certrotator.backend.aws.issuers import IotIssuer, PrivateCaIssuer
from certrotator.backend.aws.registry import IotRegistry, certificate_arn
from certrotator.backend.ports import JobExecution, Notification, RotationState
from certrotator.protocol import JobExecutionStatus, encode

if TYPE_CHECKING:
    from certrotator.backend.aws.clients import Clients

__all__ = [
    "DEFAULT_SHADOW_NAME",
    "MIN_STATE_KEY_BYTES",
    "STATE_KEY_SECRET_ARN_ENV",
    "IotDataPublisher",
    "IotIssuer",
    "IotJobDocuments",
    "IotJobsData",
    "IotRegistry",
    "PrivateCaIssuer",
    "SecretStateKey",
    "ShadowStateStore",
    "SnsNotifier",
    "StateKey",
    "certificate_arn",
    "check_state_key",
    "state_mac",
]

log = logging.getLogger(__name__)

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
            if is_not_found(exc):
                return None
            if error_code(exc) != "TerminalStateException":
                raise
            # The data plane may refuse to describe an execution that has ended (410); the control
            # plane tells its status (the document does not matter once it is not IN_PROGRESS).
            return self._ended_execution(thing, job_id)
        execution = response["execution"]
        return JobExecution(
            thing=execution.get("thingName", thing),
            job_id=execution.get("jobId", job_id),
            status=JobExecutionStatus(execution.get("status", "")),
            document=_parse_document(execution.get("jobDocument")),
        )

    def _ended_execution(self, thing: str, job_id: str) -> JobExecution | None:
        response = unless_missing(
            lambda: self._clients.iot.describe_job_execution(jobId=job_id, thingName=thing)
        )
        if response is None:
            return None
        status = JobExecutionStatus(response["execution"].get("status", ""))
        return JobExecution(thing=thing, job_id=job_id, status=status, document=None)


class IotJobDocuments:
    """A job's document by job id (control plane `GetJobDocument`): the terminal handler's question
    "is this a rotation job?", asked once per job and container (`backend.rotation_jobs`)."""

    def __init__(self, clients: Clients) -> None:
        self._clients = clients

    def document(self, thing: str, job_id: str) -> object | None:
        """The document (a dict, or the raw text if it is not a JSON object); None if the job is gone."""
        response = unless_missing(lambda: self._clients.iot.get_job_document(jobId=job_id))
        if response is None:
            return None
        text = response.get("document", "")
        parsed = _parse_document(text)
        return parsed if parsed is not None else text


def _parse_document(text: str | None) -> dict[str, Any] | None:
    # A document that is not a JSON object is simply not a rotation document; the handler says so.
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------------------------ rotation state

STATE_KEY_SECRET_ARN_ENV: Final = "STATE_KEY_SECRET_ARN"
MIN_STATE_KEY_BYTES: Final = 32  # HMAC-SHA256's output size; shorter keys weaken the MAC
MAC_FIELD: Final = "mac"
_STATE_FIELDS: Final = ("jobId", "oldCertificateId", "newCertificateId", "progress")
_MAC_CONTEXT: Final = "certrotator/rotation-state/v1"

StateKey = Callable[[], bytes]
"""Where a `ShadowStateStore` gets its MAC key from, asked on every load and save."""


class SecretStateKey:
    """The rotation-state key from AWS Secrets Manager, fetched once per container.

    The secret's `SecretString` is the key, as its UTF-8 bytes (a `SecretBinary`, as it is), and must
    be at least 32 bytes long: a CDK `Secret` with a generated 32-character (or longer) password does.
    `Clients` caches the value, so only a container's first use calls `GetSecretValue`; a secret
    rotated in Secrets Manager reaches containers started afterwards (and states written with the old
    key are then ignored as unauthenticated, so in-flight rotations fail safe).
    """

    def __init__(self, clients: Clients, secret_arn: str) -> None:
        self._clients = clients
        self.secret_arn = secret_arn

    def __call__(self) -> bytes:
        return check_state_key(self._clients.secret_value(self.secret_arn))


def check_state_key(key: bytes) -> bytes:
    """The key, if it is long enough to be a rotation-state key; else ValueError."""
    if len(key) < MIN_STATE_KEY_BYTES:
        raise ValueError(
            f"the rotation-state key is {len(key)} bytes long; it must be at least {MIN_STATE_KEY_BYTES}"
            " (a SecretString counts its UTF-8 bytes)"
        )
    return key


def state_mac(key: bytes, thing: str, fields: Mapping[str, str]) -> str:
    """HMAC-SHA256 (hex) of a rotation state's fields, bound to the thing whose shadow holds it.

    The message is a compact JSON array of strings (context, thing, then the state's fields in a fixed
    order): unambiguous however the values are chosen, so no two states share a message.
    """
    check_state_key(key)
    message = json.dumps(
        [_MAC_CONTEXT, thing, *(fields[name] for name in _STATE_FIELDS)],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hmac.new(key, message.encode("ascii"), hashlib.sha256).hexdigest()


class ShadowStateStore:
    """`ports.RotationStateStore` in a named shadow of the thing, under `state.reported`.

    Every save writes all of RotationState's keys and their MAC, so the shadow's merge-on-update
    semantics never leave a stale field behind.

    Devices can usually publish to their own shadow topics, so the shadow is not trusted: the backend
    stores an HMAC of each state it writes (bound to the thing name, so a state cannot be moved to
    another thing) and `load` ignores, with a warning, any state whose MAC is missing or wrong. The
    handlers then see "no rotation": create starts afresh, commit is refused, and the terminal handler
    deletes nothing but still notifies. Without this a device could name another device's certificate
    as its "old" one and have the terminal handler delete it.
    """

    def __init__(self, clients: Clients, *, key: StateKey, shadow_name: str = DEFAULT_SHADOW_NAME) -> None:
        self._clients = clients
        self._key = key
        self._shadow = shadow_name

    def load(self, thing: str) -> RotationState | None:
        response = unless_missing(
            lambda: self._clients.iot_data.get_thing_shadow(thingName=thing, shadowName=self._shadow)
        )
        if response is None:
            return None
        document = json.loads(response["payload"].read() or b"{}")
        state = document.get("state") if isinstance(document, dict) else None
        reported = state.get("reported") if isinstance(state, dict) else None
        if not reported:
            return None
        problem = self._authentication_problem(thing, reported)
        if problem is not None:
            log.warning(
                "ignoring the rotation state in shadow %r of thing %r (%s): the shadow was tampered with or"
                " written by something other than the certificate rotator backend",
                self._shadow,
                thing,
                problem,
                extra={"thing": thing, "shadow": self._shadow},
            )
            return None
        try:
            return RotationState.from_dict(reported)
        except (KeyError, ValueError) as exc:
            # Authentic but unreadable (e.g. written by a newer backend): a state the handlers cannot
            # interpret must stop the handler rather than be guessed at.
            raise ValueError(
                f"shadow {self._shadow!r} of thing {thing!r} holds no valid rotation state: {exc!r}"
            ) from exc

    def _authentication_problem(self, thing: str, reported: object) -> str | None:
        """Why `reported` is not a state this backend wrote for `thing`, or None if it is."""
        if not isinstance(reported, dict):
            return "not a JSON object"
        fields = {name: reported.get(name) for name in _STATE_FIELDS}
        strings = {name: value for name, value in fields.items() if isinstance(value, str)}
        if len(strings) != len(_STATE_FIELDS):
            return "missing or non-string fields"
        mac = reported.get(MAC_FIELD)
        if not isinstance(mac, str):
            return "no MAC"
        # Compared as bytes: compare_digest refuses non-ASCII str, and the MAC text is attacker input.
        expected = state_mac(self._key(), thing, strings)
        if not hmac.compare_digest(mac.encode("utf-8"), expected.encode("ascii")):
            return "wrong MAC"
        return None

    def save(self, thing: str, state: RotationState) -> None:
        fields = state.to_dict()
        reported = fields | {MAC_FIELD: state_mac(self._key(), thing, fields)}
        self._clients.iot_data.update_thing_shadow(
            thingName=thing,
            shadowName=self._shadow,
            payload=encode({"state": {"reported": reported}}),
        )

    def clear(self, thing: str) -> None:
        # Deleting the whole shadow needs no key and leaves nothing (forged or not) behind.
        try:
            self._clients.iot_data.delete_thing_shadow(thingName=thing, shadowName=self._shadow)
        except ClientError as exc:
            if not is_not_found(exc):
                raise


class IotDataPublisher:
    """`ports.Publisher` through the IoT data plane's HTTPS publish.

    QoS 1: the publish call costs the same either way, and a subscriber that asked for QoS 1 then gets
    the reply redelivered until it acknowledges it. The device agent subscribes at QoS 1 with a clean
    session: a reply in flight when its connection drops is lost, and its per-state timeouts cover that.
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
