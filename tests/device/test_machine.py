"""The device's rotation state machine, a pure function: every (state, event) pair, the timers, the
seed's bug classes and the happy path's exact messages (DESIGN.md §2-3)."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, get_args

import pytest
from cryptography import x509

from certrotator.crypto import KeyAlgorithm, SigningAlgorithm
from certrotator.device import machine as m
from certrotator.device.agent import Agent, AgentSettings
from certrotator.device.machine import Phase
from certrotator.device.reactor import Reactor
from certrotator.device.transport import OnMessage, OnReady, OnResumed
from certrotator.protocol import (
    FAILURE_REASON_KEY,
    JOB_DOCUMENT,
    STATUS_DETAILS_KEY,
    JobExecutionStatus,
    Reply,
    TopicKind,
    Topics,
    encode,
    parse_topic,
)

THING, OTHER_THING = "thing-1", "thing-2"
JOB, OTHER_JOB = "job-1", "job-2"
TIMEOUT_S = 12.5
EPOCH = 7  # every state of the matrix is at this epoch; Timeout(EPOCH) is its current timer
PEM = "-----BEGIN CERTIFICATE-----\nMIIBexample\n-----END CERTIFICATE-----\n"

# The contract's topics, spelled out (DESIGN.md §2); test_topics_are_the_contracts ties them to Topics.
JOBS = f"$aws/things/{THING}/jobs"
CERTS = f"awslabs/things/{THING}/certificate"
NOTIFY_NEXT = f"{JOBS}/notify-next"
NEXT_GET = f"{JOBS}/$next/get"
UPDATE = f"{JOBS}/{JOB}/update"
CREATE = f"{CERTS}/create"
COMMIT = f"{CERTS}/commit"
ANNOUNCE = f"{CERTS}/announce"

BASE = m.initial(THING, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256, TIMEOUT_S)
WAITING = frozenset(Phase) - {Phase.IDLE}


def execution(job_id: Any = JOB, status: str = "QUEUED", document: Any = JOB_DOCUMENT) -> dict[str, Any]:
    """A job execution as AWS IoT Jobs sends it in notify-next and $next/get replies."""
    return {
        "jobId": job_id,
        "thingName": THING,
        "status": status,
        "queuedAt": 1_700_000_000,
        "lastUpdatedAt": 1_700_000_000,
        "versionNumber": 1,
        "executionNumber": 1,
        "jobDocument": document,
    }


def message(topic: str, body: dict[str, Any] | list[Any] | bytes) -> m.Message:
    return m.Message(topic, body if isinstance(body, bytes) else json.dumps(body).encode())


def with_execution(body: dict[str, Any] | None) -> dict[str, Any]:
    return {"timestamp": 1_700_000_001} | ({} if body is None else {"execution": body})


# -------------------------------------------------------------------------------------------- states

# One state per situation the device can be in (the happy path test proves each is reachable).
STATES: dict[str, m.State] = {
    "idle": replace(BASE, epoch=EPOCH),
    "getting": replace(BASE, phase=Phase.GETTING_JOB, epoch=EPOCH),
    "getting+backup": replace(BASE, phase=Phase.GETTING_JOB, has_backup=True, epoch=EPOCH),
    "updating": replace(BASE, phase=Phase.UPDATING_JOB, job_id=JOB, epoch=EPOCH),
    "creating": replace(BASE, phase=Phase.CREATING_CERTIFICATE, job_id=JOB, epoch=EPOCH),
    # create accepted: new pair installed, waiting for the restart (no timer: the agent's connect timer)
    "installed": replace(BASE, phase=Phase.CREATING_CERTIFICATE, job_id=JOB, has_backup=True, epoch=EPOCH),
    "committing": replace(BASE, phase=Phase.COMMITTING_CERTIFICATE, job_id=JOB, has_backup=True, epoch=EPOCH),
}

# -------------------------------------------------------------------------------------------- events

REJECTED_THROTTLED = {"code": "ThrottlingException", "message": "Rate exceeded"}  # AWS IoT Jobs' shape

EVENTS: dict[str, m.Event] = {
    "Started(no backup)": m.Started(has_backup=False),
    "Started(backup)": m.Started(has_backup=True),
    "ConnectionResumed": m.ConnectionResumed(),
    "ConnectionResumed(committed)": m.ConnectionResumed(committed_job=JOB),
    "ResyncDue": m.ResyncDue(),
    "ConnectFailed": m.ConnectFailed("no connection within 30 s"),
    "Timeout(current)": m.Timeout(EPOCH),
    "Timeout(stale)": m.Timeout(EPOCH - 1),
    "ConfigChanged": m.ConfigChanged(KeyAlgorithm.RSA_3072, SigningAlgorithm.SHA384WITHRSA, 3.0),
    "StoreFailed": m.StoreFailed("the new certificate is not for the key this device generated"),
    # notify-next
    "notify QUEUED rotation": message(NOTIFY_NEXT, with_execution(execution())),
    "notify IN_PROGRESS rotation": message(NOTIFY_NEXT, with_execution(execution(status="IN_PROGRESS"))),
    "notify QUEUED other job": message(
        NOTIFY_NEXT, with_execution(execution(OTHER_JOB, document={"operation": "REBOOT"}))
    ),
    "notify empty": message(NOTIFY_NEXT, with_execution(None)),
    # $next/get replies
    "get accepted IN_PROGRESS": message(
        f"{NEXT_GET}/accepted", with_execution(execution(status="IN_PROGRESS"))
    ),
    "get accepted QUEUED": message(f"{NEXT_GET}/accepted", with_execution(execution())),
    "get accepted none": message(f"{NEXT_GET}/accepted", with_execution(None)),
    "get accepted other job": message(
        f"{NEXT_GET}/accepted",
        with_execution(execution(OTHER_JOB, status="IN_PROGRESS", document={"operation": "REBOOT"})),
    ),
    "get rejected": message(f"{NEXT_GET}/rejected", REJECTED_THROTTLED),
    # {jobId}/update replies
    "update accepted": message(f"{UPDATE}/accepted", {"timestamp": 1_700_000_002}),
    "update rejected": message(f"{UPDATE}/rejected", {"code": "InvalidStateTransition", "message": "no"}),
    "update accepted other job": message(f"{JOBS}/{OTHER_JOB}/update/accepted", {"timestamp": 1}),
    "update rejected other job": message(f"{JOBS}/{OTHER_JOB}/update/rejected", {"message": "no"}),
    # backend replies
    "create accepted": message(f"{CREATE}/accepted", {"certificatePem": PEM}),
    "create rejected": message(f"{CREATE}/rejected", {"errorMsg": "CSR signature does not verify"}),
    "commit accepted": message(f"{COMMIT}/accepted", {}),
    "commit rejected": message(
        f"{COMMIT}/rejected", {"errorMsg": "connection was not authenticated by the new certificate"}
    ),
}

# Malformed payloads, foreign and off-contract topics: ignored in every state (with a log line).
MALFORMED: dict[str, m.Message] = {
    "notify: bad JSON": message(NOTIFY_NEXT, b'{"execution": {'),
    "notify: not an object": message(NOTIFY_NEXT, [execution()]),
    "notify: not UTF-8": message(NOTIFY_NEXT, b"\xff\xfe{}"),
    "notify: execution without jobId": message(
        NOTIFY_NEXT, {"execution": {k: v for k, v in execution().items() if k != "jobId"}}
    ),
    "notify: execution not an object": message(NOTIFY_NEXT, {"execution": "QUEUED"}),
    "notify: too large": message(NOTIFY_NEXT, {"execution": execution(), "pad": "x" * 200_000}),
    "get accepted: bad JSON": message(f"{NEXT_GET}/accepted", b"IN_PROGRESS"),
    "get accepted: not an object": message(f"{NEXT_GET}/accepted", b'"IN_PROGRESS"'),
    "get accepted: jobId not a string": message(
        f"{NEXT_GET}/accepted", with_execution(execution(job_id=1, status="IN_PROGRESS"))
    ),
    "get rejected: bad JSON": message(f"{NEXT_GET}/rejected", b"throttled"),
    "get rejected: empty": message(f"{NEXT_GET}/rejected", b""),
    "update accepted: bad JSON": message(f"{UPDATE}/accepted", b"accepted"),
    "update rejected: not an object": message(f"{UPDATE}/rejected", b"null"),
    "create accepted: certificatePem not a PEM": message(f"{CREATE}/accepted", {"certificatePem": "MIIB"}),
    "create accepted: no certificatePem": message(f"{CREATE}/accepted", {"certificate": PEM}),
    "create accepted: bad JSON": message(f"{CREATE}/accepted", PEM.encode()),
    "create rejected: not an object": message(f"{CREATE}/rejected", ["rejected"]),
    "commit accepted: bad JSON": message(f"{COMMIT}/accepted", b"ok"),
    "commit accepted: empty": message(f"{COMMIT}/accepted", b""),
    "commit rejected: bad JSON": message(f"{COMMIT}/rejected", b"{"),
    # another thing's messages (a shared subscription or a misrouted message)
    "notify for another thing": message(
        f"$aws/things/{OTHER_THING}/jobs/notify-next", with_execution(execution())
    ),
    "get accepted for another thing": message(
        f"$aws/things/{OTHER_THING}/jobs/$next/get/accepted",
        with_execution(execution(status="IN_PROGRESS")),
    ),
    "create accepted for another thing": message(
        f"awslabs/things/{OTHER_THING}/certificate/create/accepted", {"certificatePem": PEM}
    ),
    "commit accepted for another thing": message(
        f"awslabs/things/{OTHER_THING}/certificate/commit/accepted", {}
    ),
    # off-contract topics, and the echo of the device's own requests
    "off contract: shadow": message(f"$aws/things/{THING}/shadow/update/accepted", {}),
    "off contract: garbage topic": message("hello/world", {}),
    "off contract: empty topic": message("", {}),
    "off contract: bad thing name": message("$aws/things/bad thing/jobs/notify-next", {}),
    "off contract: notify-next reply": message(f"{NOTIFY_NEXT}/accepted", with_execution(execution())),
    "off contract: job execution event": message(
        Topics.job_execution_event(JOB, JobExecutionStatus.FAILED), {"jobId": JOB}
    ),
    "get accepted for a named job": message(
        f"{JOBS}/{JOB}/get/accepted", with_execution(execution(status="IN_PROGRESS"))
    ),
    "get rejected for a named job": message(f"{JOBS}/{JOB}/get/rejected", REJECTED_THROTTLED),
    "echo: $next/get request": message(NEXT_GET, {}),
    "echo: update request": message(UPDATE, {"status": "IN_PROGRESS"}),
    "echo: create request": message(CREATE, {"jobId": JOB, "csr": "x"}),
    "echo: commit request": message(COMMIT, {"jobId": JOB}),
}
EVENTS |= MALFORMED


# -------------------------------------------------------------------------------------------- matrix


@dataclass(frozen=True)
class Exp:
    """Expected outcome: the next phase (None: stays) and the action types, in order."""

    phase: Phase | None
    actions: tuple[type[m.Action], ...] = ()
    ignored: bool = False  # the state comes back unchanged


_ = Exp(None, ignored=True)  # ignored
CONFIG = Exp(None)  # same phase, new configuration, no actions
ASK = Exp(Phase.GETTING_JOB, (m.Publish, m.ArmTimer))  # publish $next/get
GIVE_UP = Exp(Phase.IDLE)  # stop waiting, nothing to undo
RETRY = Exp(Phase.IDLE, (m.Restart,))  # reconnect after a back-off
ROLL_BACK = Exp(Phase.IDLE, (m.RollBack, m.Restart))
FAIL_ROLL_BACK = Exp(Phase.IDLE, (m.Publish, m.RollBack, m.Restart))
FAIL = Exp(Phase.IDLE, (m.Publish,))
FAIL_DISCARD = Exp(Phase.IDLE, (m.Publish, m.DiscardPreparedKey))
TAKE = Exp(Phase.UPDATING_JOB, (m.Publish, m.ArmTimer))  # publish IN_PROGRESS
REQUEST = Exp(Phase.CREATING_CERTIFICATE, (m.RequestCertificate, m.ArmTimer))
INSTALL = Exp(Phase.CREATING_CERTIFICATE, (m.InstallCertificate, m.Restart))
COMMIT_ = Exp(Phase.COMMITTING_CERTIFICATE, (m.Publish, m.ArmTimer))  # publish commit
RETAKE = TAKE  # publish IN_PROGRESS again, fresh timer
RECOMMIT = COMMIT_  # publish commit again, fresh timer
DONE = Exp(Phase.IDLE, (m.DeleteBackup, m.Publish, m.Publish))  # delete backup, SUCCEEDED, announce
# On a new connection with settled credentials (no backup) the device also announces them, first.
A_ASK = Exp(Phase.GETTING_JOB, (m.Publish, m.Publish, m.ArmTimer))

COLUMNS = ("idle", "getting", "getting+backup", "updating", "creating", "installed", "committing")

# fmt: off
MATRIX: dict[str, tuple[Exp, ...]] = {
    #                                idle      getting   get+bak    updating  creating      installed     committing
    "Started(no backup)":           (A_ASK,    A_ASK,    A_ASK,     A_ASK,    A_ASK,        A_ASK,        A_ASK),
    "Started(backup)":              (ASK,      ASK,      ASK,       ASK,      ASK,          ASK,          ASK),
    # The connection came back by itself: ask again what is idempotent, leave the rest to the timers.
    "ConnectionResumed":            (ASK,      ASK,      ASK,       RETAKE,   _,            _,            RECOMMIT),
    "ConnectionResumed(committed)": (ASK,      ASK,      ASK,       RETAKE,   _,            _,            RECOMMIT),
    "ResyncDue":                    (ASK,      _,        _,         _,        _,            _,            _),
    "ConnectFailed":                (RETRY,    RETRY,    ROLL_BACK, RETRY,    RETRY,        ROLL_BACK,    ROLL_BACK),
    "Timeout(current)":             (_,        GIVE_UP,  ROLL_BACK, RETAKE,   FAIL_DISCARD, _,            FAIL_ROLL_BACK),
    "Timeout(stale)":               (_,        _,        _,         _,        _,            _,            _),
    "ConfigChanged":                (CONFIG,   CONFIG,   CONFIG,    CONFIG,   CONFIG,       CONFIG,       CONFIG),
    "StoreFailed":                  (_,        _,        _,         _,        FAIL_DISCARD, FAIL_DISCARD, _),
    "notify QUEUED rotation":       (TAKE,     _,        _,         _,        _,            _,            _),
    "notify IN_PROGRESS rotation":  (_,        _,        _,         _,        _,            _,            _),
    "notify QUEUED other job":      (_,        _,        _,         _,        _,            _,            _),
    "notify empty":                 (_,        _,        _,         _,        _,            _,            _),
    "get accepted IN_PROGRESS":     (_,        FAIL,     COMMIT_,   _,        _,            _,            _),
    "get accepted QUEUED":          (_,        TAKE,     ROLL_BACK, _,        _,            _,            _),
    "get accepted none":            (_,        GIVE_UP,  ROLL_BACK, _,        _,            _,            _),
    "get accepted other job":       (_,        GIVE_UP,  ROLL_BACK, _,        _,            _,            _),
    "get rejected":                 (_,        GIVE_UP,  ROLL_BACK, _,        _,            _,            _),
    "update accepted":              (_,        _,        _,         REQUEST,  _,            _,            _),
    "update rejected":              (_,        _,        _,         GIVE_UP,  _,            _,            _),
    "update accepted other job":    (_,        _,        _,         _,        _,            _,            _),
    "update rejected other job":    (_,        _,        _,         _,        _,            _,            _),
    "create accepted":              (_,        _,        _,         _,        INSTALL,      _,            _),
    "create rejected":              (_,        _,        _,         _,        FAIL_DISCARD, _,            _),
    "commit accepted":              (_,        _,        _,         _,        _,            _,            DONE),
    "commit rejected":              (_,        _,        _,         _,        _,            _,            FAIL_ROLL_BACK),
    **{name: (_, _, _, _, _, _, _) for name in MALFORMED},
}
# fmt: on


def test_the_matrix_covers_every_phase_event_kind_and_device_topic() -> None:
    assert tuple(STATES) == COLUMNS
    assert {state.phase for state in STATES.values()} == set(Phase), "a phase without expectations"
    assert {type(event) for event in EVENTS.values()} == set(get_args(m.Event)), "an event kind without"
    assert set(MATRIX) == set(EVENTS)
    assert all(len(row) == len(STATES) for row in MATRIX.values())
    assert all(state.epoch == EPOCH for state in STATES.values())
    # Every reply topic the device subscribes to, and every topic kind but the backend-only one.
    received: set[tuple[TopicKind, Reply | None]] = set()
    for name, event in EVENTS.items():
        if isinstance(event, m.Message) and name not in MALFORMED:
            topic = parse_topic(event.topic)
            received.add((topic.kind, topic.reply))
    device_facing = {(TopicKind.NOTIFY_NEXT, None)} | {
        (kind, reply)
        # announce: device -> cloud with no reply; job execution events: cloud -> backend only
        for kind in set(TopicKind)
        - {TopicKind.NOTIFY_NEXT, TopicKind.JOB_EXECUTION_EVENT, TopicKind.ANNOUNCE}
        for reply in Reply
    }
    assert device_facing <= received


def check_invariants(state: m.State, event: m.Event, new: m.State, actions: list[m.Action]) -> None:
    """What must hold for every transition, whatever the table says."""
    kinds = [type(action) for action in actions]
    assert (new.job_id is None) is (new.phase in (Phase.IDLE, Phase.GETTING_JOB))
    assert new.epoch >= state.epoch
    if new.phase is not state.phase:
        assert new.epoch > state.epoch, "a phase change must make every armed timer stale"
    # Every transition into a waiting phase arms that state's timer with the new epoch, as its last
    # action; nothing else arms one (the only exception: installed, where the restart decides).
    timers = [action for action in actions if isinstance(action, m.ArmTimer)]
    entered = new.phase in WAITING and new.epoch != state.epoch and m.InstallCertificate not in kinds
    assert timers == ([m.ArmTimer(new.timeout_s, new.epoch)] if entered else [])
    if entered:
        assert actions[-1] == timers[0]
    # Credentials: rollback only of a backup, always followed by a restart with the old pair.
    if m.RollBack in kinds:
        assert state.has_backup and not new.has_backup and new.phase is Phase.IDLE
        assert kinds[kinds.index(m.RollBack) + 1] is m.Restart
    if m.DeleteBackup in kinds:
        assert state.has_backup and not new.has_backup
    if m.InstallCertificate in kinds:
        assert new.has_backup and kinds[-1] is m.Restart
    if isinstance(event, m.Started):
        assert new.has_backup is event.has_backup
    # The announcement: only of settled credentials, on every connection that has them, after a commit.
    announced = [a for a in actions if isinstance(a, m.Publish) and a.topic == ANNOUNCE]
    assert len(announced) <= 1
    if announced:
        assert announced[0].message == {}
        assert not new.has_backup
    if isinstance(event, m.Started) and not new.has_backup:
        assert announced and actions[0] == announced[0]
    if isinstance(event, m.ConnectionResumed | m.ResyncDue):
        assert not announced  # same credentials as the connection that announced
    if m.DeleteBackup in kinds:
        assert announced
    if isinstance(event, m.ConnectionResumed | m.ResyncDue):
        # Same connection, same credentials: re-synchronising never touches them.
        assert new.has_backup is state.has_backup
        assert not {m.RollBack, m.Restart, m.DeleteBackup, m.InstallCertificate} & set(kinds)
        if new.phase is Phase.GETTING_JOB:
            assert new.committed_job == event.committed_job
    if isinstance(event, m.ConfigChanged):
        assert new == replace(
            state,
            key_algorithm=event.key_algorithm,
            signing_algorithm=event.signing_algorithm,
            timeout_s=event.timeout_s,
        )
    # Publishes: requests of this thing only; every job update says who and, if FAILED, why (seed #62).
    for action in actions:
        if not isinstance(action, m.Publish):
            continue
        topic = parse_topic(action.topic)
        assert topic.thing == THING
        assert topic.reply is None
        encode(action.message)  # JSON-serialisable
        if topic.kind is TopicKind.UPDATE:
            details = action.message["statusDetails"]
            assert details[STATUS_DETAILS_KEY]
            if action.message["status"] == JobExecutionStatus.FAILED:
                assert details[FAILURE_REASON_KEY]
                assert not new.has_backup, "never fail the job while the new pair stays installed"


@pytest.mark.parametrize(
    ("column", "event_name"),
    [pytest.param(c, e, id=f"{c}|{e}") for c, e in itertools.product(COLUMNS, MATRIX)],
)
def test_transition(column: str, event_name: str) -> None:
    state, event = STATES[column], EVENTS[event_name]
    expected = MATRIX[event_name][COLUMNS.index(column)]
    new, actions = m.transition(state, event)
    if expected.ignored:
        assert (new, actions) == (state, [])
        return
    assert new.phase is (expected.phase or state.phase)
    assert tuple(type(action) for action in actions) == expected.actions
    check_invariants(state, event, new, actions)


def test_malformed_and_foreign_messages_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="certrotator.device")
    for name, event in MALFORMED.items():
        for state in (STATES["idle"], STATES["getting+backup"], STATES["committing"]):
            caplog.clear()
            assert m.transition(state, event) == (state, [])
            assert caplog.records, f"{name}: ignored without a log line"


# ---------------------------------------------------------------------------------------- happy path


class Run:
    """Feeds events from the initial state, keeping every state visited."""

    def __init__(self, state: m.State = BASE) -> None:
        self.state = state
        self.visited = [state]

    def __call__(self, event: m.Event) -> list[m.Action]:
        new, actions = m.transition(self.state, event)
        check_invariants(self.state, event, new, actions)
        self.state = new
        self.visited.append(new)
        return actions


def test_topics_are_the_contracts() -> None:
    assert Topics.notify_next(THING) == NOTIFY_NEXT
    assert Topics.next_get(THING) == NEXT_GET
    assert Topics.job_update(THING, JOB) == UPDATE
    assert Topics.create(THING) == CREATE
    assert Topics.commit(THING) == COMMIT
    assert Topics.announce(THING) == ANNOUNCE


def test_happy_path_publishes_exactly_the_contracts_messages() -> None:
    run = Run()
    assert run(m.Started(has_backup=False)) == [
        m.Publish(ANNOUNCE, {}),  # settled credentials: the evidence reconcile weighs
        m.Publish(NEXT_GET, {}),
        m.ArmTimer(TIMEOUT_S, run.state.epoch),
    ]
    assert run(EVENTS["get accepted none"]) == []
    assert run.state.phase is Phase.IDLE

    assert run(EVENTS["notify QUEUED rotation"]) == [
        m.Publish(UPDATE, {"status": "IN_PROGRESS", "statusDetails": {STATUS_DETAILS_KEY: "UpdatingJob"}}),
        m.ArmTimer(TIMEOUT_S, run.state.epoch),
    ]
    assert (run.state.phase, run.state.job_id) == (Phase.UPDATING_JOB, JOB)

    assert run(EVENTS["update accepted"]) == [
        m.RequestCertificate(JOB, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256),
        m.ArmTimer(TIMEOUT_S, run.state.epoch),
    ]
    assert run(EVENTS["create accepted"]) == [
        m.InstallCertificate(JOB, PEM),
        m.Restart("new credentials installed"),
    ]
    assert run.state.has_backup

    # After the restart, with the new credentials.
    assert run(m.Started(has_backup=True)) == [
        m.Publish(NEXT_GET, {}),
        m.ArmTimer(TIMEOUT_S, run.state.epoch),
    ]
    assert run(EVENTS["get accepted IN_PROGRESS"]) == [
        m.Publish(COMMIT, {"jobId": JOB}),
        m.ArmTimer(TIMEOUT_S, run.state.epoch),
    ]
    assert run(EVENTS["commit accepted"]) == [
        m.DeleteBackup(JOB),
        m.Publish(UPDATE, {"status": "SUCCEEDED", "statusDetails": {STATUS_DETAILS_KEY: "Committed"}}),
        m.Publish(ANNOUNCE, {}),
    ]
    assert (run.state.phase, run.state.job_id, run.state.has_backup) == (Phase.IDLE, None, False)
    assert run(EVENTS["update accepted"]) == []  # the reply to SUCCEEDED changes nothing

    # Every state of the matrix is one the device really passes through.
    visited = {replace(state, epoch=EPOCH) for state in run.visited}
    assert set(STATES.values()) <= visited


def test_the_job_from_the_get_reply_is_taken_too() -> None:
    """A job queued while the device was offline arrives in the $next/get reply, not in notify-next."""
    run = Run()
    run(m.Started(has_backup=False))
    assert run(EVENTS["get accepted QUEUED"]) == [
        m.Publish(UPDATE, {"status": "IN_PROGRESS", "statusDetails": {STATUS_DETAILS_KEY: "UpdatingJob"}}),
        m.ArmTimer(TIMEOUT_S, run.state.epoch),
    ]


def test_a_configuration_change_applies_to_the_next_steps() -> None:
    run = Run()
    run(m.Started(has_backup=False))
    run(EVENTS["get accepted QUEUED"])
    state_before = run.state
    assert run(m.ConfigChanged(KeyAlgorithm.RSA_2048, SigningAlgorithm.SHA256WITHRSAANDMGF1, 4.0)) == []
    assert (run.state.phase, run.state.job_id, run.state.epoch) == (
        state_before.phase,
        state_before.job_id,
        state_before.epoch,
    )
    assert run(EVENTS["update accepted"]) == [
        m.RequestCertificate(JOB, KeyAlgorithm.RSA_2048, SigningAlgorithm.SHA256WITHRSAANDMGF1),
        m.ArmTimer(4.0, run.state.epoch),
    ]


# -------------------------------------------------------------------------------------------- timers

# From the initial state to each waiting state, and what its own timer does when it fires.
PATHS: dict[str, tuple[list[m.Event], Exp]] = {
    # name: (events from the initial state, outcome when the timer armed last fires)
    "getting": ([m.Started(False)], GIVE_UP),
    "getting+backup": ([m.Started(True)], ROLL_BACK),
    "updating": ([m.Started(False), EVENTS["get accepted QUEUED"]], RETAKE),
    "creating": ([m.Started(False), EVENTS["get accepted QUEUED"], EVENTS["update accepted"]], FAIL_DISCARD),
    # The timer armed on entering CreatingCertificate is stale once installed: the agent's connect
    # timer (-> ConnectFailed) decides after the restart.
    "installed": (
        [
            m.Started(False),
            EVENTS["get accepted QUEUED"],
            EVENTS["update accepted"],
            EVENTS["create accepted"],
        ],
        _,
    ),
    "committing": ([m.Started(True), EVENTS["get accepted IN_PROGRESS"]], FAIL_ROLL_BACK),
}


def test_every_waiting_state_has_a_timeout_path() -> None:
    assert {name for name, state in STATES.items() if state.phase in WAITING} == set(PATHS)


@pytest.mark.parametrize("name", list(PATHS))
def test_the_timer_armed_on_entry_fires_into_the_timeout_transition(name: str) -> None:
    events, expected = PATHS[name]
    run = Run()
    timers: list[m.ArmTimer] = []
    for event in events:
        timers += [action for action in run(event) if isinstance(action, m.ArmTimer)]
    assert replace(run.state, epoch=EPOCH) == STATES[name]
    assert timers
    assert all(timer.seconds == TIMEOUT_S for timer in timers)
    state = run.state
    actions = run(m.Timeout(timers[-1].epoch))
    if expected.ignored:
        assert (run.state, actions) == (state, [])
        return
    assert run.state.phase is expected.phase
    assert tuple(type(action) for action in actions) == expected.actions
    # The timer that fired is spent: firing it again does nothing.
    after = run.state
    assert run(m.Timeout(timers[-1].epoch)) == []
    assert run.state == after


def test_no_stale_timer_fires_along_the_happy_path() -> None:
    run = Run()
    armed: list[int] = []
    sequence = [
        m.Started(False),
        EVENTS["get accepted none"],
        EVENTS["notify QUEUED rotation"],
        EVENTS["update accepted"],
        EVENTS["create accepted"],
        m.Started(True),
        EVENTS["get accepted IN_PROGRESS"],
        EVENTS["commit accepted"],
    ]
    for event in sequence:
        for epoch in armed:  # every timer armed before the current one is stale now
            if epoch != run.state.epoch:
                assert m.transition(run.state, m.Timeout(epoch)) == (run.state, [])
        armed += [action.epoch for action in run(event) if isinstance(action, m.ArmTimer)]
    assert len(armed) == 5  # get, update, create, get, commit
    assert len(set(armed)) == len(armed)


# --------------------------------------------------------------------------------- seed bug classes


@pytest.mark.parametrize(
    "reply",
    [REJECTED_THROTTLED, {"errorMsg": "Rate exceeded"}],
    ids=["aws-jobs-shape", "errorMsg-shape"],
)
def test_seed_68_get_rejected_after_a_restart_with_a_backup_rolls_back(reply: dict[str, Any]) -> None:
    run = Run(m.initial(THING, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256, TIMEOUT_S, True))
    run(m.Started(has_backup=True))
    actions = run(message(f"{NEXT_GET}/rejected", reply))
    assert actions == [m.RollBack(), m.Restart("rolled back: get rejected: Rate exceeded")]
    assert (run.state.phase, run.state.has_backup) == (Phase.IDLE, False)


def test_get_rejected_without_a_backup_only_waits() -> None:
    run = Run()
    run(m.Started(has_backup=False))
    assert run(EVENTS["get rejected"]) == []
    assert run.state.phase is Phase.IDLE


def test_seed_21_a_hanging_subscription_with_new_credentials_rolls_back() -> None:
    # Installed, restarted in-process: the agent's connect timer turns the hang into ConnectFailed.
    run = Run()
    for event in PATHS["installed"][0]:
        run(event)
    actions = run(m.ConnectFailed("no connection within 30 s"))
    assert actions == [
        m.RollBack(),
        m.Restart("rolled back: cannot connect with the new credentials: no connection within 30 s"),
    ]
    # Restarted as a new process (Greengrass): the store's backup is known from boot.
    boot = m.initial(THING, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256, TIMEOUT_S, True)
    assert [type(a) for a in m.transition(boot, m.ConnectFailed("subscribe timed out"))[1]] == [
        m.RollBack,
        m.Restart,
    ]
    # Subscribed, but the $next/get reply never comes: the state's timer rolls back too.
    run = Run(boot)
    timer = run(m.Started(has_backup=True))[-1]
    assert isinstance(timer, m.ArmTimer)
    assert [type(a) for a in run(m.Timeout(timer.epoch))] == [m.RollBack, m.Restart]
    # Back on the old pair, the device fails the job with the reason (seed #62).
    run(m.Started(has_backup=False))
    (failed,) = run(EVENTS["get accepted IN_PROGRESS"])
    assert isinstance(failed, m.Publish)
    assert failed.topic == UPDATE
    assert failed.message["status"] == "FAILED"
    assert "rolled back" in failed.message["statusDetails"][FAILURE_REASON_KEY]


def test_a_connection_failure_without_a_backup_retries_with_back_off() -> None:
    new, actions = m.transition(STATES["idle"], m.ConnectFailed("connection refused"))
    assert actions == [m.Restart("connection failed: connection refused", backoff=True)]
    assert new.phase is Phase.IDLE


FAILURES: list[Any] = [
    pytest.param(
        "creating",
        message(f"{CREATE}/rejected", {"errorMsg": "CSR key not allowed: RSA key of 1024 bits is too small"}),
        "CreatingCertificate",
        ["create rejected", "RSA key of 1024 bits is too small"],
        id="create-rejected",
    ),
    pytest.param(
        "creating",
        m.Timeout(EPOCH),
        "CreatingCertificate",
        ["no reply in 12.5 s while CreatingCertificate"],
        id="create-timeout",
    ),
    pytest.param(
        "creating",
        m.StoreFailed("generating the new key failed: token full"),
        "CreatingCertificate",
        ["generating the new key failed: token full"],
        id="prepare-failed",
    ),
    pytest.param(
        "installed",
        m.StoreFailed("installing the new certificate failed: it is not for the key this device generated"),
        "CreatingCertificate",
        ["installing the new certificate failed", "not for the key this device generated"],
        id="install-failed",
    ),
    pytest.param(
        "committing",
        message(
            f"{COMMIT}/rejected", {"errorMsg": "connection was not authenticated by the new certificate"}
        ),
        "CommittingCertificate",
        ["commit rejected", "not authenticated by the new certificate"],
        id="commit-rejected",
    ),
    pytest.param(
        "committing",
        m.Timeout(EPOCH),
        "CommittingCertificate",
        ["no reply in 12.5 s while CommittingCertificate"],
        id="commit-timeout",
    ),
    pytest.param(
        "getting",
        EVENTS["get accepted IN_PROGRESS"],
        "GettingJob",
        ["not rotating for this job", "rolled back"],
        id="restarted-without-new-credentials",
    ),
]


@pytest.mark.parametrize(("column", "event", "phase", "fragments"), FAILURES)
def test_seed_62_every_failure_names_its_cause_in_status_details(
    column: str, event: m.Event, phase: str, fragments: list[str]
) -> None:
    _, actions = m.transition(STATES[column], event)
    (failed,) = [a for a in actions if isinstance(a, m.Publish)]
    assert failed.topic == UPDATE
    assert failed.message["status"] == "FAILED"
    details = failed.message["statusDetails"]
    assert set(details) == {STATUS_DETAILS_KEY, FAILURE_REASON_KEY}
    assert details[STATUS_DETAILS_KEY] == phase
    for fragment in fragments:
        assert fragment in details[FAILURE_REASON_KEY]


def test_every_failed_update_of_the_matrix_carries_a_reason() -> None:
    """Seed #62 over the whole table: count the FAILED updates, each checked by check_invariants."""
    failed = 0
    for column, event_name in itertools.product(COLUMNS, MATRIX):
        for action in m.transition(STATES[column], EVENTS[event_name])[1]:
            if isinstance(action, m.Publish) and action.message.get("status") == "FAILED":
                assert action.message["statusDetails"][FAILURE_REASON_KEY]
                failed += 1
    assert failed == 7  # timeouts 2, StoreFailed 2, create rejected, commit rejected, get IN_PROGRESS


def test_a_duplicate_create_reply_after_install_changes_nothing() -> None:
    """A redelivered create/accepted (QoS 1) between install and restart must not install again, and
    a late create/rejected must not fail a job whose new certificate is already in place."""
    run = Run()
    for event in PATHS["installed"][0]:
        run(event)
    installed = run.state
    assert run(EVENTS["create accepted"]) == []
    assert run(EVENTS["create rejected"]) == []
    assert run.state == installed


def test_no_rotation_job_for_credentials_on_trial_rolls_back() -> None:
    """The job is gone (e.g. TIMED_OUT: the backend deletes the new certificate) while the new pair is on
    trial: keep the old pair, which the backend deletes only after this device's SUCCEEDED."""
    run = Run(m.initial(THING, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256, TIMEOUT_S, True))
    run(m.Started(has_backup=True))
    actions = run(EVENTS["get accepted none"])
    assert [type(a) for a in actions] == [m.RollBack, m.Restart]
    assert m.DeleteBackup not in [type(a) for a in actions]


# ----------------------------------------------------------------------------- re-synchronisation

IN_PROGRESS_UPDATE = m.Publish(
    UPDATE, {"status": "IN_PROGRESS", "statusDetails": {STATUS_DETAILS_KEY: "UpdatingJob"}}
)


def test_a_job_queued_while_the_connection_was_down_is_taken_after_it_resumes() -> None:
    """notify-next is not replayed to a clean session: after the drop only asking finds the job."""
    run = Run()
    run(m.Started(has_backup=False))
    run(EVENTS["get accepted none"])
    assert run.state.phase is Phase.IDLE
    # (connection drops; the job is created; its notify-next is lost; the CRT reconnects)
    assert run(m.ConnectionResumed()) == [m.Publish(NEXT_GET, {}), m.ArmTimer(TIMEOUT_S, run.state.epoch)]
    assert run(EVENTS["get accepted QUEUED"]) == [IN_PROGRESS_UPDATE, m.ArmTimer(TIMEOUT_S, run.state.epoch)]
    assert (run.state.phase, run.state.job_id) == (Phase.UPDATING_JOB, JOB)


def test_a_periodic_resync_asks_only_when_idle() -> None:
    run = Run()
    run(m.Started(has_backup=False))
    run(EVENTS["get accepted none"])
    assert run(m.ResyncDue()) == [m.Publish(NEXT_GET, {}), m.ArmTimer(TIMEOUT_S, run.state.epoch)]
    run(EVENTS["get accepted QUEUED"])
    updating = run.state
    assert run(m.ResyncDue()) == []
    assert run.state == updating


def test_a_resumed_connection_while_taking_the_job_takes_it_again() -> None:
    """The IN_PROGRESS update or its reply may be lost: publishing it again is idempotent, while a get
    would find the job IN_PROGRESS and fail it as abandoned."""
    run = Run()
    run(m.Started(has_backup=False))
    first_timer = run(EVENTS["get accepted QUEUED"])[-1]
    assert run(m.ConnectionResumed()) == [IN_PROGRESS_UPDATE, m.ArmTimer(TIMEOUT_S, run.state.epoch)]
    assert isinstance(first_timer, m.ArmTimer)
    assert m.transition(run.state, m.Timeout(first_timer.epoch)) == (run.state, [])  # the old timer is spent
    assert [type(a) for a in run(EVENTS["update accepted"])] == [m.RequestCertificate, m.ArmTimer]
    # The reply to the first update, if it arrives after all, changes nothing.
    creating = run.state
    assert run(EVENTS["update accepted"]) == []
    assert run.state == creating


def test_a_resumed_connection_while_committing_commits_again() -> None:
    run = Run(m.initial(THING, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256, TIMEOUT_S, True))
    run(m.Started(has_backup=True))
    run(EVENTS["get accepted IN_PROGRESS"])
    assert run(m.ConnectionResumed()) == [
        m.Publish(COMMIT, {"jobId": JOB}),
        m.ArmTimer(TIMEOUT_S, run.state.epoch),
    ]
    assert run.state.has_backup
    assert [type(a) for a in run(EVENTS["commit accepted"])] == [m.DeleteBackup, m.Publish, m.Publish]
    assert run(EVENTS["commit accepted"]) == []  # the second reply


def test_a_resumed_connection_while_creating_leaves_the_decision_to_the_timer() -> None:
    """A second create would need a second key (the backend refuses it anyway once the first issued):
    the state's timer still fails the job and discards the prepared key if no reply comes."""
    run = Run()
    run(m.Started(has_backup=False))
    run(EVENTS["get accepted QUEUED"])
    timer = run(EVENTS["update accepted"])[-1]
    assert isinstance(timer, m.ArmTimer)
    creating = run.state
    assert run(m.ConnectionResumed()) == []
    assert run.state == creating
    assert [type(a) for a in run(m.Timeout(timer.epoch))] == [m.Publish, m.DiscardPreparedKey]


def test_a_resumed_connection_on_trial_asks_again_and_does_not_roll_back() -> None:
    """New credentials on trial: the connection they made came back, which is no failure of theirs.
    The get is asked again with a fresh timer; its reply still decides commit or rollback."""
    run = Run(m.initial(THING, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256, TIMEOUT_S, True))
    first = run(m.Started(has_backup=True))[-1]
    assert isinstance(first, m.ArmTimer)
    assert run(m.ConnectionResumed()) == [m.Publish(NEXT_GET, {}), m.ArmTimer(TIMEOUT_S, run.state.epoch)]
    assert run.state.has_backup
    assert m.transition(run.state, m.Timeout(first.epoch)) == (run.state, [])
    assert [type(a) for a in run(EVENTS["get accepted IN_PROGRESS"])] == [m.Publish, m.ArmTimer]
    assert run.state.phase is Phase.COMMITTING_CERTIFICATE


def test_a_succeeded_lost_with_the_connection_is_sent_again_after_it_resumes() -> None:
    """Committed, SUCCEEDED published, connection dropped: the commit marker (re-read at the resume)
    proves the new pair, so a job still IN_PROGRESS is finished, not failed."""
    run = Run(m.initial(THING, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256, TIMEOUT_S, True))
    run(m.Started(has_backup=True))
    run(EVENTS["get accepted IN_PROGRESS"])
    run(EVENTS["commit accepted"])
    assert run.state.phase is Phase.IDLE
    run(m.ConnectionResumed(committed_job=JOB))
    assert run(EVENTS["get accepted IN_PROGRESS"]) == [
        m.Publish(UPDATE, {"status": "SUCCEEDED", "statusDetails": {STATUS_DETAILS_KEY: "Committed"}}),
        m.ForgetCommitted(),
    ]


def test_an_abandoned_in_progress_job_found_by_a_resync_is_failed_with_the_reason() -> None:
    """E.g. the IN_PROGRESS update went through but its reply was lost and the state timed out: the
    device is idle, so the job would stay IN_PROGRESS until the cloud's timeout. Fail it now."""
    run = Run()
    run(m.Started(has_backup=False))
    timer = run(EVENTS["get accepted QUEUED"])[-1]
    assert isinstance(timer, m.ArmTimer)
    retake = run(m.Timeout(timer.epoch))[-1]  # the first timeout takes the job once more
    assert isinstance(retake, m.ArmTimer)
    run(m.Timeout(retake.epoch))
    assert run.state.phase is Phase.IDLE
    run(m.ConnectionResumed())
    (failed,) = run(EVENTS["get accepted IN_PROGRESS"])
    assert isinstance(failed, m.Publish)
    assert failed.message["status"] == "FAILED"
    assert "not rotating for this job" in failed.message["statusDetails"][FAILURE_REASON_KEY]


# ------------------------------------------------------------------------------- seed #21, in the agent


class _Store:
    """A key store with a backup on disk (new credentials on trial)."""

    def __init__(self) -> None:
        self.backup = True
        self.calls: list[str] = []
        self.rolled_back = threading.Event()

    def recover(self) -> None:
        self.calls.append("recover")

    def current_certificate(self) -> x509.Certificate:
        raise AssertionError("not needed")

    def has_backup(self) -> bool:
        return self.backup

    def prepare(self, job_id: str, key_algorithm: KeyAlgorithm, signing_algorithm: SigningAlgorithm) -> str:
        raise AssertionError("not needed")

    def install(self, job_id: str, certificate_pem: str) -> None:
        raise AssertionError("not needed")

    def rollback(self) -> None:
        self.calls.append("rollback")
        self.backup = False
        self.rolled_back.set()

    def commit(self) -> None:
        self.calls.append("commit")

    def discard_prepared(self) -> None:
        self.calls.append("discard")


class _Transport:
    """Connects, but the subscription never completes when `hangs` (seed #21)."""

    def __init__(self, hangs: bool, published: list[str]) -> None:
        self.hangs, self.published = hangs, published

    def start(self, on_message: OnMessage, on_ready: OnReady, on_resumed: OnResumed) -> None:
        if not self.hangs:
            on_ready(None)

    def publish(self, topic: str, payload: bytes) -> None:
        self.published.append(topic)

    def stop(self) -> None:
        pass


def test_seed_21_in_the_agent_a_hanging_subscribe_after_a_restart_rolls_back() -> None:
    store = _Store()
    published: list[str] = []
    transports: list[_Transport] = []

    def factory() -> _Transport:
        transports.append(_Transport(hangs=store.has_backup(), published=published))
        return transports[-1]

    settings = AgentSettings(
        THING,
        KeyAlgorithm.ECDSA_P256,
        SigningAlgorithm.ECDSA_WITH_SHA256,
        state_timeout_s=0.05,
        retry_min_s=0.01,
        retry_max_s=0.02,
    )
    reactor = Reactor().start()
    agent = Agent(settings, store, factory, reactor)
    try:
        agent.start()
        assert store.rolled_back.wait(5), "the hanging subscribe was never treated as a failure"
        deadline = time.monotonic() + 5
        while NEXT_GET not in published and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        agent.stop()
        reactor.stop()
    assert store.calls[:2] == ["recover", "rollback"]
    assert len(transports) >= 2
    assert transports[0].hangs
    assert not transports[1].hangs
    assert NEXT_GET in published, "after the rollback the agent reconnects with the old pair"


# ------------------------------------------------------------------- commit settled across a restart


def after_started(started: m.Started, reply: m.Event) -> tuple[m.State, list[m.Action]]:
    state, _ = m.transition(BASE, started)
    return m.transition(state, reply)


def test_a_commit_interrupted_before_succeeded_finishes_the_job_after_restart() -> None:
    # Crash (or a lost SUCCEEDED) after the backup was deleted: the new pair is proven, the job still
    # IN_PROGRESS. The device reports SUCCEEDED instead of failing a rotation it completed.
    state, actions = after_started(m.Started(False, committed_job=JOB), EVENTS["get accepted IN_PROGRESS"])
    assert state.phase is Phase.IDLE and state.committed_job is None
    assert actions == [
        m.Publish(UPDATE, {"status": "SUCCEEDED", "statusDetails": {STATUS_DETAILS_KEY: "Committed"}}),
        m.ForgetCommitted(),
    ]


def test_a_commit_marker_with_the_backup_still_present_commits_again() -> None:
    state, actions = after_started(m.Started(True, committed_job=JOB), EVENTS["get accepted IN_PROGRESS"])
    assert state.phase is Phase.COMMITTING_CERTIFICATE
    assert actions[0] == m.Publish(COMMIT, {"jobId": JOB})
    assert m.ForgetCommitted() in actions


@pytest.mark.parametrize("reply", ["get accepted none", "get accepted QUEUED"])
def test_a_settled_commit_marker_is_forgotten(reply: str) -> None:
    state, actions = after_started(m.Started(False, committed_job=JOB), EVENTS[reply])
    assert state.committed_job is None
    assert m.ForgetCommitted() in actions
    assert not any(isinstance(a, m.Publish) and "SUCCEEDED" in json.dumps(a.message) for a in actions)


def test_a_marker_for_another_job_does_not_succeed_this_one() -> None:
    _, actions = after_started(m.Started(False, committed_job=OTHER_JOB), EVENTS["get accepted IN_PROGRESS"])
    failed = [a for a in actions if isinstance(a, m.Publish) and a.message.get("status") == "FAILED"]
    assert failed and m.ForgetCommitted() in actions


def test_a_lost_in_progress_update_is_sent_once_more_then_given_up() -> None:
    """Fault matrix, step 2 or 3 lost: the notify-next was already sent, so nothing else would tell this
    device about the job again. One retake with a fresh timer; a second timeout gives up."""
    run = Run()
    run(m.Started(has_backup=False))
    timer = run(EVENTS["get accepted QUEUED"])[-1]
    assert isinstance(timer, m.ArmTimer)
    actions = run(m.Timeout(timer.epoch))
    assert (run.state.phase, run.state.job_id, run.state.retried) == (Phase.UPDATING_JOB, JOB, True)
    assert [type(a) for a in actions] == [m.Publish, m.ArmTimer]
    assert actions[0] == m.Publish(
        UPDATE, {"status": "IN_PROGRESS", "statusDetails": {STATUS_DETAILS_KEY: "UpdatingJob"}}
    )
    assert run(m.Timeout(timer.epoch)) == []  # the first timer is spent
    second = actions[-1]
    assert isinstance(second, m.ArmTimer)
    assert run(m.Timeout(second.epoch)) == []
    assert (run.state.phase, run.state.retried) == (Phase.IDLE, False)
    # The retake is the same request: accepted, the rotation goes on as if nothing was lost.
    run(m.Started(has_backup=False))
    timer = run(EVENTS["get accepted QUEUED"])[-1]
    assert isinstance(timer, m.ArmTimer)
    run(m.Timeout(timer.epoch))
    assert isinstance(run(EVENTS["update accepted"])[0], m.RequestCertificate)

