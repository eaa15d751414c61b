"""The rotation protocol: the one place for topics, the job document, statuses and message shapes.

Both sides (device agent and backend, AWS and local) import these; nothing else spells a topic.
See DESIGN.md §2 for the message sequence. Beside it: `status_details` (a device's update and AWS's
limits on statusDetails, with the key names from here) and `strict_json` (the JSON a payload may be).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from certrotator import strict_json
from certrotator.compat import StrEnum

JOB_DOCUMENT: Final[dict[str, str]] = {"operation": "ROTATE_CERTIFICATE"}

# Keys inside a job execution's statusDetails. The terminal rule selects on STATUS_DETAILS_KEY,
# so a device must always set it when it touches a rotation execution.
STATUS_DETAILS_KEY: Final = "CertificateRotator"
FAILURE_REASON_KEY: Final = "DeviceFailureReason"

MAX_CSR_BYTES: Final = 16 * 1024
# AWS IoT's MQTT payload limit; anything larger cannot be a legitimate request.
MAX_PAYLOAD_BYTES: Final = 128 * 1024
MAX_JOB_ID_LENGTH: Final = 64

_JOB_ID_RE: Final = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_THING_NAME_RE: Final = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")


class ProtocolError(ValueError):
    """A message or topic that does not follow the contract; the text says exactly what is wrong."""


class JobExecutionStatus(StrEnum):
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    REJECTED = "REJECTED"
    REMOVED = "REMOVED"
    CANCELED = "CANCELED"

    @property
    def is_terminal(self) -> bool:
        return self not in ACTIVE_EXECUTION_STATUSES


# The status sets, spelled here only. An execution is active until it ends; it ends in exactly one of
# the terminal statuses, and every terminal status but SUCCEEDED is a failure to rotate.
ACTIVE_EXECUTION_STATUSES: Final = frozenset({JobExecutionStatus.QUEUED, JobExecutionStatus.IN_PROGRESS})
# Tuples, in the enum's order, so that listings by status come out in one stable order.
TERMINAL_EXECUTION_STATUSES: Final = tuple(s for s in JobExecutionStatus if s not in ACTIVE_EXECUTION_STATUSES)
UNSUCCESSFUL_EXECUTION_STATUSES: Final = tuple(
    s for s in TERMINAL_EXECUTION_STATUSES if s is not JobExecutionStatus.SUCCEEDED
)
# The local IoT Core's name for a job's targets not yet released by its rollout (AWS counts them in
# no status: they have no execution yet).
PENDING_ROLLOUT: Final = "PENDING_ROLLOUT"


class JobStatus(StrEnum):
    """A job's own status (DescribeJob), as opposed to its executions'."""

    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN_PROGRESS"
    CANCELED = "CANCELED"
    COMPLETED = "COMPLETED"
    DELETION_IN_PROGRESS = "DELETION_IN_PROGRESS"


FINISHED_JOB_STATUSES: Final = frozenset(
    {JobStatus.COMPLETED, JobStatus.CANCELED, JobStatus.DELETION_IN_PROGRESS}
)


class RotationProgress(StrEnum):
    """How far the backend has carried a thing's rotation (kept in the rotation-state store).

    issuing -> created -> committed are written by create and commit; terminated is the last word on a
    rotation, written by the terminal handler once it has acted (or by create when it withdraws a
    certificate issued for an execution that had already ended). See docs/reliability.md.
    """

    ISSUING = "issuing"  # create is issuing: no new certificate id yet
    CREATED = "created"
    COMMITTED = "committed"
    TERMINATED = "terminated"  # the execution's end has been handled; nothing left to do


def is_rotation_document(document: object) -> bool:
    return document == JOB_DOCUMENT


def client_id_is_for_thing(client_id: str, thing: str) -> bool:
    """AWS IoT's rule for the client ids a thing may connect with: the thing name itself, or the thing
    name followed by `#` and anything (Greengrass's extra connections, e.g. `core#component`)."""
    return client_id == thing or client_id.startswith(f"{thing}#")


def thing_of_client_id(client_id: str) -> str:
    """The thing a client id names under `client_id_is_for_thing`."""
    return client_id.split("#", 1)[0]


def validate_thing_name(thing: str) -> str:
    if not _THING_NAME_RE.fullmatch(thing):
        raise ProtocolError(f"invalid thing name {thing!r}: 1-128 of [a-zA-Z0-9:_-]")
    return thing


def validate_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise ProtocolError(f"invalid jobId {job_id!r}: 1-{MAX_JOB_ID_LENGTH} of [a-zA-Z0-9_-]")
    return job_id


# --------------------------------------------------------------------------------------------- topics

_JOBS = "$aws/things/{thing}/jobs"
_CERT = "awslabs/things/{thing}/certificate"


class Topics:
    """Topic builders. Reply topics are the request topic plus `/accepted` or `/rejected`."""

    @staticmethod
    def notify_next(thing: str) -> str:
        return f"{_JOBS.format(thing=thing)}/notify-next"

    @staticmethod
    def next_get(thing: str) -> str:
        return f"{_JOBS.format(thing=thing)}/$next/get"

    @staticmethod
    def job_get(thing: str, job_id: str) -> str:
        return f"{_JOBS.format(thing=thing)}/{job_id}/get"

    @staticmethod
    def job_update(thing: str, job_id: str) -> str:
        return f"{_JOBS.format(thing=thing)}/{job_id}/update"

    @staticmethod
    def create(thing: str) -> str:
        return f"{_CERT.format(thing=thing)}/create"

    @staticmethod
    def commit(thing: str) -> str:
        return f"{_CERT.format(thing=thing)}/commit"

    @staticmethod
    def announce(thing: str) -> str:
        """Device -> cloud, payload `{}`, no reply: "these credentials are settled" (connected with no
        backup, or just committed). A rule records the connection's principal() and the time as the
        evidence `certrotator reconcile` uses to tell which certificate the device really uses."""
        return f"{_CERT.format(thing=thing)}/announce"

    @staticmethod
    def accepted(topic: str) -> str:
        return f"{topic}/accepted"

    @staticmethod
    def rejected(topic: str) -> str:
        return f"{topic}/rejected"

    @staticmethod
    def job_execution_event(job_id: str, status: JobExecutionStatus) -> str:
        # AWS IoT publishes e.g. $aws/events/jobExecution/{jobId}/timed_out, for terminal statuses only
        if not status.is_terminal:
            raise ProtocolError(f"no job execution event topic for non-terminal status {status.value}")
        return f"$aws/events/jobExecution/{job_id}/{status.value.lower()}"

    @staticmethod
    def device_subscriptions(thing: str) -> list[str]:
        """The topic filters the device agent subscribes to: every reply it needs, none of its own
        requests (an MQTT broker echoes a client's publishes to its matching subscriptions), in four
        SUBSCRIBEs instead of nine because each reconnect pays for every one of them."""
        jobs, cert = _JOBS.format(thing=thing), _CERT.format(thing=thing)
        return [f"{jobs}/notify-next", f"{jobs}/+/get/+", f"{jobs}/+/update/+", f"{cert}/+/+"]


_EVENT_STATUSES: Final = frozenset(s.value.lower() for s in JobExecutionStatus if s.is_terminal)


class TopicKind(StrEnum):
    NOTIFY_NEXT = "notify-next"
    GET = "get"
    UPDATE = "update"
    CREATE = "create"
    COMMIT = "commit"
    ANNOUNCE = "announce"
    JOB_EXECUTION_EVENT = "job-execution-event"


class Reply(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    kind: TopicKind
    thing: str | None
    job_id: str | None = None  # "$next" for $next/get
    reply: Reply | None = None
    status: str | None = None  # job execution events only


def parse_topic(topic: str) -> ParsedTopic:
    """Classify a protocol topic; raises ProtocolError for anything outside the contract."""
    parts = topic.split("/")
    # Before reply stripping: `rejected` is also a job execution status ($aws/events/jobExecution/j/rejected).
    if len(parts) == 5 and parts[:3] == ["$aws", "events", "jobExecution"]:
        if parts[4] not in _EVENT_STATUSES:
            raise ProtocolError(f"topic {topic!r}: {parts[4]!r} is not a terminal job execution status")
        return ParsedTopic(TopicKind.JOB_EXECUTION_EVENT, None, validate_job_id(parts[3]), None, parts[4])
    reply: Reply | None = None
    if parts[-1] in (Reply.ACCEPTED, Reply.REJECTED):
        reply = Reply(parts[-1])
        parts = parts[:-1]
    jobs = len(parts) in (5, 6) and parts[:2] == ["$aws", "things"] and parts[3] == "jobs"
    if jobs and len(parts) == 5 and parts[4] == "notify-next" and reply is None:
        return ParsedTopic(TopicKind.NOTIFY_NEXT, validate_thing_name(parts[2]))
    if jobs and len(parts) == 6:
        thing, job_id, verb = validate_thing_name(parts[2]), parts[4], parts[5]
        if job_id != "$next":
            validate_job_id(job_id)
        if verb == "get":
            return ParsedTopic(TopicKind.GET, thing, job_id, reply)
        if verb == "update" and job_id != "$next":
            return ParsedTopic(TopicKind.UPDATE, thing, job_id, reply)
    cert = len(parts) == 5 and parts[:2] == ["awslabs", "things"] and parts[3] == "certificate"
    if cert and parts[4] in ("create", "commit"):
        return ParsedTopic(TopicKind(parts[4]), validate_thing_name(parts[2]), None, reply)
    if cert and parts[4] == "announce" and reply is None:  # nothing replies to an announcement
        return ParsedTopic(TopicKind.ANNOUNCE, validate_thing_name(parts[2]))
    raise ProtocolError(f"topic {topic!r} is not part of the rotation protocol")


# ------------------------------------------------------------------------------------------- payloads


def decode_json_object(payload: bytes | str | dict[str, Any], what: str) -> dict[str, Any]:
    """Decode a payload into a JSON object, with a message naming the message type on failure.

    Every malformed payload raises ProtocolError (never a bare ValueError), so a caller that answers
    ProtocolError with a rejected reply answers every hostile payload."""
    if isinstance(payload, dict):
        return payload
    size = len(payload.encode("utf-8", "surrogatepass")) if isinstance(payload, str) else len(payload)
    if size > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"{what}: payload of {size} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        if not isinstance(payload, str):
            payload = payload.decode(json.detect_encoding(payload), "surrogatepass")
        value = strict_json.loads(payload)
    except RecursionError:
        raise ProtocolError(f"{what}: payload is not valid JSON (nested too deeply)") from None
    except strict_json.UnacceptableNumber as exc:
        raise ProtocolError(f"{what}: payload has an unacceptable number: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and whatever else json raises
        raise ProtocolError(f"{what}: payload is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: payload must be a JSON object, got {type(value).__name__}")
    return value


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class CreateCertificateRequest:
    job_id: str
    csr: str

    @classmethod
    def parse(cls, payload: bytes | str | dict[str, Any]) -> CreateCertificateRequest:
        body = decode_json_object(payload, "create-certificate request")
        job_id = validate_job_id(body.get("jobId"))
        csr = body.get("csr")
        if not isinstance(csr, str) or not csr:
            raise ProtocolError("create-certificate request: 'csr' must be a non-empty PEM string")
        if not csr.isascii():
            raise ProtocolError("create-certificate request: 'csr' must be ASCII (PEM)")
        if len(csr) > MAX_CSR_BYTES:
            raise ProtocolError(f"create-certificate request: CSR exceeds {MAX_CSR_BYTES} bytes")
        return cls(job_id, csr)

    def to_payload(self) -> dict[str, Any]:
        return {"jobId": self.job_id, "csr": self.csr}


@dataclass(frozen=True, slots=True)
class CommitCertificateRequest:
    job_id: str

    @classmethod
    def parse(cls, payload: bytes | str | dict[str, Any]) -> CommitCertificateRequest:
        body = decode_json_object(payload, "commit-certificate request")
        return cls(validate_job_id(body.get("jobId")))

    def to_payload(self) -> dict[str, Any]:
        return {"jobId": self.job_id}


def certificate_accepted(certificate_pem: str) -> dict[str, Any]:
    return {"certificatePem": certificate_pem}


def commit_accepted() -> dict[str, Any]:
    return {}


def rejected(error_msg: str) -> dict[str, Any]:
    return {"errorMsg": error_msg}


def parse_certificate_accepted(payload: bytes | str | dict[str, Any]) -> str:
    body = decode_json_object(payload, "create-certificate reply")
    pem = body.get("certificatePem")
    if not isinstance(pem, str) or "-----BEGIN CERTIFICATE-----" not in pem:
        raise ProtocolError("create-certificate reply: 'certificatePem' must be a PEM certificate")
    return pem


def parse_rejected(payload: bytes | str | dict[str, Any]) -> str:
    body = decode_json_object(payload, "rejected reply")
    msg = body.get("errorMsg", body.get("message"))
    return str(msg) if msg is not None else "no reason given"


# ---------------------------------------------------------------------------- backend request envelope


@dataclass(frozen=True, slots=True)
class BrokerContext:
    """What the broker knows of a request and the device cannot forge (the IoT rule adds it)."""

    thing: str
    client_id: str
    principal: str  # certificate id of the TLS connection
    topic: str

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> BrokerContext:
        missing = [k for k in ("thingName", "clientId", "principal", "topic") if not event.get(k)]
        if missing:
            raise ProtocolError(f"request event lacks broker context: {', '.join(missing)}")
        return cls(
            thing=validate_thing_name(str(event["thingName"])),
            client_id=str(event["clientId"]),
            principal=str(event["principal"]).lower(),
            topic=str(event["topic"]),
        )

    def to_event_fields(self) -> dict[str, str]:
        return {
            "thingName": self.thing,
            "clientId": self.client_id,
            "principal": self.principal,
            "topic": self.topic,
        }


@dataclass(frozen=True, slots=True)
class JobExecutionEvent:
    """A terminal job execution event ($aws/events/jobExecution/...), as the terminal rule forwards it."""

    thing: str
    job_id: str
    status: JobExecutionStatus
    status_details: dict[str, str]

    @classmethod
    def parse(cls, event: dict[str, Any]) -> JobExecutionEvent:
        thing_arn = event.get("thingArn")
        if not isinstance(thing_arn, str) or ":thing/" not in thing_arn:
            raise ProtocolError(f"job execution event: bad thingArn {thing_arn!r}")
        try:
            status = JobExecutionStatus(str(event.get("status")))
        except ValueError:
            raise ProtocolError(f"job execution event: unknown status {event.get('status')!r}") from None
        details = event.get("statusDetails") or {}
        if not isinstance(details, dict):
            raise ProtocolError("job execution event: statusDetails must be an object")
        return cls(
            thing=validate_thing_name(thing_arn.split(":thing/", 1)[1]),
            job_id=validate_job_id(event.get("jobId")),
            status=status,
            status_details={str(k): str(v) for k, v in details.items()},
        )

    def to_event(self, thing_arn_prefix: str = "arn:aws:iot:local:000000000000:thing/") -> dict[str, Any]:
        return {
            "eventType": "JOB_EXECUTION",
            "jobId": self.job_id,
            "thingArn": f"{thing_arn_prefix}{self.thing}",
            "status": self.status.value,
            "statusDetails": dict(self.status_details),
        }
