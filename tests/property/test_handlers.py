"""Properties of the three backend handlers over hostile requests, through the Lambda adapters (the
event dicts AWS IoT rules deliver) and the local engine's rule path (payload bytes + the broker's
connection), on the in-memory World (tests/backend/fakes.py, a real CA behind the issuer).

A near-valid request in a valid world is drawn with any subset of *breaks*, each of which violates
one backend precondition (DESIGN.md §2), plus benign noise that must not matter. Properties:
- with no break the request succeeds (so the properties can fail: see docs/reliability.md);
- with any break nothing is issued, committed or deleted, nothing raises, and the device gets a
  `/rejected` reply on its thing's topic, or no reply when the request names no usable thing;
- a terminal event, whatever it carries, never raises or issues, a malformed one is ignored, and what
  the device wrote into statusDetails never changes what the backend does.
"""

from __future__ import annotations

import base64
import copy
import functools
from dataclasses import dataclass, replace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import event as event_note
from hypothesis import given, settings
from hypothesis import strategies as st

from certrotator import crypto
from certrotator.backend.aws.lambdas import (
    commit_certificate_event,
    create_certificate_event,
    job_execution_terminal_event,
)
from certrotator.backend.handlers import HandlerResult
from certrotator.backend.ports import CertificateRecord, CertificateStatus, JobExecution, RotationState
from certrotator.local.policy import Connection
from certrotator.local.rules import Rules
from certrotator.protocol import (
    JOB_DOCUMENT,
    MAX_CSR_BYTES,
    CreateCertificateRequest,
    JobExecutionStatus,
    ProtocolError,
    RotationProgress,
    Topics,
    client_id_is_for_thing,
    encode,
    parse_topic,
    validate_thing_name,
)

from ..backend.fakes import World
from .strategies import (
    JOB_ID_RE,
    THING_RE,
    hostile_payloads,
    hostile_text,
    json_values,
    mostly,
    protocol_objects,
)

MISSING = object()  # a field left out of the event
CONTEXT_KEYS = {"jobId", "csr", "thingName", "clientId", "principal", "topic"}
# The handlers build a World per example (two EC keys, a CA): the default number of examples.
HANDLERS = settings(max_examples=100)
# Each precondition broken alone (no other break can mask it), a few examples each.
EACH_BREAK = settings(max_examples=8)


def _set(event: dict[str, Any], key: str, value: object) -> None:
    if value is MISSING:
        event.pop(key, None)
    else:
        event[key] = value


def _reply_thing(event: dict[str, Any]) -> str | None:
    try:
        return validate_thing_name(str(event.get("thingName", "")))
    except ProtocolError:
        return None


def _noise(event: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Extra fields a request may carry without effect (AWS's rule passes the whole payload on)."""
    return protocol_objects.map(lambda extra: {k: v for k, v in extra.items() if k not in CONTEXT_KEYS})


# ------------------------------------------------------------------------------------ hostile CSRs


@functools.cache
def _rsa_1024() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def _sign_raw(key: Any, subject: x509.Name) -> str:
    """A CSR signed with a key `crypto.build_csr` refuses to use (the backend must refuse it too)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, digest).public_bytes(serialization.Encoding.PEM).decode()


def _tampered(csr_pem: str) -> str:
    """The same CSR with one bit of its signature flipped."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def _csr_breaks(world: World, good: str) -> dict[str, st.SearchStrategy[object]]:
    """Ways a create request's CSR can be wrong, each of which the backend must refuse."""
    other = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")])
    signing = crypto.SigningAlgorithm.ECDSA_WITH_SHA256

    def fresh_key() -> crypto.PrivateKey:
        return crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P256)

    return {
        "csr_garbage": st.one_of(st.just(MISSING), json_values, hostile_text).filter(lambda v: v != good),
        "csr_mangled": st.sampled_from(
            [
                "",
                good[:-40],
                good.replace("REQUEST", "REQUESTS"),
                good + "é",
                good.replace("-----END", "\x00-----END"),
                good.replace("-----BEGIN CERTIFICATE REQUEST-----", "-----BEGIN CERTIFICATE-----"),
            ]
        ),
        "csr_oversize": st.integers(1, 1000).map(lambda n: good + "A" * (MAX_CSR_BYTES - len(good) + n)),
        "csr_tampered": st.builds(lambda: _tampered(good)),
        "csr_current_key": st.builds(lambda: crypto.build_csr(world.key, signing, world.subject)),
        "csr_other_subject": st.builds(lambda: crypto.build_csr(fresh_key(), signing, other)),
        "csr_weak_key": st.sampled_from(["rsa-1024", "secp256k1", "ed25519"]).map(
            lambda kind: _sign_raw(
                _rsa_1024()
                if kind == "rsa-1024"
                else ec.generate_private_key(ec.SECP256K1())
                if kind == "secp256k1"
                else ed25519.Ed25519PrivateKey.generate(),
                world.subject,
            )
        ),
    }


CSR_BREAKS = [
    "csr_garbage",
    "csr_mangled",
    "csr_oversize",
    "csr_tampered",
    "csr_current_key",
    "csr_other_subject",
    "csr_weak_key",
]


# ------------------------------------------------------------------------------------------ breaks


def _other_than(value: str, fold: bool = False) -> st.SearchStrategy[object]:
    """A replacement for a context field: missing, any JSON value or text, never equal to `value`."""
    same = (lambda v: str(v).lower() == value) if fold else (lambda v: str(v) == value)
    return st.one_of(
        st.just(MISSING), json_values, hostile_text, st.from_regex(THING_RE, fullmatch=True)
    ).filter(lambda v: v is MISSING or not same(v))


def _break_common(
    name: str, world: World, event: dict[str, Any], data: st.DataObject, principal: str
) -> None:
    """Breaks shared by create and commit (the chain of custody and the broker context)."""
    if name == "principal":
        _set(event, "principal", data.draw(_other_than(principal, fold=True), label="principal"))
    elif name == "client_id":
        _set(
            event,
            "clientId",
            data.draw(
                st.one_of(st.just(MISSING), json_values, hostile_text).filter(
                    lambda v: v is MISSING or not client_id_is_for_thing(str(v), world.thing)
                ),
                label="clientId",
            ),
        )
    elif name == "thing":
        _set(event, "thingName", data.draw(_other_than(world.thing), label="thingName"))
    elif name == "job_id":
        other_job = st.one_of(
            st.just(MISSING), json_values, hostile_text, st.from_regex(JOB_ID_RE, fullmatch=True)
        )
        _set(event, "jobId", data.draw(other_job.filter(lambda v: v != world.job_id), label="jobId"))
    elif name == "topic_missing":
        _set(event, "topic", data.draw(st.sampled_from([MISSING, "", None, 0, [], {}]), label="topic"))
    elif name == "execution_status":
        status = data.draw(
            st.sampled_from([s for s in JobExecutionStatus if s is not JobExecutionStatus.IN_PROGRESS])
        )
        world.set_execution(status)
    elif name == "execution_document":
        document = data.draw(
            st.one_of(st.none(), protocol_objects).filter(lambda d: d != JOB_DOCUMENT), label="document"
        )
        key = (world.thing, world.job_id)
        world.jobs.executions[key] = JobExecution(*key, JobExecutionStatus.IN_PROGRESS, document)
    elif name == "execution_missing":
        del world.jobs.executions[(world.thing, world.job_id)]
    elif name == "thing_unregistered":
        del world.registry.things[world.thing]
    else:
        raise AssertionError(f"unknown break {name}")


COMMON_BREAKS = [
    "principal",
    "client_id",
    "thing",
    "job_id",
    "topic_missing",
    "execution_status",
    "execution_document",
    "execution_missing",
    "thing_unregistered",
]
CREATE_BREAKS = [
    *COMMON_BREAKS,
    *CSR_BREAKS,
    "second_principal",
    "certificate_inactive",
    "certificate_missing",
    "issuer_fails",
]
COMMIT_BREAKS = [*COMMON_BREAKS, "over_old_certificate", "one_principal", "three_principals", "state"]


def _benign(world: World, event: dict[str, Any], data: st.DataObject, principal: str) -> None:
    """Changes that must not matter: the rule's principal() in upper case, a Greengrass-style client id,
    another topic string (the handlers take the thing from thingName, which the rule takes from it)."""
    if data.draw(st.booleans(), label="upper-case principal"):
        event["principal"] = principal.upper()
    if data.draw(st.booleans(), label="extra-connection client id"):
        event["clientId"] = f"{world.thing}#{data.draw(hostile_text, label='suffix')}"
    if data.draw(st.booleans(), label="other topic"):
        event["topic"] = data.draw(hostile_text.map(lambda t: t or "/"), label="topic text")
    event.update(data.draw(_noise(event), label="noise"))


@dataclass(frozen=True)
class Snapshot:
    certificates: dict[str, CertificateRecord]
    things: dict[str, list[str]]
    policies: dict[str, list[str]]
    states: dict[str, RotationState]
    issued: list[str]


def snapshot(world: World) -> Snapshot:
    r = world.registry
    return Snapshot(
        dict(r.certificates),
        copy.deepcopy(r.things),
        copy.deepcopy(r.policies),
        dict(world.state.states),
        list(world.issuer.issued),
    )


def restore(world: World, snap: Snapshot) -> None:
    world.registry.certificates = dict(snap.certificates)
    world.registry.things = copy.deepcopy(snap.things)
    world.registry.policies = copy.deepcopy(snap.policies)
    world.state.states = dict(snap.states)
    world.issuer.issued = list(snap.issued)


def _assert_rejected(
    world: World, result: HandlerResult, event: dict[str, Any], verb: str, messages_before: int
) -> None:
    assert result.outcome == "rejected", result
    replies = world.publisher.messages[messages_before:]
    thing = _reply_thing(event)
    topic = Topics.create(thing) if verb == "create" else Topics.commit(thing) if thing else ""
    if thing is None:
        assert replies == []
    else:
        assert [t for t, _ in replies] == [Topics.rejected(topic)]
        assert replies[0][1]["errorMsg"] == result.reason and result.reason


# ------------------------------------------------------------------------------------------ create


def _create_with(data: st.DataObject, breaks: set[str]) -> None:
    world = World()
    _, csr = world.new_csr()
    event = world.create_event(csr)
    _benign(world, event, data, world.cert_id)
    csr_breaks = _csr_breaks(world, csr)
    for name in sorted(breaks):
        if name in csr_breaks:
            _set(event, "csr", data.draw(csr_breaks[name], label=name))
        elif name == "second_principal":
            if world.thing in world.registry.things:
                world.registry.things[world.thing].append("f" * 64)
        elif name == "certificate_inactive":
            inactive = [s for s in CertificateStatus if s is not CertificateStatus.ACTIVE]
            record = world.registry.certificates.get(world.cert_id)
            if record is not None:
                status = data.draw(st.sampled_from(inactive), label="status")
                world.registry.certificates[world.cert_id] = replace(record, status=status)
        elif name == "certificate_missing":
            del world.registry.certificates[world.cert_id]
        elif name == "issuer_fails":
            world.issuer.fail = True
        else:
            _break_common(name, world, event, data, world.cert_id)
    before = snapshot(world)

    result = create_certificate_event(event, world.ports)  # never raises
    event_note(f"create {result.outcome}; breaks: {len(breaks)}")

    if not breaks:
        assert result.outcome == "accepted", result
        assert len(world.issuer.issued) == 1
        topic, message = world.last_message()
        assert topic == Topics.accepted(Topics.create(world.thing))
        assert crypto.certificate_id(message["certificatePem"]) == world.issuer.issued[0]
        return
    assert world.issuer.issued == []
    after = snapshot(world)
    assert (after.certificates, after.things, after.policies, after.states) == (
        before.certificates,
        before.things,
        before.policies,
        before.states,
    )
    _assert_rejected(world, result, event, "create", 0)


@pytest.mark.parametrize("broken", CREATE_BREAKS)
@EACH_BREAK
@given(data=st.data())
def test_a_create_request_with_one_broken_precondition_is_refused(broken: str, data: st.DataObject) -> None:
    _create_with(data, {broken})


@HANDLERS
@given(st.data(), st.sets(st.sampled_from(CREATE_BREAKS), max_size=3))
def test_a_create_request_issues_only_when_every_precondition_holds(
    data: st.DataObject, breaks: set[str]
) -> None:
    _create_with(data, breaks)


# ------------------------------------------------------------------------------------------ commit


def _created(world: World) -> str:
    """Run a successful create; the new certificate's id."""
    _, csr = world.new_csr()
    assert create_certificate_event(world.create_event(csr), world.ports).outcome == "accepted"
    return world.issuer.issued[-1]


def _commit_with(data: st.DataObject, breaks: set[str]) -> None:
    world = World()
    new_id = _created(world)
    event = world.commit_event(new_id)
    _benign(world, event, data, new_id)
    principals = world.registry.things[world.thing]
    for name in sorted(breaks):
        if name == "over_old_certificate":
            event["principal"] = world.cert_id
        elif name == "one_principal":
            if world.thing in world.registry.things:
                world.registry.things[world.thing] = [new_id]
        elif name == "three_principals":
            if world.thing in world.registry.things:
                world.registry.things[world.thing] = [*principals, "e" * 64]
        elif name == "state":
            state = world.state.states[world.thing]
            world.state.states[world.thing] = data.draw(
                st.sampled_from(
                    [
                        replace(state, job_id="another-job"),
                        replace(state, progress=RotationProgress.ISSUING, new_certificate_id=""),
                        replace(state, progress=RotationProgress.TERMINATED),
                        replace(state, new_certificate_id=world.cert_id, old_certificate_id=new_id),
                    ]
                ),
                label="state",
            )
        else:
            _break_common(name, world, event, data, new_id)
    before, sent = snapshot(world), len(world.publisher.messages)

    result = commit_certificate_event(event, world.ports)
    event_note(f"commit {result.outcome}; breaks: {len(breaks)}")

    if not breaks:
        assert result.outcome == "accepted", result
        assert world.state.states[world.thing].progress is RotationProgress.COMMITTED
        assert world.last_message()[0] == Topics.accepted(Topics.commit(world.thing))
        return
    after = snapshot(world)
    assert after == before  # nothing committed, issued or deleted
    _assert_rejected(world, result, event, "commit", sent)


@pytest.mark.parametrize("broken", COMMIT_BREAKS)
@EACH_BREAK
@given(data=st.data())
def test_a_commit_with_one_broken_precondition_is_refused(broken: str, data: st.DataObject) -> None:
    _commit_with(data, {broken})


@HANDLERS
@given(st.data(), st.sets(st.sampled_from(COMMIT_BREAKS), max_size=3))
def test_a_commit_succeeds_only_over_the_new_certificate_of_this_rotation(
    data: st.DataObject, breaks: set[str]
) -> None:
    _commit_with(data, breaks)


# ---------------------------------------------------------------------------------------- terminal


def _terminal_events(world: World) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly well-formed events of this thing and job (the interesting ones), some of anything."""
    arn = "arn:aws:iot:eu-west-1:123456789012:thing/{}".format
    things = st.one_of(st.from_regex(THING_RE, fullmatch=True), hostile_text)
    terminal = st.sampled_from([s.value for s in JobExecutionStatus if s.is_terminal])
    event = st.fixed_dictionaries(
        {
            "thingArn": mostly(st.just(arn(world.thing)), things.map(arn), json_values),
            "jobId": mostly(st.just(world.job_id), st.from_regex(JOB_ID_RE, fullmatch=True), json_values),
            "status": mostly(terminal, st.sampled_from([s.value for s in JobExecutionStatus]), json_values),
            "statusDetails": mostly(protocol_objects, json_values),
        },
        optional={"eventType": st.just("JOB_EXECUTION")},
    )
    dropped = mostly(
        st.just(frozenset[str]()), st.frozensets(st.sampled_from(["thingArn", "jobId", "status"]))
    )
    return st.tuples(event, dropped).map(lambda pair: {k: v for k, v in pair[0].items() if k not in pair[1]})


@HANDLERS
@given(st.data(), st.sampled_from(["none", "created", "committed"]))
def test_a_terminal_event_never_issues_and_statusdetails_never_decide(
    data: st.DataObject, progress: str
) -> None:
    world = World()
    if progress != "none":
        new_id = _created(world)
        if progress == "committed":
            assert commit_certificate_event(world.commit_event(new_id), world.ports).outcome == "accepted"
    event = data.draw(_terminal_events(world), label="event")
    before, notes = snapshot(world), len(world.notifier.notifications)

    result = job_execution_terminal_event(event, world.ports)  # never raises
    event_note(f"terminal {result.outcome} ({progress})")

    assert world.issuer.issued == before.issued  # a terminal event never issues
    if result.outcome == "ignored" and result.thing is None:  # malformed: nothing at all happened
        assert snapshot(world) == before and len(world.notifier.notifications) == notes
        return
    if (result.thing, result.job_id) != (world.thing, world.job_id):
        # Another thing's or job's end touches nothing of this rotation.
        assert snapshot(world).things == before.things and snapshot(world).certificates == before.certificates
    # The same event with the device's words removed leads to the same actions.
    after, told = snapshot(world), world.notifier.notifications[notes:]
    restore(world, before)
    plain = job_execution_terminal_event({**event, "statusDetails": {}}, world.ports)
    assert (plain.outcome, plain.reason) == (result.outcome, result.reason)
    assert snapshot(world) == after
    again = world.notifier.notifications[notes + len(told) :]
    assert [(n.outcome, n.action) for n in again] == [(n.outcome, n.action) for n in told]


# ------------------------------------------------------------------------------ the local rule path


class _RulesOn:
    """The registry's rule switches, all on (Rules asks nothing else of it)."""

    def rule_enabled(self, _name: str) -> bool:
        return True


def _local_rules(world: World) -> Rules:
    def document(thing: str, job_id: str) -> object | None:
        execution = world.jobs.describe_execution(thing, job_id)
        return execution.document if execution is not None else None

    return Rules(_RulesOn(), world.ports, document)  # type: ignore[arg-type]


connections = st.builds(
    Connection,
    client_id=st.one_of(st.just(World.thing), st.just(f"{World.thing}#1"), hostile_text),
    principal=st.one_of(st.from_regex(r"[0-9a-f]{64}", fullmatch=True), hostile_text),
    thing=st.just(World.thing),
)


@HANDLERS
@given(st.sampled_from(["create", "commit"]), hostile_payloads, st.one_of(st.none(), connections))
def test_any_payload_on_the_local_rule_path_is_answered_rejected_and_changes_nothing(
    verb: str, payload: bytes, connection: Connection | None
) -> None:
    """The local engine hands a request's bytes and its authenticated connection to the same handlers."""
    world = World()
    connection = connection or Connection(world.thing, world.cert_id, world.thing)
    topic = Topics.create(world.thing) if verb == "create" else Topics.commit(world.thing)
    before = snapshot(world)

    _local_rules(world).certificate_request(parse_topic(topic), topic, payload, connection)

    assert snapshot(world) == before
    assert [t for t, _ in world.publisher.messages] == [Topics.rejected(topic)]


def test_a_valid_request_on_the_local_rule_path_is_accepted() -> None:
    """The counterpart that makes the property above able to fail."""
    world = World()
    _, csr = world.new_csr()
    topic = Topics.create(world.thing)
    payload = encode(CreateCertificateRequest(world.job_id, csr).to_payload())
    _local_rules(world).certificate_request(
        parse_topic(topic), topic, payload, Connection(world.thing, world.cert_id, world.thing)
    )
    assert [t for t, _ in world.publisher.messages] == [Topics.accepted(topic)]
    assert len(world.issuer.issued) == 1
