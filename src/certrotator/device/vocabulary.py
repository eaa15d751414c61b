"""The vocabulary of the device's state machine (`certrotator.device.machine`): its states, the events
the agent feeds it and the actions it answers with. Plain frozen data, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from certrotator.algorithms import KeyAlgorithm, SigningAlgorithm
from certrotator.compat import StrEnum


class Phase(StrEnum):
    IDLE = "Idle"
    GETTING_JOB = "GettingJob"
    UPDATING_JOB = "UpdatingJob"
    CREATING_CERTIFICATE = "CreatingCertificate"
    COMMITTING_CERTIFICATE = "CommittingCertificate"


@dataclass(frozen=True, slots=True)
class State:
    thing: str
    key_algorithm: KeyAlgorithm
    signing_algorithm: SigningAlgorithm
    timeout_s: float = 30.0
    phase: Phase = Phase.IDLE
    job_id: str | None = None
    has_backup: bool = False
    committed_job: str | None = None
    epoch: int = 0  # bumped on every transition into a waiting phase; stale timeouts carry an old one
    retried: bool = False  # this waiting phase's request was already sent again after a timeout


# ------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Started:
    """Connected and subscribed (with whatever credentials are in place)."""

    has_backup: bool
    # The job whose new credentials this device committed (backup deleted) and whose SUCCEEDED may
    # not have reached the cloud: a crash or a lost publish right after the commit.
    committed_job: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectionResumed:
    """The transport lost its connection and got it back by itself (the AWS CRT's automatic reconnect),
    with the same credentials, and its subscriptions are in place again. Whatever was published to the
    device or by it while the connection was down may be lost."""

    committed_job: str | None = None  # as in Started: the commit marker, re-read at this moment


@dataclass(frozen=True, slots=True)
class ResyncDue:
    """The periodic re-synchronisation is due: for a transport that cannot see its connection's drops
    (Greengrass IPC: the nucleus owns the connection and tells components nothing)."""

    committed_job: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Timeout:
    epoch: int


@dataclass(frozen=True, slots=True)
class ConfigChanged:
    key_algorithm: KeyAlgorithm
    signing_algorithm: SigningAlgorithm
    timeout_s: float


@dataclass(frozen=True, slots=True)
class StoreFailed:
    """A key-store step (prepare or install) failed; nothing was changed."""

    reason: str


Event = (
    Started | ConnectionResumed | ResyncDue | ConnectFailed | Message | Timeout | ConfigChanged | StoreFailed
)


# ------------------------------------------------------------------------------------------ actions


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RequestCertificate:
    """Generate a new key, build a CSR and publish the create request."""

    job_id: str
    key_algorithm: KeyAlgorithm
    signing_algorithm: SigningAlgorithm


@dataclass(frozen=True, slots=True)
class InstallCertificate:
    """Back up the current pair and install the prepared key with this certificate (then Restart)."""

    job_id: str
    certificate_pem: str


@dataclass(frozen=True, slots=True)
class DiscardPreparedKey:
    pass


@dataclass(frozen=True, slots=True)
class RollBack:
    pass


@dataclass(frozen=True, slots=True)
class DeleteBackup:
    """Keep the new pair: record `job_id` as committed (if given), then delete the backup."""

    job_id: str | None = None


@dataclass(frozen=True, slots=True)
class ForgetCommitted:
    """The committed job is settled in the cloud: drop its record."""


@dataclass(frozen=True, slots=True)
class Restart:
    """Reconnect with the credentials now in place (Greengrass: restart the nucleus)."""

    reason: str
    backoff: bool = False  # after a plain connection failure: wait before retrying


@dataclass(frozen=True, slots=True)
class ArmTimer:
    seconds: float
    epoch: int


Action = (
    Publish
    | RequestCertificate
    | InstallCertificate
    | DiscardPreparedKey
    | RollBack
    | DeleteBackup
    | ForgetCommitted
    | Restart
    | ArmTimer
)

Result = tuple[State, list[Action]]
