"""Properties of the protocol parsers over hostile input: every parser either returns a value that keeps
the contract's limits or raises ProtocolError (which every caller answers with a rejected reply or
ignores); nothing else ever escapes. And what the builders make, the parsers take back."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from certrotator.protocol import (
    MAX_CSR_BYTES,
    MAX_PAYLOAD_BYTES,
    BrokerContext,
    CommitCertificateRequest,
    CreateCertificateRequest,
    JobExecutionEvent,
    JobExecutionStatus,
    ProtocolError,
    TopicKind,
    Topics,
    decode_json_object,
    parse_certificate_accepted,
    parse_rejected,
    parse_topic,
)
from certrotator.status_details import (
    MAX_STATUS_DETAIL_KEY_LENGTH,
    MAX_STATUS_DETAIL_LENGTH,
    coerce_status_details,
)

from .strategies import (
    JOB_ID_RE,
    THING_RE,
    hostile_payloads,
    hostile_text,
    json_values,
    protocol_objects,
    status_details,
    statuses,
    topics,
)

THING = re.compile(THING_RE)
JOB_ID = re.compile(JOB_ID_RE)
# Parsers are cheap: search more examples than the profile's default.
MANY = settings(max_examples=200)

Payload = bytes | str | dict[str, Any]
payloads: st.SearchStrategy[Payload] = st.one_of(
    hostile_payloads,
    hostile_payloads.map(lambda b: b.decode("utf-8", "surrogateescape")),
    protocol_objects,
)


def _valid_job_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID.fullmatch(value) is not None


@MANY
@given(payloads)
@example(b"[" * 100_000)  # over the size limit
@example(b"[" * 120_000 + b"]" * 10_000)  # under it, nested too deeply for the decoder
@example("\ud800")
def test_decode_json_object_returns_an_object_or_raises_protocol_error(payload: Payload) -> None:
    try:
        value = decode_json_object(payload, "message")
    except ProtocolError as exc:
        assert str(exc).startswith("message: ")
        return
    assert isinstance(value, dict)
    size = len(payload) if isinstance(payload, bytes) else 0
    assert size <= MAX_PAYLOAD_BYTES


@MANY
@given(payloads)
def test_create_request_parse_keeps_the_contracts_limits(payload: Payload) -> None:
    try:
        request = CreateCertificateRequest.parse(payload)
    except ProtocolError:
        event("refused")
        return
    event("parsed")
    assert _valid_job_id(request.job_id)
    assert request.csr and request.csr.isascii() and len(request.csr) <= MAX_CSR_BYTES


@MANY
@given(payloads)
def test_commit_request_parse_keeps_the_contracts_limits(payload: Payload) -> None:
    try:
        request = CommitCertificateRequest.parse(payload)
    except ProtocolError:
        return
    assert _valid_job_id(request.job_id)


@MANY
@given(payloads)
def test_device_side_reply_parsers_return_text_or_raise_protocol_error(payload: Payload) -> None:
    try:
        pem = parse_certificate_accepted(payload)
    except ProtocolError:
        pass
    else:
        assert "-----BEGIN CERTIFICATE-----" in pem
    try:
        reason = parse_rejected(payload)
    except ProtocolError:
        return
    assert isinstance(reason, str)


@given(st.from_regex(JOB_ID, fullmatch=True), st.text(st.characters(max_codepoint=127), min_size=1))
def test_a_create_request_survives_its_own_encoding(job_id: str, csr: str) -> None:
    """The other direction: what a device builds, the backend parses back unchanged (up to the limit)."""
    sent = CreateCertificateRequest(job_id, csr[:MAX_CSR_BYTES])
    assert CreateCertificateRequest.parse(json.dumps(sent.to_payload()).encode()) == sent
    assert CommitCertificateRequest.parse(json.dumps({"jobId": job_id})) == CommitCertificateRequest(job_id)


@MANY
@given(topics)
def test_parse_topic_classifies_or_raises_protocol_error(topic: str) -> None:
    try:
        parsed = parse_topic(topic)
    except ProtocolError:
        return
    levels = topic.split("/")
    if parsed.kind is TopicKind.JOB_EXECUTION_EVENT:
        assert parsed.thing is None and _valid_job_id(parsed.job_id)
        return
    # The thing is always topic level 3 (what the AWS rule's topic(3) takes) and a valid name.
    assert parsed.thing == levels[2] and THING.fullmatch(parsed.thing)
    assert "+" not in topic and "#" not in topic
    if parsed.job_id is not None:
        assert parsed.job_id == "$next" or _valid_job_id(parsed.job_id)


@given(st.from_regex(THING, fullmatch=True), st.from_regex(JOB_ID, fullmatch=True))
def test_every_topic_the_builders_make_parses_back(thing: str, job_id: str) -> None:
    built = {
        Topics.notify_next(thing): (TopicKind.NOTIFY_NEXT, None),
        Topics.next_get(thing): (TopicKind.GET, "$next"),
        Topics.job_get(thing, job_id): (TopicKind.GET, job_id),
        Topics.job_update(thing, job_id): (TopicKind.UPDATE, job_id),
        Topics.create(thing): (TopicKind.CREATE, None),
        Topics.commit(thing): (TopicKind.COMMIT, None),
        Topics.announce(thing): (TopicKind.ANNOUNCE, None),
    }
    for topic, (kind, job) in built.items():
        parsed = parse_topic(topic)
        assert (parsed.kind, parsed.thing, parsed.job_id, parsed.reply) == (kind, thing, job, None)
    for topic in (Topics.accepted(Topics.create(thing)), Topics.rejected(Topics.job_update(thing, job_id))):
        assert parse_topic(topic).reply is not None


@given(
    protocol_objects,
    st.fixed_dictionaries(
        {},
        optional={
            "thingName": st.one_of(st.from_regex(THING, fullmatch=True), json_values),
            "clientId": st.one_of(hostile_text, json_values),
            "principal": st.one_of(st.from_regex(r"[0-9a-fA-F]{64}", fullmatch=True), json_values),
            "topic": st.one_of(topics, json_values),
        },
    ),
)
def test_broker_context_from_any_event_is_complete_or_refused(
    noise: dict[str, Any], fields: dict[str, Any]
) -> None:
    event = {**noise, **fields}
    try:
        context = BrokerContext.from_event(event)
    except ProtocolError:
        return
    assert THING.fullmatch(context.thing)
    assert context.client_id and context.principal and context.topic
    assert context.principal == context.principal.lower()


@given(
    protocol_objects,
    st.fixed_dictionaries(
        {},
        optional={
            "thingArn": st.one_of(
                st.from_regex(THING, fullmatch=True).map(lambda t: f"arn:aws:iot:eu-west-1:1:thing/{t}"),
                hostile_text.map(lambda t: f"arn:aws:iot:x:1:thing/{t}"),
                json_values,
            ),
            "jobId": st.one_of(st.from_regex(JOB_ID, fullmatch=True), json_values),
            "status": statuses,
            "statusDetails": status_details,
        },
    ),
)
def test_job_execution_event_parse_is_well_formed_or_refused(
    noise: dict[str, Any], fields: dict[str, Any]
) -> None:
    try:
        event = JobExecutionEvent.parse({**noise, **fields})
    except ProtocolError:
        return
    assert THING.fullmatch(event.thing) and _valid_job_id(event.job_id)
    assert isinstance(event.status, JobExecutionStatus)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in event.status_details.items())


@MANY
@given(status_details)
def test_status_details_coerce_to_what_aws_stores_or_are_refused(details: object) -> None:
    try:
        coerced = coerce_status_details(details)
    except ProtocolError:
        return
    assert isinstance(details, dict) and set(coerced) == set(details)
    for key, value in coerced.items():
        assert 1 <= len(key) <= MAX_STATUS_DETAIL_KEY_LENGTH
        units = len(value.encode("utf-16-le", "surrogatepass")) // 2
        assert 1 <= units <= MAX_STATUS_DETAIL_LENGTH
