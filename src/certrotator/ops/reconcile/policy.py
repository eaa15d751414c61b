"""What `reconcile` does about one thing: a pure function of the facts gathered about it.

A thing is healthy with exactly one ACTIVE certificate attached and no rotation state. Terminal
outcomes that keep two certificates (DESIGN.md §2), lost terminal events and create/terminal races leave
things with two certificates, an unattached certificate named by the rotation state, or state nobody
clears. This module decides, from evidence of which certificate the device really uses, what may be
retired. Its one rule above all: a certificate the device may still need is never retired. No
evidence, or evidence that does not hold up, means "operator action needed", with what was seen.

Evidence and why each kind is trusted (the device changes credentials only in a rotation, which needs
an IN_PROGRESS execution; a thing with a QUEUED or IN_PROGRESS rotation execution is skipped):
- a live connection (local IoT Core) proves the device uses that certificate *now*, and has since the
  connection began: installing new credentials ends the connection. A device whose new credentials are
  on trial (backup kept) is connected with them only until its `$next/get` and commit settle, two
  state timeouts at most, and then may roll back; so a connection counts once it has lasted `settle_s`.
- an announcement (AWS IoT: the agent publishes `Topics.announce` when its credentials are settled and
  a rule records the connection's principal() and the time) proves use at that moment and until the
  next rotation: it counts only if it is newer than every certificate of the thing (a rotation after
  it may have moved the device on), and, as a guard against reading it in flight, once `settle_s` old.
Every piece of evidence that is not stale must name the same certificate; otherwise a person decides.

Rotation state: `terminated` is the backend's last word on a rotation (its tombstone): never a finding,
never cleared here. `issuing`, `created` and `committed` with no rotation execution active are leftovers,
unless a backend handler may still be at work on them (a create still issuing; a terminal event still
being retried): where handlers run apart from us (AWS Lambda) a state counts as leftover only once it is
older than `HANDLER_GRACE_S`, and not at all when its age is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from certrotator.backend.ports import CertificateStatus, RotationState
from certrotator.compat import StrEnum
from certrotator.protocol import JobExecutionStatus, RotationProgress

# Longest a device's new credentials stay on trial after it connects with them: the `$next/get` and
# the commit each wait at most one state timeout (30 s by default), plus a Greengrass nucleus's slow
# start and clock skew. A connection (or announcement) younger than this does not count yet.
DEFAULT_SETTLE_S: Final = 120.0

# How long a backend handler may still act on a rotation state after it was last written: the terminal
# function's maximum event age (6 h, retries included) + its timeout + the job's in-progress timeout
# (the state is written up to that long before the execution ends) = 21,930 s with the stack's
# defaults; 7 h leaves a margin for delivery and clock skew (tests/infra checks it against the stack).
# Older states with no execution active are leftovers.
HANDLER_GRACE_S: Final = 7 * 3600.0


class Finding(StrEnum):
    NO_CERTIFICATE = "no-certificate"
    EXTRA_CERTIFICATES = "extra-certificates"
    CERTIFICATE_NOT_ACTIVE = "certificate-not-active"
    LEFTOVER_STATE = "leftover-state"
    UNATTACHED_CERTIFICATE = "unattached-certificate"  # named by the rotation state, attached to no thing


class Verdict(StrEnum):
    OK = "ok"
    RETIRE = "retire"  # retire the certificates in `retire` (and clear the state, if any)
    CLEAR_STATE = "clear-state"
    SKIP = "skip"  # not now: a rotation is in progress, or the evidence has not settled yet
    OPERATOR = "operator-action-needed"


class EvidenceKind(StrEnum):
    LIVE_CONNECTION = "live-connection"
    ANNOUNCEMENT = "announcement"


@dataclass(frozen=True, slots=True)
class CertificateFact:
    certificate_id: str
    status: CertificateStatus
    created_at: float  # epoch seconds: when the registry got it
    attached: bool = True  # exclusively attached to this thing (else: only named by the rotation state)
    other_thing: str | None = None  # attached to another thing: never touched here


@dataclass(frozen=True, slots=True)
class ActiveExecution:
    job_id: str
    status: JobExecutionStatus  # QUEUED or IN_PROGRESS
    rotation: bool | None  # the rotation document? None = not known


@dataclass(frozen=True, slots=True)
class Evidence:
    certificate_id: str
    since: float  # epoch seconds: connected since / announced at
    kind: EvidenceKind
    source: str  # for people: the client id, the shadow, ...


@dataclass(frozen=True, slots=True)
class ThingFacts:
    thing: str
    certificates: tuple[CertificateFact, ...]
    state: RotationState | None
    executions: tuple[ActiveExecution, ...]
    evidence: tuple[Evidence, ...]
    # Why there can be no evidence at all (e.g. "no engine is running"); None = a source was consulted.
    no_evidence_source: str | None
    observed_at: float  # epoch seconds: when the facts were gathered
    state_age_s: float | None = None  # how long ago the rotation state was last written; None = unknown
    # No backend handler can be acting on this thing while we look (the local engine: its handlers run on
    # the loop this runs on, or between the transactions we read; no engine at all): states need no grace.
    handlers_idle: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    thing: str
    findings: tuple[Finding, ...]
    verdict: Verdict
    reason: str
    retire: tuple[str, ...] = ()
    keep: str | None = None  # the certificate the evidence shows in use
    clear_state: bool = False
    retry_after_s: float | None = None  # SKIP until evidence settles: it counts after this many seconds
    seen: dict[str, Any] = field(default_factory=dict)  # what the decision was made from

    @property
    def changes(self) -> bool:
        return bool(self.retire) or self.clear_state

    def to_dict(self) -> dict[str, Any]:
        return {
            "thing": self.thing,
            "findings": [f.value for f in self.findings],
            "decision": self.verdict.value,
            "reason": self.reason,
            "retire": list(self.retire),
            "keep": self.keep,
            "clearState": self.clear_state,
            "retryAfterSeconds": self.retry_after_s,
            "seen": self.seen,
        }


def _short(certificate_id: str) -> str:
    return certificate_id[:12]


def _seen(facts: ThingFacts) -> dict[str, Any]:
    state = facts.state
    return {
        "certificates": [
            {
                "certificateId": c.certificate_id,
                "status": c.status.value,
                "createdAt": c.created_at,
                "attached": c.attached,
                **({"attachedTo": c.other_thing} if c.other_thing else {}),
            }
            for c in facts.certificates
        ],
        "rotationState": state.to_dict() if state is not None else None,
        "activeExecutions": [
            {"jobId": e.job_id, "status": e.status.value, "rotation": e.rotation} for e in facts.executions
        ],
        "evidence": [
            {"certificateId": e.certificate_id, "since": e.since, "kind": e.kind.value, "source": e.source}
            for e in facts.evidence
        ],
        "observedAt": facts.observed_at,
    }


def is_live(state: RotationState | None) -> bool:
    """A rotation state other than the backend's tombstone (`terminated`)."""
    return state is not None and state.progress is not RotationProgress.TERMINATED


def live_state(facts: ThingFacts) -> RotationState | None:
    return facts.state if is_live(facts.state) else None


def _handler_may_be_busy(facts: ThingFacts, grace_s: float) -> bool:
    if live_state(facts) is None or facts.handlers_idle:
        return False
    return facts.state_age_s is None or facts.state_age_s < grace_s


def findings_of(facts: ThingFacts) -> tuple[Finding, ...]:
    attached = [c for c in facts.certificates if c.attached]
    found: list[Finding] = []
    if not attached:
        found.append(Finding.NO_CERTIFICATE)
    elif len(attached) > 1:
        found.append(Finding.EXTRA_CERTIFICATES)
    elif attached[0].status is not CertificateStatus.ACTIVE:
        found.append(Finding.CERTIFICATE_NOT_ACTIVE)
    if live_state(facts) is not None:
        found.append(Finding.LEFTOVER_STATE)
    if any(not c.attached and c.other_thing is None for c in facts.certificates):
        found.append(Finding.UNATTACHED_CERTIFICATE)
    return tuple(found)


@dataclass(frozen=True, slots=True)
class _Weighed:
    settled: frozenset[str]  # certificates with evidence that counts
    unsettled: frozenset[str]  # certificates with evidence that is current but too young to count
    notes: tuple[str, ...]  # why evidence did not count
    settles_at: float | None  # when the youngest unsettled evidence will count


def weigh_evidence(facts: ThingFacts, settle_s: float) -> _Weighed:
    """Sort the evidence into what counts, what will count once settled, and what is stale."""
    ours = {c.certificate_id for c in facts.certificates if c.other_thing is None}
    newest = max((c.created_at for c in facts.certificates), default=0.0)
    settled: set[str] = set()
    unsettled: set[str] = set()
    notes: list[str] = []
    settles_at: float | None = None
    for e in facts.evidence:
        what = f"{e.kind.value} ({e.source}) with {_short(e.certificate_id)}"
        if e.certificate_id not in ours:
            notes.append(f"{what}: not a certificate of this thing")
            continue
        if e.kind is EvidenceKind.ANNOUNCEMENT and e.since < newest:
            notes.append(f"{what}: older than the thing's newest certificate, so it may have moved on since")
            continue
        age = facts.observed_at - e.since
        if age < settle_s:
            unsettled.add(e.certificate_id)
            ready = e.since + settle_s
            settles_at = ready if settles_at is None else max(settles_at, ready)
            notes.append(f"{what}: only {max(age, 0.0):.0f} s old, counts after {settle_s:g} s")
            continue
        settled.add(e.certificate_id)
    return _Weighed(frozenset(settled), frozenset(unsettled), tuple(notes), settles_at)


def decide(
    facts: ThingFacts, settle_s: float = DEFAULT_SETTLE_S, grace_s: float = HANDLER_GRACE_S
) -> Decision:
    """The decision for one thing (see the module docstring)."""
    found = findings_of(facts)
    seen = _seen(facts)

    def decision(verdict: Verdict, reason: str, **changes: Any) -> Decision:
        return Decision(facts.thing, found, verdict, reason, seen=seen, **changes)

    if not found:
        return decision(Verdict.OK, "one ACTIVE certificate, no rotation state")
    blocking = [e for e in facts.executions if e.rotation is not False]
    if blocking:
        listed = ", ".join(f"{e.job_id} {e.status.value}" for e in blocking)
        return decision(Verdict.SKIP, f"a rotation may be in progress ({listed}): it settles the thing first")
    if _handler_may_be_busy(facts, grace_s):
        assert facts.state is not None
        age = "of unknown age" if facts.state_age_s is None else f"{facts.state_age_s:.0f} s old"
        return decision(
            Verdict.SKIP,
            f"rotation state of job {facts.state.job_id} ({facts.state.progress.value}) is {age}: the "
            f"backend may still be handling it (grace {grace_s:g} s)",
        )
    state = live_state(facts)

    attached = [c for c in facts.certificates if c.attached]
    unattached = [c for c in facts.certificates if not c.attached and c.other_thing is None]
    state_text = (
        f"rotation state of job {state.job_id} ({state.progress.value})" if state else "rotation state"
    )
    if Finding.NO_CERTIFICATE in found:
        extra = (
            f"; the {state_text} names {', '.join(_short(c.certificate_id) for c in unattached)}"
            if unattached
            else ""
        )
        return decision(
            Verdict.OPERATOR,
            f"no certificate attached: the device cannot connect; attach the certificate it holds or "
            f"provision a new one{extra}",
        )
    if Finding.CERTIFICATE_NOT_ACTIVE in found:
        only = attached[0]
        return decision(
            Verdict.OPERATOR,
            f"the only certificate {_short(only.certificate_id)} is {only.status.value}: the device cannot "
            "connect; activate it if the device holds it, or provision a new one",
        )
    # From here on: at least one attached certificate, and the evidence decides what else may go.
    if len(attached) == 1 and not unattached:
        assert state is not None  # the only finding left is LEFTOVER_STATE
        return decision(
            Verdict.CLEAR_STATE,
            f"leftover {state_text} while no rotation is in progress; the thing's one certificate stays",
            clear_state=True,
        )
    candidates = [*attached, *unattached]
    names = ", ".join(_short(c.certificate_id) for c in candidates)
    problem = (
        f"{len(attached)} certificates attached ({names})"
        if len(attached) > 1
        else f"the {state_text} names unattached certificate(s) {', '.join(_short(c.certificate_id) for c in unattached)}"
    )
    if facts.no_evidence_source is not None:
        return decision(
            Verdict.OPERATOR,
            f"{problem}; no evidence of which one the device uses ({facts.no_evidence_source}): find out on "
            "the device, then retire the others",
        )
    weighed = weigh_evidence(facts, settle_s)
    notes = f" ({'; '.join(weighed.notes)})" if weighed.notes else ""
    current = weighed.settled | weighed.unsettled
    if len(current) > 1:
        used = ", ".join(sorted(_short(c) for c in current))
        return decision(
            Verdict.OPERATOR,
            f"{problem}; the device was seen using more than one of them ({used}){notes}: check the device",
        )
    if weighed.unsettled:
        assert weighed.settles_at is not None
        wait = max(weighed.settles_at - facts.observed_at, 0.0)
        return decision(
            Verdict.SKIP,
            f"{problem}; the evidence has not settled yet{notes}: run again after {wait:.0f} s",
            retry_after_s=wait,
        )
    if not weighed.settled:
        return decision(
            Verdict.OPERATOR,
            f"{problem}; no evidence of which one the device uses{notes}: find out on the device (or let it "
            "reconnect and run again), then retire the others",
        )
    (used,) = weighed.settled
    keep = next(c for c in candidates if c.certificate_id == used)
    if not keep.attached or keep.status is not CertificateStatus.ACTIVE:
        return decision(
            Verdict.OPERATOR,
            f"{problem}; the device uses {_short(used)}, which is {keep.status.value} and "
            f"{'attached' if keep.attached else 'not attached'}: attach and activate it, then run again",
        )
    retire = tuple(c.certificate_id for c in candidates if c.certificate_id != used)
    return decision(
        Verdict.RETIRE,
        f"{problem}; the device uses {_short(used)} (settled evidence){notes}: retiring "
        f"{', '.join(_short(c) for c in retire)}",
        retire=retire,
        keep=used,
        clear_state=state is not None,
    )
