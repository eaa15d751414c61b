"""certrotator.protocol: topics, the job document, statuses and message shapes (DESIGN.md §2)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from certrotator import protocol, status_details
from certrotator.protocol import (
    FAILURE_REASON_KEY,
    JOB_DOCUMENT,
    MAX_CSR_BYTES,
    MAX_PAYLOAD_BYTES,
    STATUS_DETAILS_KEY,
    BrokerContext,
    CommitCertificateRequest,
    CreateCertificateRequest,
    JobExecutionEvent,
    JobExecutionStatus,
    ParsedTopic,
    ProtocolError,
    Reply,
    TopicKind,
    Topics,
)

THING = "gg-core_01:a"
JOB = "rotate-2024_01"
CSR = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
CERT_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
THING_ARN = f"arn:aws:iot:eu-west-1:123456789012:thing/{THING}"
PRINCIPAL = "ab" * 32

TERMINAL = [s for s in JobExecutionStatus if s.is_terminal]
NON_TERMINAL = [JobExecutionStatus.QUEUED, JobExecutionStatus.IN_PROGRESS]


def raises(message: str) -> Any:
    """pytest.raises(ProtocolError) matching the whole message literally."""
    return pytest.raises(ProtocolError, match=f"^{re.escape(message)}$")


# ------------------------------------------------------------------------------------ topic builders


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (Topics.notify_next(THING), f"$aws/things/{THING}/jobs/notify-next"),
        (Topics.next_get(THING), f"$aws/things/{THING}/jobs/$next/get"),
        (Topics.job_get(THING, JOB), f"$aws/things/{THING}/jobs/{JOB}/get"),
        (Topics.job_update(THING, JOB), f"$aws/things/{THING}/jobs/{JOB}/update"),
        (Topics.create(THING), f"awslabs/things/{THING}/certificate/create"),
        (Topics.commit(THING), f"awslabs/things/{THING}/certificate/commit"),
        (Topics.accepted(Topics.create(THING)), f"awslabs/things/{THING}/certificate/create/accepted"),
        (Topics.rejected(Topics.commit(THING)), f"awslabs/things/{THING}/certificate/commit/rejected"),
        (
            Topics.job_execution_event(JOB, JobExecutionStatus.TIMED_OUT),
            f"$aws/events/jobExecution/{JOB}/timed_out",
        ),
    ],
)
def test_topic_builders_spell_the_contract(built: str, expected: str) -> None:
    assert built == expected


@pytest.mark.parametrize("status", NON_TERMINAL)
def test_no_job_execution_event_topic_for_non_terminal_status(status: JobExecutionStatus) -> None:
    with raises(f"no job execution event topic for non-terminal status {status.value}"):
        Topics.job_execution_event(JOB, status)


def test_device_subscriptions_are_the_replies_the_device_needs() -> None:
    subscriptions = Topics.device_subscriptions(THING)
    jobs, cert = f"$aws/things/{THING}/jobs", f"awslabs/things/{THING}/certificate"
    assert subscriptions == [f"{jobs}/notify-next", f"{jobs}/+/get/+", f"{jobs}/+/update/+", f"{cert}/+/+"]

    def matches(topic_filter: str, topic: str) -> bool:
        f, t = topic_filter.split("/"), topic.split("/")
        return len(f) == len(t) and all(a in ("+", b) for a, b in zip(f, t, strict=True))

    replies = [
        Topics.notify_next(THING),
        Topics.accepted(Topics.next_get(THING)),
        Topics.rejected(Topics.job_get(THING, "j1")),
        Topics.accepted(Topics.job_update(THING, "j1")),
        Topics.rejected(Topics.job_update(THING, "j1")),
        Topics.accepted(Topics.create(THING)),
        Topics.rejected(Topics.commit(THING)),
    ]
    requests = [
        Topics.next_get(THING),
        Topics.job_update(THING, "j1"),
        Topics.create(THING),
        Topics.commit(THING),
    ]
    for reply in replies:
        assert any(matches(f, reply) for f in subscriptions), reply
    for request in requests:  # the device must not receive its own requests back
        assert not any(matches(f, request) for f in subscriptions), request


# ---------------------------------------------------------------------------------- parse_topic: ok

_REPLIES: list[Reply | None] = [None, Reply.ACCEPTED, Reply.REJECTED]


def _with_reply(topic: str, reply: Reply | None) -> str:
    if reply is Reply.ACCEPTED:
        return Topics.accepted(topic)
    if reply is Reply.REJECTED:
        return Topics.rejected(topic)
    return topic


def test_parse_notify_next() -> None:
    assert protocol.parse_topic(Topics.notify_next(THING)) == ParsedTopic(TopicKind.NOTIFY_NEXT, THING)


@pytest.mark.parametrize("reply", _REPLIES)
def test_parse_next_get(reply: Reply | None) -> None:
    parsed = protocol.parse_topic(_with_reply(Topics.next_get(THING), reply))
    assert parsed == ParsedTopic(TopicKind.GET, THING, "$next", reply)


@pytest.mark.parametrize("reply", _REPLIES)
def test_parse_job_get(reply: Reply | None) -> None:
    parsed = protocol.parse_topic(_with_reply(Topics.job_get(THING, JOB), reply))
    assert parsed == ParsedTopic(TopicKind.GET, THING, JOB, reply)


@pytest.mark.parametrize("reply", _REPLIES)
def test_parse_job_update(reply: Reply | None) -> None:
    parsed = protocol.parse_topic(_with_reply(Topics.job_update(THING, JOB), reply))
    assert parsed == ParsedTopic(TopicKind.UPDATE, THING, JOB, reply)


@pytest.mark.parametrize("reply", _REPLIES)
@pytest.mark.parametrize(
    ("build", "kind"), [(Topics.create, TopicKind.CREATE), (Topics.commit, TopicKind.COMMIT)]
)
def test_parse_certificate_topics(build: Any, kind: TopicKind, reply: Reply | None) -> None:
    parsed = protocol.parse_topic(_with_reply(build(THING), reply))
    assert parsed == ParsedTopic(kind, THING, None, reply)


@pytest.mark.parametrize("status", TERMINAL)
def test_parse_job_execution_event(status: JobExecutionStatus) -> None:
    parsed = protocol.parse_topic(Topics.job_execution_event(JOB, status))
    assert parsed == ParsedTopic(TopicKind.JOB_EXECUTION_EVENT, None, JOB, None, status.value.lower())


@pytest.mark.parametrize(
    "thing",
    ["a", "A" * 128, "thing:with:colons", "under_score", "dash-ed", "0123456789"],
)
def test_parse_accepts_every_legal_thing_name(thing: str) -> None:
    assert protocol.parse_topic(Topics.create(thing)).thing == thing
    assert protocol.parse_topic(Topics.notify_next(thing)).thing == thing


@pytest.mark.parametrize("job_id", ["j", "J" * 64, "a_b-c", "0"])
def test_parse_accepts_every_legal_job_id(job_id: str) -> None:
    assert protocol.parse_topic(Topics.job_update(THING, job_id)).job_id == job_id


def test_parsed_topic_reply_is_the_enum() -> None:
    parsed = protocol.parse_topic(Topics.accepted(Topics.create(THING)))
    assert parsed.reply is Reply.ACCEPTED


# ---------------------------------------------------------------------------- parse_topic: rejected


def _outside(topic: str) -> str:
    return f"topic {topic!r} is not part of the rotation protocol"


def _bad_thing(thing: str) -> str:
    return f"invalid thing name {thing!r}: 1-128 of [a-zA-Z0-9:_-]"


def _bad_job(job_id: object) -> str:
    return f"invalid jobId {job_id!r}: 1-64 of [a-zA-Z0-9_-]"


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "/",
        "accepted",
        # wrong prefix / namespace
        f"aws/things/{THING}/jobs/notify-next",
        f"$aws/thing/{THING}/jobs/notify-next",
        f"$aws/things/{THING}/job/notify-next",
        f"awslabs/thing/{THING}/certificate/create",
        f"awslabs/things/{THING}/certificates/create",
        f"$aws/things/{THING}/certificate/create",
        f"awslabs/things/{THING}/jobs/notify-next",
        f"/$aws/things/{THING}/jobs/notify-next",
        f"$aws/events/job/{JOB}/completed",
        f"$aws/events/jobexecution/{JOB}/succeeded",
        # verbs outside the contract
        f"$aws/things/{THING}/jobs/notify",
        f"$aws/things/{THING}/jobs/get",
        f"$aws/things/{THING}/jobs/start-next",
        f"$aws/things/{THING}/jobs/{JOB}/delete",
        f"$aws/things/{THING}/jobs/$next/update",
        f"awslabs/things/{THING}/certificate/delete",
        f"awslabs/things/{THING}/certificate/create/done",
        # replies where there are none
        f"$aws/things/{THING}/jobs/notify-next/accepted",
        f"$aws/things/{THING}/jobs/notify-next/rejected",
        f"$aws/events/jobExecution/{JOB}/succeeded/accepted",
        # extra or missing levels
        f"$aws/things/{THING}/jobs/notify-next/extra",
        f"$aws/things/{THING}/jobs/{JOB}/update/accepted/accepted",
        f"$aws/things/{THING}/jobs/{JOB}/update/accepted/x",
        f"$aws/things/{THING}/jobs/{JOB}/update/x/accepted",
        f"$aws/things/{THING}/jobs/{JOB}/get/",
        f"$aws/things/{THING}/jobs/{JOB}",
        f"awslabs/things/{THING}/certificate/create/accepted/accepted",
        f"awslabs/things/{THING}/certificate/create/",
        f"awslabs/things/{THING}/certificate",
        f"awslabs/things/{THING}/extra/certificate/create",
        f"$aws/events/jobExecution/{JOB}",
        f"$aws/events/jobExecution/{JOB}/succeeded/extra",
        # case matters
        f"$AWS/things/{THING}/jobs/notify-next",
        f"$aws/things/{THING}/jobs/NOTIFY-NEXT",
        f"awslabs/things/{THING}/certificate/Create",
        f"awslabs/things/{THING}/certificate/create/Accepted",
    ],
)
def test_parse_rejects_topics_outside_the_contract(topic: str) -> None:
    with raises(_outside(topic)):
        protocol.parse_topic(topic)


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        # wildcards are filters, never topics
        ("$aws/things/+/jobs/notify-next", _bad_thing("+")),
        ("$aws/things/#/jobs/notify-next", _bad_thing("#")),
        ("awslabs/things/+/certificate/create", _bad_thing("+")),
        ("awslabs/things/#/certificate/commit/accepted", _bad_thing("#")),
        (f"$aws/things/{THING}/jobs/+/get", _bad_job("+")),
        (f"$aws/things/{THING}/jobs/#/update", _bad_job("#")),
        (f"$aws/things/{THING}/jobs/+/update/accepted", _bad_job("+")),
        ("$aws/events/jobExecution/+/succeeded", _bad_job("+")),
        # bad thing names
        ("$aws/things//jobs/notify-next", _bad_thing("")),
        ("awslabs/things/a b/certificate/create", _bad_thing("a b")),
        ("awslabs/things/th.ing/certificate/create", _bad_thing("th.ing")),
        ("awslabs/things/$thing/certificate/create", _bad_thing("$thing")),
        (f"awslabs/things/{'t' * 129}/certificate/create", _bad_thing("t" * 129)),
        ("awslabs/things/thing\n/certificate/create", _bad_thing("thing\n")),
        (f"$aws/things/th!ng/jobs/{JOB}/update", _bad_thing("th!ng")),
        # bad job ids
        (f"$aws/things/{THING}/jobs//get", _bad_job("")),
        (f"$aws/things/{THING}/jobs/{'j' * 65}/update", _bad_job("j" * 65)),
        (f"$aws/things/{THING}/jobs/job:1/update", _bad_job("job:1")),
        (f"$aws/things/{THING}/jobs/job.1/get", _bad_job("job.1")),
        (f"$aws/things/{THING}/jobs/$nextt/get", _bad_job("$nextt")),
        (f"$aws/things/{THING}/jobs/job\n/update", _bad_job("job\n")),
        ("$aws/events/jobExecution/job 1/failed", _bad_job("job 1")),
    ],
)
def test_parse_rejects_bad_names_and_wildcards_precisely(topic: str, message: str) -> None:
    with raises(message):
        protocol.parse_topic(topic)


@pytest.mark.parametrize(
    "status", ["queued", "in_progress", "SUCCEEDED", "succeed", "accepted", "+", "#", ""]
)
def test_parse_rejects_job_execution_events_without_a_terminal_status(status: str) -> None:
    topic = f"$aws/events/jobExecution/{JOB}/{status}"
    with raises(f"topic {topic!r}: {status!r} is not a terminal job execution status"):
        protocol.parse_topic(topic)


# -------------------------------------------------------------------------------------- validators


@pytest.mark.parametrize("value", [None, 1, 1.5, True, ["j"], {"j": 1}, "", "j" * 65, "a/b", "j\n", "é"])
def test_validate_job_id_rejects(value: object) -> None:
    with raises(_bad_job(value)):
        protocol.validate_job_id(value)


@pytest.mark.parametrize("value", ["", "x" * 129, "a/b", "a+b", "a#", "é", "t\n", " t"])
def test_validate_thing_name_rejects(value: str) -> None:
    with raises(_bad_thing(value)):
        protocol.validate_thing_name(value)


# ------------------------------------------------------------------------------------------ requests

CREATE_WHAT = "create-certificate request"
COMMIT_WHAT = "commit-certificate request"


def _as(kind: str, body: dict[str, Any]) -> bytes | str | dict[str, Any]:
    if kind == "bytes":
        return json.dumps(body).encode()
    if kind == "str":
        return json.dumps(body)
    return body


@pytest.mark.parametrize("kind", ["bytes", "str", "dict"])
def test_create_request_parses_from_every_input_type(kind: str) -> None:
    request = CreateCertificateRequest.parse(_as(kind, {"jobId": JOB, "csr": CSR, "extra": 1}))
    assert request == CreateCertificateRequest(JOB, CSR)


@pytest.mark.parametrize("kind", ["bytes", "str", "dict"])
def test_commit_request_parses_from_every_input_type(kind: str) -> None:
    assert CommitCertificateRequest.parse(_as(kind, {"jobId": JOB})) == CommitCertificateRequest(JOB)


def test_requests_round_trip_through_their_payloads() -> None:
    create = CreateCertificateRequest(JOB, CSR)
    assert create.to_payload() == {"jobId": JOB, "csr": CSR}
    assert CreateCertificateRequest.parse(protocol.encode(create.to_payload())) == create
    commit = CommitCertificateRequest(JOB)
    assert commit.to_payload() == {"jobId": JOB}
    assert CommitCertificateRequest.parse(protocol.encode(commit.to_payload())) == commit


def test_encode_is_compact_json_bytes() -> None:
    assert protocol.encode({"jobId": JOB, "csr": "x"}) == b'{"jobId":"rotate-2024_01","csr":"x"}'


_PARSERS = [
    pytest.param(CreateCertificateRequest.parse, CREATE_WHAT, id="create"),
    pytest.param(CommitCertificateRequest.parse, COMMIT_WHAT, id="commit"),
]


@pytest.mark.parametrize(("parse", "what"), _PARSERS)
@pytest.mark.parametrize(
    "payload", [b"", "", b"{", "{'jobId': 'x'}", b'{"jobId":', b"\xff\xfe", "nul", b'{"a":1}{"b":2}']
)
def test_requests_reject_malformed_json(parse: Any, what: str, payload: bytes | str) -> None:
    with pytest.raises(ProtocolError, match=f"^{re.escape(what)}: payload is not valid JSON \\("):
        parse(payload)


@pytest.mark.parametrize(("parse", "what"), _PARSERS)
def test_requests_reject_deeply_nested_json_as_malformed(parse: Any, what: str) -> None:
    payload = b"[" * 100_000  # within the size limit, deeper than the JSON decoder can recurse
    with raises(f"{what}: payload is not valid JSON (nested too deeply)"):
        parse(payload)


@pytest.mark.parametrize(("parse", "what"), _PARSERS)
@pytest.mark.parametrize(
    ("payload", "type_name"),
    [
        (b"[]", "list"),
        ('"x"', "str"),
        (b"1", "int"),
        (b"1.5", "float"),
        ("null", "NoneType"),
        (b"true", "bool"),
    ],
)
def test_requests_reject_non_object_json(parse: Any, what: str, payload: bytes | str, type_name: str) -> None:
    with raises(f"{what}: payload must be a JSON object, got {type_name}"):
        parse(payload)


@pytest.mark.parametrize(("parse", "what"), _PARSERS)
@pytest.mark.parametrize("kind", ["bytes", "str"])
def test_requests_reject_oversize_payloads(parse: Any, what: str, kind: str) -> None:
    body = {"jobId": JOB, "csr": CSR, "pad": "x" * MAX_PAYLOAD_BYTES}
    payload = _as(kind, body)
    size = len(json.dumps(body).encode())
    with raises(f"{what}: payload of {size} bytes exceeds {MAX_PAYLOAD_BYTES}"):
        parse(payload)


@pytest.mark.parametrize(("parse", "what"), _PARSERS)
@pytest.mark.parametrize("kind", ["bytes", "str"])
@pytest.mark.parametrize("sign", ["", "-"])
def test_requests_reject_integers_too_long_for_int_conversion(
    parse: Any, what: str, kind: str, sign: str
) -> None:
    """Python's json raises a bare ValueError ("Exceeds the limit (4300 digits) for integer string
    conversion"); a device must get a ProtocolError (and so a rejected reply), on every Python."""
    payload = f'{{"jobId": "{JOB}", "csr": "x", "n": {sign}{"9" * 5000}}}'
    with raises(f"{what}: payload has an unacceptable number: an integer of 5000 digits (at most 4300)"):
        parse(payload if kind == "str" else payload.encode())


def test_integers_up_to_the_limit_are_accepted() -> None:
    body = protocol.decode_json_object(f'{{"n": -{"9" * 4300}, "m": 7}}', "x")
    assert body == {"n": -int("9" * 4300), "m": 7}


@pytest.mark.parametrize(
    ("number", "message"),
    [
        ("NaN", "NaN is not a JSON value"),
        ("Infinity", "Infinity is not a JSON value"),
        ("-Infinity", "-Infinity is not a JSON value"),
        ("1e999", "the number 1e999 is out of range"),
        ("-" + "9" * 400 + ".5", f"the number -{'9' * 19}... is out of range"),
    ],
)
def test_non_finite_numbers_are_rejected(number: str, message: str) -> None:
    """Python's json accepts NaN/Infinity (not JSON) and turns 1e999 into inf, which it would echo
    back as the non-JSON `Infinity`."""
    with raises(f"{COMMIT_WHAT}: payload has an unacceptable number: {message}"):
        CommitCertificateRequest.parse(f'{{"jobId": "{JOB}", "x": {number}}}')


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32"])
def test_payload_bytes_in_any_json_encoding_decode_as_json_loads_does(encoding: str) -> None:
    payload = json.dumps({"jobId": JOB, "note": "é€"}, ensure_ascii=False).encode(encoding)
    assert protocol.decode_json_object(payload, "x") == {"jobId": JOB, "note": "é€"}


def test_payload_limit_counts_utf8_bytes_of_a_str() -> None:
    # 50,000 three-byte characters: fewer characters than the limit, more bytes
    payload = json.dumps({"jobId": JOB, "pad": "€" * 50_000}, ensure_ascii=False)
    assert len(payload) < MAX_PAYLOAD_BYTES < len(payload.encode())
    with raises(f"{COMMIT_WHAT}: payload of {len(payload.encode())} bytes exceeds {MAX_PAYLOAD_BYTES}"):
        CommitCertificateRequest.parse(payload)


def test_payload_exactly_at_the_limit_is_accepted() -> None:
    head, tail = f'{{"jobId":"{JOB}","pad":"', '"}'
    payload = head + "x" * (MAX_PAYLOAD_BYTES - len(head) - len(tail)) + tail
    assert len(payload) == MAX_PAYLOAD_BYTES
    assert CommitCertificateRequest.parse(payload).job_id == JOB
    assert CommitCertificateRequest.parse(payload.encode()).job_id == JOB


@pytest.mark.parametrize(("parse", "what"), _PARSERS)
@pytest.mark.parametrize(
    "body",
    [
        {"csr": CSR},
        {"jobId": None, "csr": CSR},
        {"jobId": "", "csr": CSR},
        {"jobId": 7, "csr": CSR},
        {"jobId": ["j"], "csr": CSR},
        {"jobId": "bad id", "csr": CSR},
        {"jobId": "j" * 65, "csr": CSR},
        {"jobId": "job\n", "csr": CSR},
        {"JobId": JOB, "csr": CSR},
    ],
)
def test_requests_reject_missing_or_invalid_job_id(parse: Any, what: str, body: dict[str, Any]) -> None:
    with raises(_bad_job(body.get("jobId"))):
        parse(body)
    with raises(_bad_job(body.get("jobId"))):
        parse(json.dumps(body))


@pytest.mark.parametrize(
    "body",
    [
        {"jobId": JOB},
        {"jobId": JOB, "csr": None},
        {"jobId": JOB, "csr": ""},
        {"jobId": JOB, "csr": 5},
        {"jobId": JOB, "csr": [CSR]},
        {"jobId": JOB, "csr": {"pem": CSR}},
        {"jobId": JOB, "CSR": CSR},
    ],
)
def test_create_request_rejects_missing_or_empty_csr(body: dict[str, Any]) -> None:
    with raises(f"{CREATE_WHAT}: 'csr' must be a non-empty PEM string"):
        CreateCertificateRequest.parse(body)


@pytest.mark.parametrize("csr", ["\ud800", CSR + "é", "€"])
def test_create_request_rejects_non_ascii_csr(csr: str) -> None:
    with raises(f"{CREATE_WHAT}: 'csr' must be ASCII (PEM)"):
        CreateCertificateRequest.parse({"jobId": JOB, "csr": csr})
    # JSON escapes reach the same check (a lone surrogate must not crash the parser)
    with raises(f"{CREATE_WHAT}: 'csr' must be ASCII (PEM)"):
        CreateCertificateRequest.parse(json.dumps({"jobId": JOB, "csr": csr}))


def test_create_request_csr_size_limit() -> None:
    at_limit = "C" * MAX_CSR_BYTES
    assert CreateCertificateRequest.parse({"jobId": JOB, "csr": at_limit}).csr == at_limit
    with raises(f"{CREATE_WHAT}: CSR exceeds {MAX_CSR_BYTES} bytes"):
        CreateCertificateRequest.parse({"jobId": JOB, "csr": at_limit + "C"})
    with raises(f"{CREATE_WHAT}: CSR exceeds {MAX_CSR_BYTES} bytes"):
        CreateCertificateRequest.parse(json.dumps({"jobId": JOB, "csr": at_limit + "C"}).encode())


def test_dict_input_is_used_as_is() -> None:
    body = {"jobId": JOB}
    assert protocol.decode_json_object(body, "x") is body


# -------------------------------------------------------------------------------------------- replies


def test_certificate_accepted_round_trip() -> None:
    payload = protocol.certificate_accepted(CERT_PEM)
    assert payload == {"certificatePem": CERT_PEM}
    assert protocol.parse_certificate_accepted(protocol.encode(payload)) == CERT_PEM
    assert protocol.parse_certificate_accepted(json.dumps(payload)) == CERT_PEM
    assert protocol.parse_certificate_accepted(payload) == CERT_PEM


@pytest.mark.parametrize(
    "body",
    [{}, {"certificatePem": None}, {"certificatePem": 1}, {"certificatePem": ""}, {"certificatePem": CSR}],
)
def test_parse_certificate_accepted_requires_a_pem_certificate(body: dict[str, Any]) -> None:
    with raises("create-certificate reply: 'certificatePem' must be a PEM certificate"):
        protocol.parse_certificate_accepted(body)


def test_parse_certificate_accepted_rejects_malformed_json() -> None:
    with raises("create-certificate reply: payload must be a JSON object, got list"):
        protocol.parse_certificate_accepted(b"[]")
    with pytest.raises(ProtocolError, match=r"^create-certificate reply: payload is not valid JSON \("):
        protocol.parse_certificate_accepted(b"{")


def test_commit_accepted_is_empty() -> None:
    assert protocol.commit_accepted() == {}


@pytest.mark.parametrize("kind", ["bytes", "str", "dict"])
def test_rejected_round_trip(kind: str) -> None:
    payload = protocol.rejected("the CSR's signature does not verify")
    assert payload == {"errorMsg": "the CSR's signature does not verify"}
    assert protocol.parse_rejected(_as(kind, payload)) == "the CSR's signature does not verify"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"message": "from AWS IoT Jobs"}, "from AWS IoT Jobs"),  # the Jobs service's rejected shape
        ({"errorMsg": "ours", "message": "theirs"}, "ours"),
        ({"code": "InvalidRequest"}, "no reason given"),
        ({}, "no reason given"),
        ({"errorMsg": 42}, "42"),
    ],
)
def test_parse_rejected_fallbacks(body: dict[str, Any], expected: str) -> None:
    assert protocol.parse_rejected(body) == expected


def test_parse_rejected_rejects_malformed_json() -> None:
    with raises("rejected reply: payload must be a JSON object, got str"):
        protocol.parse_rejected('"nope"')


# --------------------------------------------------------------------------------------- broker context

EVENT = {"thingName": THING, "clientId": f"{THING}-agent", "principal": PRINCIPAL.upper(), "topic": "t"}


def test_broker_context_from_event() -> None:
    context = BrokerContext.from_event({**EVENT, "jobId": JOB})
    assert context == BrokerContext(THING, f"{THING}-agent", PRINCIPAL, "t")  # principal lowercased
    assert BrokerContext.from_event(context.to_event_fields()) == context


@pytest.mark.parametrize(
    ("drop", "missing"),
    [
        (["thingName"], "thingName"),
        (["clientId"], "clientId"),
        (["principal"], "principal"),
        (["topic"], "topic"),
        (["thingName", "principal"], "thingName, principal"),
        (["thingName", "clientId", "principal", "topic"], "thingName, clientId, principal, topic"),
    ],
)
def test_broker_context_names_every_missing_field(drop: list[str], missing: str) -> None:
    event = {k: v for k, v in EVENT.items() if k not in drop}
    with raises(f"request event lacks broker context: {missing}"):
        BrokerContext.from_event(event)


@pytest.mark.parametrize("field", ["thingName", "clientId", "principal", "topic"])
@pytest.mark.parametrize("empty", ["", None])
def test_broker_context_treats_empty_fields_as_missing(field: str, empty: str | None) -> None:
    with raises(f"request event lacks broker context: {field}"):
        BrokerContext.from_event({**EVENT, field: empty})


def test_broker_context_validates_the_thing_name() -> None:
    with raises(_bad_thing("a/b")):
        BrokerContext.from_event({**EVENT, "thingName": "a/b"})


# ------------------------------------------------------------------------------------- status updates


@pytest.mark.parametrize("status", list(JobExecutionStatus))
def test_status_update_always_carries_the_rotator_key(status: JobExecutionStatus) -> None:
    update = status_details.status_update(status)
    assert update == {"status": status.value, "statusDetails": {STATUS_DETAILS_KEY: status.value}}


def test_status_update_with_detail_and_reason() -> None:
    update = status_details.status_update(JobExecutionStatus.FAILED, "rolled back", "no connection in 60 s")
    assert update == {
        "status": "FAILED",
        "statusDetails": {STATUS_DETAILS_KEY: "rolled back", FAILURE_REASON_KEY: "no connection in 60 s"},
    }


def test_status_update_without_reason_has_no_failure_key() -> None:
    details = status_details.status_update(JobExecutionStatus.IN_PROGRESS, "csr sent")["statusDetails"]
    assert details == {STATUS_DETAILS_KEY: "csr sent"}


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("x" * 5000, "x" * 1024),
        ("line one\nline two\tend", "line one line two end"),
        ("\x00bad\x7f", "bad"),
        ("", "unspecified"),
        ("\n\r", "unspecified"),
        ("zero\u200bwidth", "zero width"),  # Cf is in \p{C} too
        ("\U0001f600" * 600, "\U0001f600" * 512),  # AWS counts UTF-16 units: each emoji is two
        ("x" * 1023 + "\U0001f600", "x" * 1023),  # one unit left: the emoji does not fit
    ],
)
def test_status_update_values_satisfy_the_jobs_api(reason: str, expected: str) -> None:
    """AWS IoT Jobs accepts statusDetails values of 1-1024 characters matching [^\\p{C}]+."""
    details = status_details.status_update(JobExecutionStatus.FAILED, reason, reason)["statusDetails"]
    assert details[FAILURE_REASON_KEY] == expected
    assert details[STATUS_DETAILS_KEY] == (expected if expected != "unspecified" else "FAILED")
    for value in details.values():
        assert 1 <= len(value.encode("utf-16-le")) // 2 <= 1024
        assert "\n" not in value and "\x00" not in value
    # what the device sends is what the local Jobs API (and AWS) stores, unchanged
    assert status_details.coerce_status_details(details) == details


# --------------------------------------------------------------------------------- job execution events


def _aws_event(**overrides: Any) -> dict[str, Any]:
    """A job execution event as AWS IoT publishes it on $aws/events/jobExecution/{jobId}/{status}."""
    event: dict[str, Any] = {
        "eventType": "JOB_EXECUTION",
        "eventId": "cca89fa5-8a7f-4ced-8c8b-6c5ba9e3eb7f",
        "timestamp": 1_700_000_000,
        "operation": "succeeded",
        "jobId": JOB,
        "thingArn": THING_ARN,
        "status": "SUCCEEDED",
        "statusDetails": {STATUS_DETAILS_KEY: "SUCCEEDED"},
    }
    event.update(overrides)
    return event


def test_job_execution_event_parse_aws_shape() -> None:
    parsed = JobExecutionEvent.parse(_aws_event())
    assert parsed == JobExecutionEvent(
        THING, JOB, JobExecutionStatus.SUCCEEDED, {STATUS_DETAILS_KEY: "SUCCEEDED"}
    )


@pytest.mark.parametrize("status", list(JobExecutionStatus))
def test_job_execution_event_parses_every_status(status: JobExecutionStatus) -> None:
    parsed = JobExecutionEvent.parse(_aws_event(status=status.value, operation=status.value.lower()))
    assert parsed.status is status


@pytest.mark.parametrize("details", [None, {}])
def test_job_execution_event_without_status_details(details: dict[str, Any] | None) -> None:
    event = _aws_event(statusDetails=details)
    assert JobExecutionEvent.parse(event).status_details == {}
    del event["statusDetails"]
    assert JobExecutionEvent.parse(event).status_details == {}


def test_job_execution_event_stringifies_detail_values() -> None:
    parsed = JobExecutionEvent.parse(_aws_event(statusDetails={"n": 1, FAILURE_REASON_KEY: "x"}))
    assert parsed.status_details == {"n": "1", FAILURE_REASON_KEY: "x"}


def test_job_execution_event_round_trip() -> None:
    event = JobExecutionEvent(THING, JOB, JobExecutionStatus.TIMED_OUT, {STATUS_DETAILS_KEY: "created"})
    shape = event.to_event()
    assert shape["eventType"] == "JOB_EXECUTION"
    assert shape["thingArn"] == f"arn:aws:iot:local:000000000000:thing/{THING}"
    assert JobExecutionEvent.parse(shape) == event
    assert JobExecutionEvent.parse(event.to_event("arn:aws:iot:us-east-1:1:thing/")) == event


@pytest.mark.parametrize(
    "thing_arn",
    [None, 7, "", THING, f"arn:aws:iot:eu-west-1:123456789012:{THING}", "arn:aws:iot:eu-west-1:1:job/x"],
)
def test_job_execution_event_rejects_bad_thing_arn(thing_arn: object) -> None:
    with raises(f"job execution event: bad thingArn {thing_arn!r}"):
        JobExecutionEvent.parse(_aws_event(thingArn=thing_arn))


def test_job_execution_event_missing_thing_arn() -> None:
    event = _aws_event()
    del event["thingArn"]
    with raises("job execution event: bad thingArn None"):
        JobExecutionEvent.parse(event)


@pytest.mark.parametrize("thing", ["", "a/b", "t" * 129])
def test_job_execution_event_rejects_bad_thing_name_in_arn(thing: str) -> None:
    with raises(_bad_thing(thing)):
        JobExecutionEvent.parse(_aws_event(thingArn=f"arn:aws:iot:eu-west-1:1:thing/{thing}"))


@pytest.mark.parametrize("status", [None, "", "succeeded", "SUCCESS", "DONE", 3, ["SUCCEEDED"]])
def test_job_execution_event_rejects_unknown_status(status: object) -> None:
    with raises(f"job execution event: unknown status {status!r}"):
        JobExecutionEvent.parse(_aws_event(status=status))


@pytest.mark.parametrize("job_id", [None, "", "a b", "j" * 65])
def test_job_execution_event_rejects_bad_job_id(job_id: object) -> None:
    with raises(_bad_job(job_id)):
        JobExecutionEvent.parse(_aws_event(jobId=job_id))


@pytest.mark.parametrize("details", ["SUCCEEDED", ["a"], 5])
def test_job_execution_event_rejects_non_object_status_details(details: object) -> None:
    with raises("job execution event: statusDetails must be an object"):
        JobExecutionEvent.parse(_aws_event(statusDetails=details))


# ------------------------------------------------------------------------------ statuses and documents


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        (JobExecutionStatus.QUEUED, False),
        (JobExecutionStatus.IN_PROGRESS, False),
        (JobExecutionStatus.SUCCEEDED, True),
        (JobExecutionStatus.FAILED, True),
        (JobExecutionStatus.TIMED_OUT, True),
        (JobExecutionStatus.REJECTED, True),
        (JobExecutionStatus.REMOVED, True),
        (JobExecutionStatus.CANCELED, True),
    ],
)
def test_is_terminal(status: JobExecutionStatus, terminal: bool) -> None:
    assert status.is_terminal is terminal


def test_every_status_is_classified() -> None:
    assert len(JobExecutionStatus) == 8
    assert {s.value for s in JobExecutionStatus} == {
        "QUEUED",
        "IN_PROGRESS",
        "SUCCEEDED",
        "FAILED",
        "TIMED_OUT",
        "REJECTED",
        "REMOVED",
        "CANCELED",
    }


def test_job_document_is_exactly_the_rotation_operation() -> None:
    assert JOB_DOCUMENT == {"operation": "ROTATE_CERTIFICATE"}
    assert protocol.encode(JOB_DOCUMENT) == b'{"operation":"ROTATE_CERTIFICATE"}'


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"operation": "ROTATE_CERTIFICATE"}, True),
        (json.loads('{"operation":"ROTATE_CERTIFICATE"}'), True),
        ({"operation": "rotate_certificate"}, False),
        ({"operation": "ROTATE_CERTIFICATE", "extra": 1}, False),
        ({"Operation": "ROTATE_CERTIFICATE"}, False),
        ({"operation": "REBOOT"}, False),
        ({}, False),
        (None, False),
        ([JOB_DOCUMENT], False),
        ("ROTATE_CERTIFICATE", False),
    ],
)
def test_is_rotation_document(document: object, expected: bool) -> None:
    assert protocol.is_rotation_document(document) is expected


# ------------------------------------------------------------------------- statusDetails from a device


@pytest.mark.parametrize(
    ("details", "stored"),
    [
        ({}, {}),
        ({STATUS_DETAILS_KEY: "created"}, {STATUS_DETAILS_KEY: "created"}),
        # the seed's component: {"CertificateRotator": true}
        (
            {STATUS_DETAILS_KEY: True, FAILURE_REASON_KEY: "no CSR"},
            {STATUS_DETAILS_KEY: "true", FAILURE_REASON_KEY: "no CSR"},
        ),
        ({"ok": False}, {"ok": "false"}),
        ({"attempt": 3, "neg": -12, "big": 10**30}, {"attempt": "3", "neg": "-12", "big": "1" + "0" * 30}),
        ({"ratio": 0.25, "exp": 1e-7}, {"ratio": "0.25", "exp": "1e-07"}),
        ({"k:a_b-C9": "v", "x" * 128: "y" * 1024}, {"k:a_b-C9": "v", "x" * 128: "y" * 1024}),
        ({"emoji": "\U0001f600" * 512}, {"emoji": "\U0001f600" * 512}),  # 1,024 UTF-16 units
    ],
)
def test_coerce_status_details_keeps_what_aws_accepts_as_strings(
    details: dict[str, Any], stored: dict[str, str]
) -> None:
    coerced = status_details.coerce_status_details(details)
    assert coerced == stored
    assert all(type(v) is str for v in coerced.values())


def test_coerce_status_details_from_a_decoded_payload() -> None:
    """The whole way a device's update takes: bytes on the wire -> decode -> coerce."""
    payload = b'{"status":"FAILED","statusDetails":{"CertificateRotator":true,"code":42,"f":1.5}}'
    body = protocol.decode_json_object(payload, "jobs request")
    assert status_details.coerce_status_details(body["statusDetails"]) == {
        STATUS_DETAILS_KEY: "true",
        "code": "42",
        "f": "1.5",
    }


@pytest.mark.parametrize(
    ("details", "message"),
    [
        (None, "statusDetails must be a JSON object of names to values, got null"),
        ([["k", "v"]], "statusDetails must be a JSON object of names to values, got an array"),
        ("k=v", "statusDetails must be a JSON object of names to values, got a string"),
        (True, "statusDetails must be a JSON object of names to values, got a boolean"),
        (
            {"k": {"nested": "v"}},
            "statusDetails value of 'k' must be a string, number or boolean, got an object",
        ),
        ({"k": ["v"]}, "statusDetails value of 'k' must be a string, number or boolean, got an array"),
        ({"k": None}, "statusDetails value of 'k' must be a string, number or boolean, got null"),
        ({"k": ""}, "statusDetails value of 'k' is empty; AWS requires 1-1024 characters"),
        ({"k": "v" * 1025}, "statusDetails value of 'k' has 1025 characters; at most 1024"),
        ({"k": "\U0001f600" * 513}, "statusDetails value of 'k' has 1026 characters; at most 1024"),
        (
            {"k": "two\nlines"},
            "statusDetails value of 'k' contains the control or unassigned character '\\n'",
        ),
        (
            {"k": "zero\u200bwidth"},
            "statusDetails value of 'k' contains the control or unassigned character '\\u200b'",
        ),
        (
            {"k": "\ud800"},
            "statusDetails value of 'k' contains the control or unassigned character '\\ud800'",
        ),
        ({"": "v"}, "statusDetails key '' must be 1-128 of [a-zA-Z0-9:_-]"),
        ({"a b": "v"}, "statusDetails key 'a b' must be 1-128 of [a-zA-Z0-9:_-]"),
        ({"é": "v"}, "statusDetails key 'é' must be 1-128 of [a-zA-Z0-9:_-]"),
        ({"k\n": "v"}, "statusDetails key 'k\\n' must be 1-128 of [a-zA-Z0-9:_-]"),
        (
            {"x" * 129: "v"},
            f"statusDetails key {'x' * 40!r}... (129 characters) must be 1-128 of [a-zA-Z0-9:_-]",
        ),
        ({1: "v"}, "statusDetails key 1 must be 1-128 of [a-zA-Z0-9:_-]"),
    ],
)
def test_coerce_status_details_refuses_what_aws_refuses(details: object, message: str) -> None:
    with raises(message):
        status_details.coerce_status_details(details)
