"""The device's rotation state machine, as a pure function (state, event) -> (state, actions).

The agent (imperative shell) turns actions into MQTT publishes and key-store calls, and feeds back
what happens as events. Message sequence: DESIGN.md §2; rules: §3. Lessons from the seed's tracker:
a `get/rejected` (throttling) after a restart with a backup rolls back (#68); a subscription that
hangs is a failure once the state times out (#21); every failure reason reaches the job's
statusDetails (#62).

Re-synchronisation (docs/reliability.md): the device asks `$next/get` on every connection it gets, the
first one (Started) and every one the transport resumes by itself (ConnectionResumed): a notify-next sent
while it was away is not replayed to a clean session, so asking is the only reliable way to learn of a
job. A transport that cannot see its connection (Greengrass IPC) asks periodically instead (ResyncDue).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from certrotator.algorithms import KeyAlgorithm, SigningAlgorithm
from certrotator.device.vocabulary import (
    Action,
    ArmTimer,
    ConfigChanged,
    ConnectFailed,
    ConnectionResumed,
    DeleteBackup,
    DiscardPreparedKey,
    Event,
    ForgetCommitted,
    InstallCertificate,
    Message,
    Phase,
    Publish,
    RequestCertificate,
    Restart,
    Result,
    ResyncDue,
    RollBack,
    Started,
    State,
    StoreFailed,
    Timeout,
)
from certrotator.protocol import (
    CommitCertificateRequest,
    JobExecutionStatus,
    ParsedTopic,
    ProtocolError,
    Reply,
    TopicKind,
    Topics,
    decode_json_object,
    is_rotation_document,
    parse_certificate_accepted,
    parse_rejected,
    parse_topic,
)
from certrotator.status_details import status_update

__all__ = [
    "Action",
    "ArmTimer",
    "ConfigChanged",
    "ConnectFailed",
    "ConnectionResumed",
    "DeleteBackup",
    "DiscardPreparedKey",
    "Event",
    "ForgetCommitted",
    "InstallCertificate",
    "Message",
    "Phase",
    "Publish",
    "RequestCertificate",
    "Restart",
    "Result",
    "ResyncDue",
    "RollBack",
    "Started",
    "State",
    "StoreFailed",
    "Timeout",
    "initial",
    "transition",
]

log = logging.getLogger("certrotator.device")


def _wait(state: State, phase: Phase, job_id: str | None, *actions: Action) -> Result:
    """Enter a waiting phase: every waiting phase has a timeout."""
    new = replace(state, phase=phase, job_id=job_id, epoch=state.epoch + 1, retried=False)
    return new, [*actions, ArmTimer(state.timeout_s, new.epoch)]


def _idle(state: State, *actions: Action) -> Result:
    return replace(state, phase=Phase.IDLE, job_id=None, epoch=state.epoch + 1, retried=False), list(actions)


def _update(
    state: State, job_id: str, status: JobExecutionStatus, detail: str, reason: str | None = None
) -> Publish:
    return Publish(Topics.job_update(state.thing, job_id), status_update(status, detail, reason))


def _fail(state: State, job_id: str, reason: str, *then: Action) -> Result:
    log.warning("rotation job %s failed: %s", job_id, reason)
    return _idle(state, _update(state, job_id, JobExecutionStatus.FAILED, state.phase.value, reason), *then)


def _roll_back(state: State, reason: str, job_id: str | None) -> Result:
    """The new credentials did not prove themselves: go back to the old pair and reconnect."""
    actions: list[Action] = []
    if job_id is not None:
        actions.append(_update(state, job_id, JobExecutionStatus.FAILED, state.phase.value, reason))
    return replace(state, phase=Phase.IDLE, job_id=None, has_backup=False, epoch=state.epoch + 1), [
        *actions,
        RollBack(),
        Restart(f"rolled back: {reason}"),
    ]


def initial(
    thing: str,
    key_algorithm: KeyAlgorithm,
    signing_algorithm: SigningAlgorithm,
    timeout_s: float = 30.0,
    has_backup: bool = False,
) -> State:
    """The state at start-up. `has_backup` comes from the key store: after a restart with new credentials
    on trial, a failure to connect must roll back even though no Started was ever seen."""
    return State(thing, key_algorithm, signing_algorithm, timeout_s, has_backup=has_backup)


def transition(state: State, event: Event) -> Result:
    """The whole behaviour of the device side of the protocol."""
    if isinstance(event, ConfigChanged):
        return replace(
            state,
            key_algorithm=event.key_algorithm,
            signing_algorithm=event.signing_algorithm,
            timeout_s=event.timeout_s,
        ), []
    if isinstance(event, Started):
        started = replace(state, has_backup=event.has_backup, committed_job=event.committed_job)
        return _announcing(started, _ask(started))
    if isinstance(event, ConnectionResumed):
        return _resumed(state, event)
    if isinstance(event, ResyncDue):
        if state.phase is Phase.IDLE:
            return _ask(replace(state, committed_job=event.committed_job))
        return state, []  # mid-rotation: the state's own timer bounds the wait
    if isinstance(event, ConnectFailed):
        if state.has_backup:
            return _roll_back(state, f"cannot connect with the new credentials: {event.reason}", None)
        return _idle(state, Restart(f"connection failed: {event.reason}", backoff=True))
    installed = state.phase is Phase.CREATING_CERTIFICATE and state.has_backup
    if installed and isinstance(event, Message | Timeout):
        # Installed, waiting for the restart: only its outcome (Started / ConnectFailed) or the install's
        # failure (StoreFailed) counts. A duplicate create reply must not install again or fail the job.
        return state, []
    if isinstance(event, Timeout):
        return (
            _on_timeout(state)
            if event.epoch == state.epoch and state.phase is not Phase.IDLE
            else (state, [])
        )
    if isinstance(event, StoreFailed):
        if state.phase is not Phase.CREATING_CERTIFICATE or state.job_id is None:
            return state, []
        return _fail(
            replace(state, has_backup=False),
            state.job_id,
            event.reason,
            DiscardPreparedKey(),
        )
    return _on_message(state, event)


def _announce(state: State) -> Publish:
    return Publish(Topics.announce(state.thing), {})


def _announcing(connected: State, result: Result) -> Result:
    """On a new connection with settled credentials (no backup), announce them, best effort: the cloud
    records the connection's certificate as the evidence `reconcile` weighs. Never while new credentials
    are on trial: the certificate to keep is not decided yet. Not on a resumed connection: its credentials
    are the ones already announced, and AWS IoT disconnects a client that publishes where its policy
    denies, so a device whose policy predates the announce topic would lose every resumed connection;
    announcing once per start and commit, it loses one connection there and the CRT's reconnect
    re-synchronises."""
    if connected.has_backup:
        return result
    new, actions = result
    return new, [_announce(connected), *actions]


def _ask(state: State) -> Result:
    """Ask for the thing's next job: the reply says what the cloud believes (see _got)."""
    return _wait(state, Phase.GETTING_JOB, None, Publish(Topics.next_get(state.thing), {}))


def _resumed(state: State, event: ConnectionResumed) -> Result:
    """The connection came back by itself. A request in flight may have been lost with it, and so may a
    notify-next: ask again what is idempotent, with a fresh timer, and leave the rest to the timers."""
    phase, job = state.phase, state.job_id
    if phase in (Phase.IDLE, Phase.GETTING_JOB):
        # A get is a read: asking twice is harmless (a second reply finds the machine elsewhere and is
        # ignored). With a backup this is the new pair's trial, still decided by the get's reply.
        return _ask(replace(state, committed_job=event.committed_job))
    if phase is Phase.UPDATING_JOB:
        assert job is not None
        return _retake(state, job)
    if phase is Phase.COMMITTING_CERTIFICATE:
        # The backend answers a repeated commit as accepted (a commit whose reply was lost), and the
        # resumed connection still uses the new pair, which is what commit checks.
        assert job is not None
        return _wait(
            state,
            Phase.COMMITTING_CERTIFICATE,
            job,
            Publish(Topics.commit(state.thing), CommitCertificateRequest(job).to_payload()),
        )
    # CreatingCertificate: a second create would need a second key and CSR, and the backend refuses it
    # once the first issued (two certificates attached). If the reply was lost the state's timer fails
    # the job, the prepared key is discarded, and the backend retires what it issued. Installed (with a
    # backup): the restart that is already under way decides.
    return state, []


def _retake(state: State, job: str) -> Result:
    """Take the job again. Asking $next/get instead would find our own job IN_PROGRESS if the first
    update went through and make it look abandoned; taking it again is idempotent (IN_PROGRESS ->
    IN_PROGRESS is accepted)."""
    return _wait(
        state, Phase.UPDATING_JOB, job, _update(state, job, JobExecutionStatus.IN_PROGRESS, Phase.UPDATING_JOB.value)
    )


def _on_timeout(state: State) -> Result:
    phase, job = state.phase, state.job_id
    what = f"no reply in {state.timeout_s:g} s while {phase.value}"
    if phase is Phase.GETTING_JOB:
        if state.has_backup:
            return _roll_back(state, f"new credentials unproven: {what}", None)
        return _idle(state)  # a notify-next will come when there is work
    if phase is Phase.UPDATING_JOB:
        # The update or its reply was lost (the fault matrix's step 2 and 3): nothing else would ever
        # tell this device about the job again, since its notify-next was already sent. Take it once
        # more; if that is lost too, the job waits QUEUED (or times out IN_PROGRESS) for the next
        # notify-next or re-synchronisation.
        if not state.retried:
            assert job is not None
            new, actions = _retake(state, job)
            return replace(new, retried=True), actions
        return _idle(state)
    assert job is not None
    if phase is Phase.CREATING_CERTIFICATE:
        return _fail(state, job, what, DiscardPreparedKey())
    return _roll_back(state, what, job)  # COMMITTING_CERTIFICATE


def _on_message(state: State, message: Message) -> Result:
    try:
        topic = parse_topic(message.topic)
    except ProtocolError:
        log.info("ignoring message on %s", message.topic)
        return state, []
    if topic.thing != state.thing:
        log.info("ignoring message for another thing on %s", message.topic)
        return state, []
    try:
        # Every message of the protocol is a JSON object, also those whose content is not needed (update
        # and commit replies): a garbled one is not trusted to move the rotation on.
        decode_json_object(message.payload, f"{topic.kind.value} message")
        return _dispatch(state, topic, message.payload)
    except ProtocolError as exc:
        log.warning("ignoring malformed message on %s: %s", message.topic, exc)
        return state, []


def _execution(body: dict[str, Any]) -> dict[str, Any] | None:
    execution = body.get("execution")
    if execution is None:
        return None
    if not isinstance(execution, dict) or not isinstance(execution.get("jobId"), str):
        raise ProtocolError("job execution without a jobId")
    return execution


def _dispatch(state: State, topic: ParsedTopic, payload: bytes) -> Result:
    phase, kind, reply = state.phase, topic.kind, topic.reply
    if kind is TopicKind.NOTIFY_NEXT and phase is Phase.IDLE:
        return _offered(state, _execution(decode_json_object(payload, "notify-next")))
    if kind is TopicKind.GET and phase is Phase.GETTING_JOB and topic.job_id == "$next":
        if reply is Reply.REJECTED:
            if state.has_backup:
                return _roll_back(state, f"get rejected: {parse_rejected(payload)}", None)
            return _idle(state)
        if reply is Reply.ACCEPTED:
            return _got(state, _execution(decode_json_object(payload, "get reply")))
    if kind is TopicKind.UPDATE and topic.job_id == state.job_id and phase is Phase.UPDATING_JOB:
        if reply is Reply.ACCEPTED:
            assert state.job_id is not None
            return _wait(
                state,
                Phase.CREATING_CERTIFICATE,
                state.job_id,
                RequestCertificate(state.job_id, state.key_algorithm, state.signing_algorithm),
            )
        if reply is Reply.REJECTED:
            return _idle(state)  # e.g. canceled meanwhile
    if kind is TopicKind.CREATE and phase is Phase.CREATING_CERTIFICATE and state.job_id is not None:
        if reply is Reply.ACCEPTED:
            pem = parse_certificate_accepted(payload)
            # Stay in this phase without a timer until the restart: StoreFailed may still come back.
            return replace(state, epoch=state.epoch + 1, has_backup=True), [
                InstallCertificate(state.job_id, pem),
                Restart("new credentials installed"),
            ]
        if reply is Reply.REJECTED:
            return _fail(
                state, state.job_id, f"create rejected: {parse_rejected(payload)}", DiscardPreparedKey()
            )
    if kind is TopicKind.COMMIT and phase is Phase.COMMITTING_CERTIFICATE and state.job_id is not None:
        if reply is Reply.ACCEPTED:
            job = state.job_id
            done = replace(state, has_backup=False)
            return _idle(
                done,
                DeleteBackup(job),
                _update(done, job, JobExecutionStatus.SUCCEEDED, "Committed"),
                _announce(done),  # the new pair is settled now
            )
        if reply is Reply.REJECTED:
            return _roll_back(state, f"commit rejected: {parse_rejected(payload)}", state.job_id)
    log.debug("no transition for %s in %s", kind.value, phase.value)
    return state, []


def _offered(state: State, execution: dict[str, Any] | None) -> Result:
    """notify-next while idle: take a queued rotation job."""
    if execution is None or not is_rotation_document(execution.get("jobDocument")):
        return state, []
    job_id = str(execution["jobId"])
    if execution.get("status") == JobExecutionStatus.QUEUED.value:
        return _wait(
            state,
            Phase.UPDATING_JOB,
            job_id,
            _update(state, job_id, JobExecutionStatus.IN_PROGRESS, Phase.UPDATING_JOB.value),
        )
    return state, []


def _got(state: State, execution: dict[str, Any] | None) -> Result:
    """The reply to $next/get after (re)start: decides commit, resume or the rolled-back failure."""
    committed = state.committed_job
    in_progress = (
        str(execution["jobId"])
        if execution is not None
        and is_rotation_document(execution.get("jobDocument"))
        and execution.get("status") == JobExecutionStatus.IN_PROGRESS.value
        else None
    )
    if committed is not None and committed == in_progress and not state.has_backup:
        # Committed before a crash or a lost publish: the new pair is proven and kept; finish the job.
        done = replace(state, committed_job=None)
        return _idle(
            done, _update(done, committed, JobExecutionStatus.SUCCEEDED, "Committed"), ForgetCommitted()
        )
    new_state, actions = _after_restart(replace(state, committed_job=None), execution)
    if committed is not None:
        actions.append(ForgetCommitted())  # the cloud settled that job one way or another
    return new_state, actions


def _after_restart(state: State, execution: dict[str, Any] | None) -> Result:
    rotation = execution is not None and is_rotation_document(execution.get("jobDocument"))
    if execution is None or not rotation:
        if state.has_backup:
            # The rotation job is gone (e.g. TIMED_OUT) while the new pair is on trial. The backend deletes
            # a new certificate whose job did not succeed (DESIGN.md §2), and it deletes the old one only
            # after a SUCCEEDED, which this device sends only after dropping its backup: the old pair is
            # the one that is safe to keep.
            return _roll_back(state, "no rotation job in progress for the new credentials", None)
        return _idle(state)
    job_id, status = str(execution["jobId"]), execution.get("status")
    if status == JobExecutionStatus.IN_PROGRESS.value:
        if state.has_backup:
            return _wait(
                state,
                Phase.COMMITTING_CERTIFICATE,
                job_id,
                Publish(Topics.commit(state.thing), CommitCertificateRequest(job_id).to_payload()),
            )
        return _fail(
            state,
            job_id,
            "the device is not rotating for this job: it restarted or reconnected mid-rotation without "
            "new credentials installed (rolled back, interrupted before install, or a reply was lost)",
        )
    if status == JobExecutionStatus.QUEUED.value:
        if state.has_backup:
            return _roll_back(state, "a new job is queued while an old rotation is unfinished", None)
        return _offered(state, execution)
    if state.has_backup:
        return _roll_back(state, f"rotation job {job_id} is {status}, not in progress", None)
    return _idle(state)
