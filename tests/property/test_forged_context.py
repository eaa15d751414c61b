"""A request's payload cannot stand in for the broker context (issue 13's rule question, local side).

AWS's create and commit rules now select the request's fields by name (tests/infra: no `*`), so a
payload's own `principal`, `thingName`, `clientId` or `topic` never reaches the function. The local
engine's rule path builds `BrokerContext` from the topic and the authenticated connection; these
properties hold it to that: a valid request carrying forged context fields is decided exactly as
without them, on the connection's thing and certificate, through the same handlers.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from certrotator import crypto
from certrotator.backend.ports import CertificateRecord, CertificateStatus, JobExecution
from certrotator.local.policy import Connection
from certrotator.local.rules import Rules
from certrotator.protocol import (
    JOB_DOCUMENT,
    CommitCertificateRequest,
    CreateCertificateRequest,
    JobExecutionStatus,
    RotationProgress,
    Topics,
    encode,
    parse_topic,
)

from ..backend.fakes import World
from .strategies import THING_RE, hostile_text, json_values

OTHER = "dev2"  # a second thing, with its own certificate and its own rotation in progress
HEX_ID = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
# The World builds keys and a CA per example: fewer examples than the parsers get.
FORGED = settings(max_examples=40)


class _RulesOn:
    def rule_enabled(self, _name: str) -> bool:
        return True


def _world() -> World:
    world = World()
    other_cert = world.ca.sign(
        world.subject, crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P256).public_key()
    )
    other_id = crypto.certificate_id(other_cert)
    world.registry.certificates[other_id] = CertificateRecord(
        other_id, crypto.certificate_pem(other_cert), CertificateStatus.ACTIVE
    )
    world.registry.things[OTHER] = [other_id]
    world.jobs.executions[(OTHER, world.job_id)] = JobExecution(
        OTHER, world.job_id, JobExecutionStatus.IN_PROGRESS, dict(JOB_DOCUMENT)
    )
    return world


def _rules(world: World) -> Rules:
    def document(thing: str, job_id: str) -> object | None:
        execution = world.jobs.describe_execution(thing, job_id)
        return execution.document if execution is not None else None

    return Rules(_RulesOn(), world.ports, document)  # type: ignore[arg-type]


def _forged(data: st.DataObject, principals: list[str]) -> dict[str, Any]:
    """One to four of the context fields, with values a device might hope the backend takes."""
    values: dict[str, st.SearchStrategy[Any]] = {
        "thingName": st.one_of(st.just(OTHER), st.from_regex(THING_RE, fullmatch=True), json_values),
        "principal": st.one_of(st.sampled_from(principals), HEX_ID, hostile_text, json_values),
        "clientId": st.one_of(st.just(OTHER), st.just(f"{OTHER}#1"), hostile_text, json_values),
        "topic": st.one_of(st.sampled_from([Topics.create(OTHER), Topics.commit(OTHER)]), hostile_text),
    }
    keys = data.draw(st.sets(st.sampled_from(sorted(values)), min_size=1), label="forged keys")
    return {key: data.draw(values[key], label=key) for key in sorted(keys)}


def _send(world: World, topic: str, body: dict[str, Any], connection: Connection) -> list[str]:
    """A request on the local rule path; the topics of the replies it caused."""
    sent = len(world.publisher.messages)
    _rules(world).certificate_request(parse_topic(topic), topic, encode(body), connection)
    return [t for t, _ in world.publisher.messages[sent:]]


def _others_untouched(world: World, other_before: list[str]) -> None:
    assert world.registry.things[OTHER] == other_before
    assert world.state.load(OTHER) is None


@FORGED
@given(st.data())
def test_a_create_is_decided_on_the_connection_whatever_context_its_payload_carries(
    data: st.DataObject,
) -> None:
    world = _world()
    other_before = list(world.registry.things[OTHER])
    _, csr = world.new_csr()
    forged = _forged(data, [world.cert_id, *other_before])
    topic = Topics.create(world.thing)
    honest = Connection(world.thing, world.cert_id, world.thing)

    replies = _send(
        world, topic, {**forged, **CreateCertificateRequest(world.job_id, csr).to_payload()}, honest
    )

    assert replies == [Topics.accepted(topic)]
    (new_id,) = world.issuer.issued
    assert world.registry.things[world.thing] == [world.cert_id, new_id]
    state = world.state.load(world.thing)
    assert state is not None and (state.old_certificate_id, state.new_certificate_id) == (
        world.cert_id,
        new_id,
    )
    _others_untouched(world, other_before)


@FORGED
@given(st.data())
def test_a_payload_principal_does_not_stand_in_for_the_connections(data: st.DataObject) -> None:
    """Over a connection whose certificate is not the thing's, naming the thing's certificate (and the
    thing) in the payload gets a create nowhere."""
    world = _world()
    other_before = list(world.registry.things[OTHER])
    _, csr = world.new_csr()
    forged = {**_forged(data, [world.cert_id]), "principal": world.cert_id, "thingName": world.thing}
    stranger = data.draw(HEX_ID.filter(lambda h: h != world.cert_id), label="connection principal")
    topic = Topics.create(world.thing)
    body = {**forged, **CreateCertificateRequest(world.job_id, csr).to_payload()}

    replies = _send(world, topic, body, Connection(world.thing, stranger, world.thing))

    assert replies == [Topics.rejected(topic)]
    assert world.issuer.issued == [] and world.registry.things[world.thing] == [world.cert_id]
    assert world.state.load(world.thing) is None
    _others_untouched(world, other_before)


@FORGED
@given(st.data())
def test_a_commit_counts_only_over_the_new_certificate_whatever_its_payload_claims(
    data: st.DataObject,
) -> None:
    world = _world()
    other_before = list(world.registry.things[OTHER])
    _, csr = world.new_csr()
    create = Topics.create(world.thing)
    old = Connection(world.thing, world.cert_id, world.thing)
    assert _send(world, create, CreateCertificateRequest(world.job_id, csr).to_payload(), old) == [
        Topics.accepted(create)
    ]
    (new_id,) = world.issuer.issued
    commit = Topics.commit(world.thing)
    request = CommitCertificateRequest(world.job_id).to_payload()

    # Over the old certificate, claiming the new one: refused, the rotation stays where it was.
    claims_new = {**_forged(data, [new_id]), "principal": new_id}
    assert _send(world, commit, {**claims_new, **request}, old) == [Topics.rejected(commit)]
    state = world.state.load(world.thing)
    assert state is not None and state.progress is RotationProgress.CREATED

    # Over the new certificate, claiming the old one: the connection decides, the commit counts.
    claims_old = {**_forged(data, [world.cert_id]), "principal": world.cert_id}
    new = Connection(world.thing, new_id, world.thing)
    assert _send(world, commit, {**claims_old, **request}, new) == [Topics.accepted(commit)]
    state = world.state.load(world.thing)
    assert state is not None and state.progress is RotationProgress.COMMITTED
    _others_untouched(world, other_before)
