"""The backend-neutral shell of `reconcile`: gather facts per thing, decide (policy), act, notify.

A backend (local data directory, the running local engine, AWS) implements `Backend`. Acting re-reads
the thing's facts first and acts only if the decision is still the same, so a rotation that started, or
a device that reconnected, between the first look and the change is never overruled by a stale view.
Retiring goes through the backend's `Registry.delete_certificate` port (INACTIVE, detach, policies,
delete): the same code the terminal handler uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from certrotator.backend.ports import Notification, RotationState
from certrotator.ops.reconcile.policy import (
    DEFAULT_SETTLE_S,
    HANDLER_GRACE_S,
    Decision,
    ThingFacts,
    Verdict,
    decide,
)

log = logging.getLogger("certrotator.reconcile")

# `Notification.status` of what reconcile reports (the terminal handler puts a job execution status there).
NOTIFICATION_STATUS: Final = "RECONCILE"


class Backend(Protocol):
    def things(self) -> Iterable[str]:
        """Every thing to look at."""
        ...

    def facts(self, thing: str) -> ThingFacts: ...

    def recheck(self, thing: str) -> ThingFacts:
        """The facts again, right before acting, from fresh reads (live connections included)."""
        ...

    def retire(self, thing: str, certificate_id: str) -> None:
        """INACTIVE, detach from the thing, detach policies, delete: the backend's delete port."""
        ...

    def clear_state(self, thing: str, expected: RotationState) -> bool:
        """Clear the rotation state if it still is `expected`; False if it changed meanwhile."""
        ...

    def notify(self, notification: Notification) -> None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    applied: bool = False  # the changes were made
    note: str = ""  # dry run, not applied because..., failures

    @property
    def needs_operator(self) -> bool:
        return self.decision.verdict is Verdict.OPERATOR or self.note.startswith(FAILED)

    def to_dict(self) -> dict[str, Any]:
        return {**self.decision.to_dict(), "applied": self.applied, "note": self.note}


FAILED: Final = "failed: "


@dataclass(frozen=True, slots=True)
class Options:
    dry_run: bool = False
    settle_s: float = DEFAULT_SETTLE_S
    notify: bool = True
    # Acting is refused with this reason (e.g. "no engine is running: report only"); decisions still made.
    report_only: str | None = None
    grace_s: float = HANDLER_GRACE_S  # see policy.HANDLER_GRACE_S


def _same_changes(a: Decision, b: Decision) -> bool:
    return (a.verdict, a.retire, a.keep, a.clear_state) == (b.verdict, b.retire, b.keep, b.clear_state)


def _notification(decision: Decision, facts: ThingFacts, what: str) -> Notification:
    state = facts.state
    details = {"findings": ",".join(f.value for f in decision.findings), "decision": decision.verdict.value}
    if decision.keep:
        details["keptCertificateId"] = decision.keep
    if decision.retire:
        details["retiredCertificateIds"] = ",".join(decision.retire)
    if state is not None:
        details |= {
            "oldCertificateId": state.old_certificate_id,
            "newCertificateId": state.new_certificate_id,
            "progress": state.progress.value,
        }
    action = decision.reason if decision.verdict is Verdict.OPERATOR else ""
    return Notification(
        decision.thing, state.job_id if state else "", NOTIFICATION_STATUS, what, action, details
    )


def _apply(backend: Backend, decision: Decision, facts: ThingFacts) -> str:
    """Make the decision's changes; returns a note ("" when all went as decided)."""
    for certificate_id in decision.retire:
        backend.retire(decision.thing, certificate_id)
    changed = (
        decision.clear_state
        and facts.state is not None
        and not backend.clear_state(decision.thing, facts.state)
    )
    return "the rotation state changed meanwhile and was kept" if changed else ""


def reconcile_thing(backend: Backend, thing: str, options: Options) -> Outcome:
    facts = backend.facts(thing)
    decision = decide(facts, options.settle_s, options.grace_s)
    if decision.verdict in (Verdict.OK, Verdict.SKIP):
        return Outcome(decision)
    if decision.verdict is Verdict.OPERATOR or not decision.changes:
        return _notified(backend, Outcome(decision), facts, "operator action needed", options)
    if options.report_only is not None:
        return Outcome(decision, note=f"not applied: {options.report_only}")
    if options.dry_run:
        return Outcome(decision, note="dry run")
    fresh = backend.recheck(thing)
    again = decide(fresh, options.settle_s, options.grace_s)
    if not _same_changes(decision, again):
        return Outcome(again, note="the thing changed while deciding; nothing done (run again)")
    try:
        note = _apply(backend, again, fresh)
    except Exception as exc:
        log.exception("reconciling %s failed", thing)
        return _notified(
            backend, Outcome(again, note=f"{FAILED}{exc}"), fresh, f"reconcile failed: {exc}", options
        )
    what = (
        f"retired {', '.join(again.retire)}; kept {again.keep}"
        if again.retire
        else "cleared leftover rotation state"
    )
    return _notified(backend, Outcome(again, applied=True, note=note), fresh, what, options)


def _notified(backend: Backend, outcome: Outcome, facts: ThingFacts, what: str, options: Options) -> Outcome:
    """Tell the notifier port (never in a dry run or a report); a failure to notify is noted, not fatal."""
    if options.dry_run or not options.notify or options.report_only is not None:
        return outcome
    try:
        backend.notify(_notification(outcome.decision, facts, what))
    except Exception as exc:
        log.warning("notification for %s failed: %s", outcome.decision.thing, exc)
        note = f"{outcome.note}; " if outcome.note else ""
        return Outcome(outcome.decision, outcome.applied, f"{note}notification not sent: {exc}")
    return outcome


def reconcile(
    backend: Backend,
    options: Options,
    things: Sequence[str] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Reconcile each thing (all of the backend's by default); one thing's failure does not stop the rest."""
    outcomes = []
    for thing in things if things is not None else backend.things():
        try:
            outcome = reconcile_thing(backend, thing, options)
        except Exception as exc:  # e.g. the registry could not be read: report it, go on
            log.exception("reconciling %s failed", thing)
            outcome = Outcome(_unreadable(thing, exc), note=f"{FAILED}{exc}")
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes


def _unreadable(thing: str, exc: Exception) -> Decision:
    return Decision(thing, (), Verdict.OPERATOR, f"could not gather the facts: {exc}")


def needs_operator(outcomes: Iterable[Outcome]) -> bool:
    return any(o.needs_operator for o in outcomes)


def settling_delay(outcomes: Iterable[Outcome]) -> float | None:
    """Seconds until every decision that waits only for evidence to settle could be made; None if none
    waits. A one-shot caller sleeps that long, takes a second look (`refresh`) and runs those again."""
    delays = [o.decision.retry_after_s for o in outcomes if o.decision.retry_after_s is not None]
    return max(delays) if delays else None
