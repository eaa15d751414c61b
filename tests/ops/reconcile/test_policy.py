"""The reconcile decision, table-driven: facts about one thing in, one decision out (no I/O)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from certrotator.backend.ports import CertificateStatus, RotationState
from certrotator.ops.reconcile.policy import (
    ActiveExecution,
    CertificateFact,
    Evidence,
    EvidenceKind,
    Finding,
    ThingFacts,
    Verdict,
    decide,
)
from certrotator.protocol import JobExecutionStatus, RotationProgress

NOW = 1_000_000.0
SETTLE = 120.0
OLD, NEW, STRAY = "a" * 64, "b" * 64, "c" * 64
ACTIVE, INACTIVE = CertificateStatus.ACTIVE, CertificateStatus.INACTIVE

old_cert = CertificateFact(OLD, ACTIVE, created_at=NOW - 86_400)
new_cert = CertificateFact(NEW, ACTIVE, created_at=NOW - 3_600)
committed = RotationState("job-1", OLD, NEW, RotationProgress.COMMITTED)
created = RotationState("job-1", OLD, NEW, RotationProgress.CREATED)
issuing = RotationState("job-1", OLD, "", RotationProgress.ISSUING)
terminated = RotationState("job-1", OLD, NEW, RotationProgress.TERMINATED)
HOUR = 3600.0


def live(certificate_id: str, age_s: float, client_id: str = "dev") -> Evidence:
    return Evidence(certificate_id, NOW - age_s, EvidenceKind.LIVE_CONNECTION, client_id)


def announced(certificate_id: str, age_s: float) -> Evidence:
    return Evidence(certificate_id, NOW - age_s, EvidenceKind.ANNOUNCEMENT, "shadow")


def facts(
    *certificates: CertificateFact,
    state: RotationState | None = None,
    executions: tuple[ActiveExecution, ...] = (),
    evidence: tuple[Evidence, ...] = (),
    no_source: str | None = None,
    state_age_s: float | None = None,
    handlers_idle: bool = True,
) -> ThingFacts:
    return ThingFacts(
        "dev", certificates, state, executions, evidence, no_source, NOW, state_age_s, handlers_idle
    )


def unattached(cert: CertificateFact, other_thing: str | None = None) -> CertificateFact:
    return replace(cert, attached=False, other_thing=other_thing)


in_progress = (ActiveExecution("job-2", JobExecutionStatus.IN_PROGRESS, True),)
queued = (ActiveExecution("job-2", JobExecutionStatus.QUEUED, True),)
unknown_job = (ActiveExecution("job-3", JobExecutionStatus.QUEUED, None),)
other_job = (ActiveExecution("firmware", JobExecutionStatus.IN_PROGRESS, False),)


# (name, facts, verdict, retire, keep, clear_state, words in the reason)
CASES = [
    ("healthy", facts(old_cert), Verdict.OK, (), None, False, "one ACTIVE"),
    ("zero certificates", facts(), Verdict.OPERATOR, (), None, False, "no certificate attached"),
    (
        "zero certificates, state names an unattached one",
        facts(unattached(new_cert), state=created),
        Verdict.OPERATOR,
        (),
        None,
        False,
        "names bbbbbbbbbbbb",
    ),
    (
        "only certificate INACTIVE",
        facts(replace(old_cert, status=INACTIVE)),
        Verdict.OPERATOR,
        (),
        None,
        False,
        "is INACTIVE",
    ),
    (
        "two, device settled on the new one",
        facts(old_cert, new_cert, state=committed, evidence=(live(NEW, 600),)),
        Verdict.RETIRE,
        (OLD,),
        NEW,
        True,
        "uses bbbbbbbbbbbb",
    ),
    (
        "two, device back on the old one",
        facts(old_cert, new_cert, evidence=(live(OLD, 600),)),
        Verdict.RETIRE,
        (NEW,),
        OLD,
        False,
        "uses aaaaaaaaaaaa",
    ),
    (
        "two, live connection from before the new certificate still counts (continuous)",
        facts(old_cert, new_cert, evidence=(live(OLD, 7_200),)),
        Verdict.RETIRE,
        (NEW,),
        OLD,
        False,
        "settled evidence",
    ),
    (
        "three attached, device on one",
        facts(old_cert, new_cert, CertificateFact(STRAY, ACTIVE, NOW - 60), evidence=(live(NEW, 600),)),
        Verdict.RETIRE,
        (OLD, STRAY),
        NEW,
        False,
        "3 certificates attached",
    ),
    (
        "two, no evidence",
        facts(old_cert, new_cert, state=committed),
        Verdict.OPERATOR,
        (),
        None,
        False,
        "no evidence of which one",
    ),
    (
        "two, no source of evidence at all",
        facts(old_cert, new_cert, evidence=(live(NEW, 600),), no_source="no engine is running"),
        Verdict.OPERATOR,
        (),
        None,
        False,
        "no engine is running",
    ),
    (
        "two, connection with the new one still on trial",
        facts(old_cert, new_cert, state=committed, evidence=(live(NEW, 5),)),
        Verdict.SKIP,
        (),
        None,
        False,
        "not settled",
    ),
    (
        "two, device seen with both",
        facts(old_cert, new_cert, evidence=(live(NEW, 600), live(OLD, 600, "dev#2"))),
        Verdict.OPERATOR,
        (),
        None,
        False,
        "more than one",
    ),
    (
        "two, a settled and a young connection disagree",
        facts(old_cert, new_cert, evidence=(live(NEW, 600), live(OLD, 3, "dev#2"))),
        Verdict.OPERATOR,
        (),
        None,
        False,
        "more than one",
    ),
    (
        "two, announcement newer than both",
        facts(old_cert, new_cert, evidence=(announced(NEW, 1_800),)),
        Verdict.RETIRE,
        (OLD,),
        NEW,
        False,
        "uses bbbbbbbbbbbb",
    ),
    (
        "two, announcement older than the newer certificate",
        facts(old_cert, new_cert, state=committed, evidence=(announced(OLD, 7_200),)),
        Verdict.OPERATOR,
        (),
        None,
        False,
        "older than the thing's newest certificate",
    ),
    (
        "two, announcement just made",
        facts(old_cert, new_cert, evidence=(announced(NEW, 10),)),
        Verdict.SKIP,
        (),
        None,
        False,
        "run again after 110 s",
    ),
    (
        "two, evidence names a certificate of another thing",
        facts(old_cert, new_cert, evidence=(live(STRAY, 600),)),
        Verdict.OPERATOR,
        (),
        None,
        False,
        "not a certificate of this thing",
    ),
    (
        "two, device uses an INACTIVE one",
        facts(replace(old_cert, status=INACTIVE), new_cert, evidence=(announced(OLD, 60 * 30),)),
        Verdict.OPERATOR,
        (),
        None,
        False,
        "INACTIVE and attached",
    ),
    (
        "leftover state, one certificate",
        facts(new_cert, state=committed),
        Verdict.CLEAR_STATE,
        (),
        None,
        True,
        "leftover rotation state of job job-1 (committed)",
    ),
    (
        "leftover state naming an unattached certificate, device on the attached one",
        facts(old_cert, unattached(new_cert), state=created, evidence=(live(OLD, 600),)),
        Verdict.RETIRE,
        (NEW,),
        OLD,
        True,
        "names unattached",
    ),
    (
        "leftover state naming an unattached certificate, no evidence",
        facts(old_cert, unattached(new_cert), state=created),
        Verdict.OPERATOR,
        (),
        None,
        False,
        "no evidence",
    ),
    (
        "state names a certificate attached to another thing: never touched",
        facts(old_cert, unattached(new_cert, other_thing="dev-2"), state=created),
        Verdict.CLEAR_STATE,
        (),
        None,
        True,
        "leftover",
    ),
    (
        "rotation in progress",
        facts(old_cert, new_cert, state=created, executions=in_progress),
        Verdict.SKIP,
        (),
        None,
        False,
        "job-2 IN_PROGRESS",
    ),
    (
        "rotation queued",
        facts(old_cert, new_cert, evidence=(live(OLD, 600),), executions=queued),
        Verdict.SKIP,
        (),
        None,
        False,
        "job-2 QUEUED",
    ),
    (
        "a job whose document is unknown counts as a rotation",
        facts(new_cert, state=committed, executions=unknown_job),
        Verdict.SKIP,
        (),
        None,
        False,
        "job-3",
    ),
    (
        "another kind of job does not block",
        facts(new_cert, state=committed, executions=other_job),
        Verdict.CLEAR_STATE,
        (),
        None,
        True,
        "leftover",
    ),
    (
        "the backend's tombstone is no finding",
        facts(new_cert, state=terminated, handlers_idle=False),
        Verdict.OK,
        (),
        None,
        False,
        "",
    ),
    (
        "two with a tombstone: retired, the tombstone stays",
        facts(old_cert, new_cert, state=terminated, evidence=(live(NEW, 600),)),
        Verdict.RETIRE,
        (OLD,),
        NEW,
        False,
        "uses bbbbbbbbbbbb",
    ),
    (
        "state of unknown age where handlers run apart (Lambda): they may still be at it",
        facts(old_cert, state=created, handlers_idle=False),
        Verdict.SKIP,
        (),
        None,
        False,
        "of unknown age",
    ),
    (
        "young state where handlers run apart",
        facts(
            old_cert,
            new_cert,
            state=committed,
            evidence=(live(NEW, 600),),
            state_age_s=60,
            handlers_idle=False,
        ),
        Verdict.SKIP,
        (),
        None,
        False,
        "may still be handling it",
    ),
    (
        "old state where handlers run apart is a leftover",
        facts(old_cert, state=issuing, state_age_s=7 * HOUR, handlers_idle=False),
        Verdict.CLEAR_STATE,
        (),
        None,
        True,
        "(issuing)",
    ),
    (
        "a healthy thing in a rotation is just ok",
        facts(old_cert, executions=in_progress),
        Verdict.OK,
        (),
        None,
        False,
        "",
    ),
]


@pytest.mark.parametrize(
    ("facts_", "verdict", "retire", "keep", "clear_state", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decision(
    facts_: ThingFacts,
    verdict: Verdict,
    retire: tuple[str, ...],
    keep: str | None,
    clear_state: bool,
    words: str,
) -> None:
    decision = decide(facts_, SETTLE)
    assert (decision.verdict, decision.retire, decision.keep, decision.clear_state) == (
        verdict,
        retire,
        keep,
        clear_state,
    ), decision.reason
    assert words in decision.reason


def test_never_retires_the_certificate_the_evidence_names() -> None:
    for case in CASES:
        decision = decide(case[1], SETTLE)
        named = {e.certificate_id for e in case[1].evidence}
        assert not named & set(decision.retire) or len(named) > 1, case[0]
        if decision.retire:
            assert decision.keep in named


def test_nothing_is_retired_without_evidence() -> None:
    for case in CASES:
        if not case[1].evidence:
            assert decide(case[1], SETTLE).retire == (), case[0]


def test_findings_and_what_was_seen_are_reported() -> None:
    decision = decide(facts(old_cert, new_cert, state=committed, evidence=(live(NEW, 5),)), SETTLE)
    assert decision.findings == (Finding.EXTRA_CERTIFICATES, Finding.LEFTOVER_STATE)
    assert decision.retry_after_s == pytest.approx(115)
    body = decision.to_dict()
    assert body["decision"] == "skip" and body["findings"] == ["extra-certificates", "leftover-state"]
    assert [c["certificateId"] for c in body["seen"]["certificates"]] == [OLD, NEW]
    assert body["seen"]["rotationState"]["progress"] == "committed"
    assert body["seen"]["evidence"][0]["kind"] == "live-connection"


def test_settle_time_is_the_callers() -> None:
    young = facts(old_cert, new_cert, evidence=(live(NEW, 5),))
    assert decide(young, SETTLE).verdict is Verdict.SKIP
    assert decide(young, 1.0).verdict is Verdict.RETIRE
