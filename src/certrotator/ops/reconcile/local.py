"""`reconcile` on the local IoT Core: from the CLI on a data directory, or inside the running engine.

Facts come from the registry and the jobs in the data directory's database (read beside a running
engine: WAL). Evidence of use is the engine's live connections: with no engine running there is none,
and the CLI only reports. Changes go through the backend's own ports (`RegistryPort.delete_certificate`
retires, `StatePort` clears); deactivating a certificate is what touches live connections, so from the
CLI that step also goes through the running engine's admin endpoint (`set_certificate_status`, which
disconnects the certificate's connections). Inside the engine (`EngineReconciler`, for
`local up --reconcile-every`) the engine's own ports do all of it, on its loop.

Connections count as evidence once they have lasted the settle time (see `policy`). The admin
endpoint's `connections` rows may carry `connected_at`; where they do not, a connection is dated from
when this process first saw it (`ConnectionTracker`), so the CLI looks twice, the settle time apart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from certrotator.backend.ports import CertificateStatus, Notification, Ports, RotationState
from certrotator.local import admin
from certrotator.local.adapters import LocalNotifier, RegistryPort, StatePort
from certrotator.local.db import Database
from certrotator.local.jobs import JobStore
from certrotator.local.registry import LocalRegistry
from certrotator.ops.reconcile.policy import (
    DEFAULT_SETTLE_S,
    ActiveExecution,
    CertificateFact,
    Evidence,
    EvidenceKind,
    ThingFacts,
)
from certrotator.ops.reconcile.runner import Options, Outcome, reconcile, settling_delay
from certrotator.protocol import is_rotation_document

Clock = Callable[[], float]
log = logging.getLogger("certrotator.reconcile")


@dataclass(frozen=True, slots=True)
class LiveConnection:
    client_id: str
    principal: str
    thing: str
    connected_at: float | None = None  # None: the engine does not say


class ConnectionTracker:
    """Since when each live (client id, certificate) has been seen: the engine's `connected_at` when it
    gives one, else the first time this tracker saw it. A pair gone from a later look is forgotten."""

    def __init__(self) -> None:
        self._since: dict[tuple[str, str], float] = {}
        self._things: dict[tuple[str, str], str] = {}

    def observe(self, connections: Iterable[LiveConnection], now: float) -> None:
        since: dict[tuple[str, str], float] = {}
        things: dict[tuple[str, str], str] = {}
        for c in connections:
            key = (c.client_id, c.principal)
            since[key] = c.connected_at if c.connected_at is not None else self._since.get(key, now)
            things[key] = c.thing
        self._since, self._things = since, things

    def evidence(self, thing: str) -> tuple[Evidence, ...]:
        return tuple(
            Evidence(principal, self._since[(client_id, principal)], EvidenceKind.LIVE_CONNECTION, client_id)
            for (client_id, principal), owner in sorted(self._things.items())
            if owner == thing
        )


def gather(
    registry: LocalRegistry,
    jobs: JobStore,
    thing: str,
    evidence: tuple[Evidence, ...],
    no_evidence_source: str | None,
    now: float,
) -> ThingFacts:
    """A thing's facts from the local registry and jobs. Certificate dates are notBefore (the local CA
    backdates it 5 minutes); only announcements are compared with them, and there are none locally."""
    attached = registry.thing_principals(thing)
    certificates: list[CertificateFact] = []
    for certificate_id in attached:
        cert = registry.certificate(certificate_id)
        if cert is not None:
            certificates.append(CertificateFact(certificate_id, cert.status, cert.not_before))
    state = registry.load_state(thing)
    named = (state.old_certificate_id, state.new_certificate_id) if state is not None else ()
    for certificate_id in dict.fromkeys(named):
        if not certificate_id or certificate_id in attached:
            continue  # `issuing` states name no new certificate yet
        cert = registry.certificate(certificate_id)
        if cert is not None:
            certificates.append(
                CertificateFact(certificate_id, cert.status, cert.not_before, False, cert.thing)
            )
    # AWS's $next: the head of the thing's active executions. A rotation behind another kind of job is
    # not visible here, so such a head counts as "may be a rotation".
    head = jobs.next_execution(thing)
    executions = (
        (ActiveExecution(head.job_id, head.status, True if is_rotation_document(head.document) else None),)
        if head is not None
        else ()
    )
    return ThingFacts(
        thing,
        tuple(certificates),
        state,
        executions,
        evidence,
        no_evidence_source,
        now,
        handlers_idle=True,  # handlers change a thing in one engine transaction: we read between them
    )


def _clear_if_unchanged(registry: LocalRegistry, thing: str, expected: RotationState) -> bool:
    with registry.db.transaction():
        if registry.load_state(thing) != expected:
            return False
        StatePort(registry).clear(thing)
        return True


# ------------------------------------------------------------------------------------ CLI: data dir


class DataDirBackend:
    """`certrotator reconcile --data-dir DIR`: the database directly, the running engine for evidence
    and for disconnecting what is deactivated."""

    def __init__(self, data_dir: Path, clock: Clock = time.time) -> None:
        self.data_dir = data_dir
        self.clock = clock
        self.db = Database(data_dir)
        self.registry = LocalRegistry(self.db)
        self.jobs = JobStore(self.db)
        self.tracker = ConnectionTracker()
        self.engine_running = False
        self.refresh()

    def close(self) -> None:
        self.db.close()

    def refresh(self) -> None:
        """Look at the engine's live connections (again)."""
        live, rows = admin.call(self.data_dir, "connections")
        self.engine_running = live
        self.tracker.observe((_connection(row) for row in rows) if live else (), self.clock())

    @property
    def report_only(self) -> str | None:
        if self.engine_running:
            return None
        return f"no engine is running on {self.data_dir}, so there is no evidence of use: report only"

    def things(self) -> list[str]:
        return self.registry.things()

    def facts(self, thing: str) -> ThingFacts:
        evidence = self.tracker.evidence(thing) if self.engine_running else ()
        no_source = None if self.engine_running else f"no engine is running on {self.data_dir}"
        return gather(self.registry, self.jobs, thing, evidence, no_source, self.clock())

    def recheck(self, thing: str) -> ThingFacts:
        self.refresh()
        return self.facts(thing)

    def retire(self, thing: str, certificate_id: str) -> None:
        if not self.engine_running:
            raise RuntimeError("retiring needs the running engine (it disconnects the certificate)")
        RegistryPort(self.registry, self._disconnect).delete_certificate(thing, certificate_id)

    def _disconnect(self, certificate_id: str) -> None:
        # The port has set INACTIVE in the database; the engine sets it again and closes its connections.
        admin.call(self.data_dir, "set_certificate_status", certificate_id=certificate_id, status="INACTIVE")

    def clear_state(self, thing: str, expected: RotationState) -> bool:
        return _clear_if_unchanged(self.registry, thing, expected)

    def notify(self, notification: Notification) -> None:
        # The engine's webhook is its own configuration: from here, the registry, the file and the log.
        LocalNotifier(self.registry, self.data_dir).notify(notification)


def _connection(row: dict[str, Any]) -> LiveConnection:
    connected_at = row.get("connected_at")
    return LiveConnection(
        str(row["client_id"]),
        str(row["principal"]),
        str(row["thing"]),
        float(connected_at) if isinstance(connected_at, int | float) else None,
    )


def reconcile_data_dir(
    data_dir: Path,
    options: Options,
    things: Sequence[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Clock = time.time,
) -> list[Outcome]:
    """One run from the CLI. Things that wait only for their live connections to settle are looked at
    once more after the settle time (without a dry run's or a report's changes, that is the whole wait)."""
    backend = DataDirBackend(data_dir, clock)
    try:
        options = replace(options, report_only=backend.report_only)
        outcomes = reconcile(backend, options, things)
        delay = settling_delay(outcomes)
        if delay is not None and backend.engine_running:
            sleep(delay)
            backend.refresh()
            again = {o.decision.thing for o in outcomes if o.decision.retry_after_s is not None}
            redone = {o.decision.thing: o for o in reconcile(backend, options, sorted(again))}
            outcomes = [redone.get(o.decision.thing, o) for o in outcomes]
        return outcomes
    finally:
        backend.close()


# ------------------------------------------------------------------------------ inside the engine


class EngineParts(Protocol):
    """What the in-engine reconciler uses of `LocalIoTCore`."""

    @property
    def registry(self) -> LocalRegistry: ...
    @property
    def jobs(self) -> JobStore: ...
    @property
    def ports(self) -> Ports: ...

    def connections(self) -> Sequence[Any]:
        """Live connections: objects with client_id, principal, thing (and connected_at, if known)."""
        ...


class EngineReconciler:
    """Periodic reconcile inside the engine (`local up --reconcile-every SECONDS`): call `run()` on the
    engine's loop. Its ports retire (and so disconnect), clear and notify. Connections are dated from
    the first run that saw them, so the first runs after start-up only watch; an operator-action
    notification is sent once per thing and situation, not on every run."""

    def __init__(self, engine: EngineParts, settle_s: float = DEFAULT_SETTLE_S, clock: Clock = time.time):
        self.engine = engine
        self.settle_s = settle_s
        self.clock = clock
        self.tracker = ConnectionTracker()
        self._told: dict[str, tuple[str, ...]] = {}

    def run(self, things: Sequence[str] | None = None) -> list[Outcome]:
        self.observe()
        return reconcile(_EngineBackend(self), Options(settle_s=self.settle_s), things)

    def observe(self) -> None:
        self.tracker.observe(
            (
                LiveConnection(c.client_id, c.principal, c.thing, getattr(c, "connected_at", None))
                for c in self.engine.connections()
            ),
            self.clock(),
        )

    def should_tell(self, notification: Notification) -> bool:
        details = notification.details
        situation = (
            details.get("findings", ""),
            details.get("decision", ""),
            details.get("retiredCertificateIds", ""),
            notification.outcome,
        )
        if self._told.get(notification.thing) == situation:
            return False
        self._told[notification.thing] = situation
        return True


async def run_every(reconciler: EngineReconciler, every_s: float, stop: asyncio.Event) -> None:
    """The timer for `local up --reconcile-every`: a task on the engine's loop, until `stop` is set.
    A failing run is logged and the next one comes as usual."""
    while True:
        try:
            await asyncio.wait_for(stop.wait(), timeout=every_s)
            return
        except TimeoutError:
            pass
        try:
            reconciler.run()
        except Exception:
            log.exception("periodic reconcile failed")


class _EngineBackend:
    def __init__(self, reconciler: EngineReconciler) -> None:
        self.r = reconciler
        self.engine = reconciler.engine

    def things(self) -> list[str]:
        return self.engine.registry.things()

    def facts(self, thing: str) -> ThingFacts:
        engine = self.engine
        return gather(
            engine.registry, engine.jobs, thing, self.r.tracker.evidence(thing), None, self.r.clock()
        )

    def recheck(self, thing: str) -> ThingFacts:
        self.r.observe()
        return self.facts(thing)

    def retire(self, thing: str, certificate_id: str) -> None:
        self.engine.ports.registry.delete_certificate(thing, certificate_id)

    def clear_state(self, thing: str, expected: RotationState) -> bool:
        if self.engine.ports.state.load(thing) != expected:
            return False
        self.engine.ports.state.clear(thing)
        return True

    def notify(self, notification: Notification) -> None:
        if self.r.should_tell(notification):
            self.engine.ports.notifier.notify(notification)


# ------------------------------------------------------- operator commands (local certificate ...)


def _live_connections(data_dir: Path, certificate_id: str) -> list[str] | None:
    """Client ids connected with the certificate; None when no engine runs (nobody knows)."""
    live, rows = admin.call(data_dir, "connections")
    if not live:
        return None
    return [str(r["client_id"]) for r in rows if str(r["principal"]) == certificate_id]


def detach_certificate(data_dir: Path, thing: str, certificate_id: str) -> str:
    """`local certificate detach THING ID`: end the exclusive attachment (the certificate stays, with
    its status and policies; a new connection with it is refused, live ones are not cut)."""
    db = Database(data_dir)
    try:
        registry = LocalRegistry(db)
        if certificate_id not in registry.thing_principals(thing):
            raise ValueError(f"certificate {certificate_id} is not attached to {thing!r}")
        registry.detach(thing, certificate_id)
    finally:
        db.close()
    return f"detached {certificate_id} from {thing}"


def delete_certificate(data_dir: Path, certificate_id: str, force: bool = False) -> str:
    """`local certificate delete ID [--force]`: retire a certificate the way the backend does (INACTIVE,
    which disconnects it through the running engine, detach, policies, delete). Refused while a live
    connection uses it, unless forced: that is the device's working certificate."""
    users = _live_connections(data_dir, certificate_id)
    if users and not force:
        raise ValueError(
            f"certificate {certificate_id} is in use by {', '.join(users)}: deleting it cuts the device off"
            " (--force to do it anyway)"
        )
    db = Database(data_dir)
    try:
        registry = LocalRegistry(db)
        cert = registry.certificate(certificate_id)
        if cert is None:
            raise ValueError(f"certificate {certificate_id} does not exist")

        def disconnect(cid: str) -> None:
            admin.call(
                data_dir,
                "set_certificate_status",
                certificate_id=cid,
                status=CertificateStatus.INACTIVE.value,
            )

        RegistryPort(registry, disconnect).delete_certificate(cert.thing or "", certificate_id)
    finally:
        db.close()
    unknown = " (no engine running: whether a device used it is unknown)" if users is None else ""
    return f"deleted {certificate_id}{unknown}"
