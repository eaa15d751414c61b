"""The runner's own rules, on an in-memory backend: act only on a decision that still holds right before
acting, never in a dry run or a report, note (not raise) what fails, and exit by what needs a person."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from certrotator.backend.ports import CertificateStatus, Notification, RotationState
from certrotator.ops.reconcile.policy import (
    CertificateFact,
    Evidence,
    EvidenceKind,
    ThingFacts,
    Verdict,
)
from certrotator.ops.reconcile.runner import Options, needs_operator, reconcile, settling_delay
from certrotator.protocol import RotationProgress

NOW = 1_000_000.0
OLD, NEW = "a" * 64, "b" * 64


@dataclass
class MemoryBackend:
    facts_by_thing: dict[str, ThingFacts]
    rechecked: dict[str, ThingFacts] = field(default_factory=dict)  # what the second look sees
    retired: list[tuple[str, str]] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)
    told: list[Notification] = field(default_factory=list)
    fail_retire: bool = False
    fail_notify: bool = False

    def things(self) -> list[str]:
        return sorted(self.facts_by_thing)

    def facts(self, thing: str) -> ThingFacts:
        return self.facts_by_thing[thing]

    def recheck(self, thing: str) -> ThingFacts:
        return self.rechecked.get(thing, self.facts_by_thing[thing])

    def retire(self, thing: str, certificate_id: str) -> None:
        if self.fail_retire:
            raise RuntimeError("throttled")
        self.retired.append((thing, certificate_id))

    def clear_state(self, thing: str, expected: RotationState) -> bool:
        self.cleared.append(thing)
        return True

    def notify(self, notification: Notification) -> None:
        if self.fail_notify:
            raise RuntimeError("AuthorizationError")
        self.told.append(notification)


def two_certificates(thing: str, evidence_age: float | None = 600.0) -> ThingFacts:
    certificates = (
        CertificateFact(OLD, CertificateStatus.ACTIVE, NOW - 7200),
        CertificateFact(NEW, CertificateStatus.ACTIVE, NOW - 3600),
    )
    evidence = (
        (Evidence(NEW, NOW - evidence_age, EvidenceKind.LIVE_CONNECTION, thing),)
        if evidence_age is not None
        else ()
    )
    state = RotationState("job-1", OLD, NEW, RotationProgress.COMMITTED)
    return ThingFacts(thing, certificates, state, (), evidence, None, NOW, handlers_idle=True)


def test_acts_and_tells_what_it_did() -> None:
    backend = MemoryBackend({"t1": two_certificates("t1")})
    (outcome,) = reconcile(backend, Options())
    assert outcome.applied and backend.retired == [("t1", OLD)] and backend.cleared == ["t1"]
    (note,) = backend.told
    assert note.status == "RECONCILE" and note.job_id == "job-1" and note.action == ""
    assert note.details["retiredCertificateIds"] == OLD and note.details["keptCertificateId"] == NEW
    assert not needs_operator([outcome])


def test_dry_run_and_report_only_change_and_tell_nothing() -> None:
    for options in (Options(dry_run=True), Options(report_only="no engine")):
        backend = MemoryBackend({"t1": two_certificates("t1"), "t2": two_certificates("t2", None)})
        outcomes = reconcile(backend, options)
        assert [o.decision.verdict for o in outcomes] == [Verdict.RETIRE, Verdict.OPERATOR]
        assert not any(o.applied for o in outcomes)
        assert backend.retired == backend.cleared == backend.told == []
        assert needs_operator(outcomes)


def test_a_decision_that_no_longer_holds_is_not_carried_out() -> None:
    backend = MemoryBackend({"t1": two_certificates("t1")})
    backend.rechecked["t1"] = replace(two_certificates("t1"), evidence=())  # the device went away meanwhile
    (outcome,) = reconcile(backend, Options())
    assert not outcome.applied and "changed while deciding" in outcome.note
    assert outcome.decision.verdict is Verdict.OPERATOR  # what the second look shows
    assert backend.retired == []


def test_failures_are_noted_and_need_an_operator() -> None:
    backend = MemoryBackend({"t1": two_certificates("t1")}, fail_retire=True)
    (outcome,) = reconcile(backend, Options())
    assert not outcome.applied and outcome.note == "failed: throttled" and needs_operator([outcome])
    assert "reconcile failed" in backend.told[0].outcome

    backend = MemoryBackend({"t1": two_certificates("t1")}, fail_notify=True)
    (outcome,) = reconcile(backend, Options())
    assert outcome.applied and outcome.note == "notification not sent: AuthorizationError"
    assert not needs_operator([outcome])


def test_a_thing_that_cannot_be_read_does_not_stop_the_others() -> None:
    backend = MemoryBackend({"t2": two_certificates("t2")})
    outcomes = reconcile(backend, Options(), ["t1", "t2"])
    assert [(o.decision.thing, o.decision.verdict) for o in outcomes] == [
        ("t1", Verdict.OPERATOR),
        ("t2", Verdict.RETIRE),
    ]
    assert outcomes[0].note.startswith("failed: ") and needs_operator(outcomes)


def test_settling_delay_is_the_longest_wait() -> None:
    backend = MemoryBackend({"t1": two_certificates("t1", 10.0), "t2": two_certificates("t2", 100.0)})
    outcomes = reconcile(backend, Options(settle_s=120))
    assert [o.decision.verdict for o in outcomes] == [Verdict.SKIP, Verdict.SKIP]
    assert settling_delay(outcomes) == 110.0
    assert settling_delay(reconcile(MemoryBackend({"t3": two_certificates("t3")}), Options())) is None
