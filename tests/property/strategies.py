"""Hypothesis strategies for hostile input: JSON of any shape, payload bytes no parser expects, topics,
thing names and client ids, and near-valid protocol messages with one field broken."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from certrotator.protocol import MAX_CSR_BYTES, MAX_PAYLOAD_BYTES, STATUS_DETAILS_KEY, JobExecutionStatus

THING_RE = r"[a-zA-Z0-9:_-]{1,128}"
JOB_ID_RE = r"[a-zA-Z0-9_-]{1,64}"

# Strings a hostile peer sends: any Unicode (lone surrogates included: JSON's \ud800 escape decodes to
# one), control characters, the MQTT wildcards and separators, very long ones.
_any_char = st.one_of(st.characters(codec=None), st.integers(0xD800, 0xDFFF).map(chr))
hostile_text = st.one_of(
    st.lists(_any_char, max_size=24).map("".join),
    st.text(alphabet="/+#$\x00 \t\n\"'\\:_-aZ09", max_size=24),
    st.sampled_from(
        ["", "\ud800", "\udfff", "\x00", "\u202e", "dev1\x00", "dev1 ", " dev1", "DEV1", "dev10"]
    ),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "9", "/", "é", "\U0001f600"]), st.integers(65, 5000)),
)

# Numbers JSON can spell that Python should not trust: huge integers, floats at the edges.
hostile_numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**80), max_value=10**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -0.0, 2**63, -(2**63) - 1, 2**64, 1e308, -1e308, 5e-324]),
)

json_scalars = st.one_of(st.none(), st.booleans(), hostile_numbers, hostile_text)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(hostile_text, inner, max_size=4),
    ),
    max_leaves=8,
)
json_objects: st.SearchStrategy[dict[str, Any]] = st.dictionaries(hostile_text, json_values, max_size=6)


def mostly(valid: st.SearchStrategy[Any], *others: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` about three times in four, else one of `others` (one_of alone favours the simplest)."""
    other = st.one_of(*others)
    return st.integers(0, 3).flatmap(lambda n: other if n == 3 else valid)


def _deep(opener: str, closer: str, depth: int) -> bytes:
    return (opener * depth + closer * depth).encode()


# Spellings Python's json module mishandles or that are not JSON at all.
_NASTY_JSON = [
    b"NaN",
    b'{"jobId":NaN}',
    b'{"jobId":Infinity}',
    b'{"jobId":-Infinity}',
    b'{"n":1e999}',
    b'{"n":-1e999}',
    b'{"n":' + b"9" * 5000 + b"}",
    b'{"n":-' + b"9" * 4301 + b"}",
    b'{"n":' + b"9" * 4300 + b"}",
    b'{"n":0.' + b"0" * 5000 + b"1}",
    b'{"jobId":"\\ud800"}',
    b'{"jobId":"a\\u0000b"}',
    b'{"a":1,"a":2}',
    b"\xef\xbb\xbf{}",  # UTF-8 BOM
    b"\xff\xfe{\x00}\x00",  # UTF-16 LE BOM
    b"\x00\x00\x00{",
    b'{"jobId":"\xff\xfe"}',  # not UTF-8
    b'{"jobId":"\xed\xa0\x80"}',  # a UTF-8-encoded surrogate
    b"{" * 50_000,
    b"",
    b" ",
    b"null",
    b"[]",
    b'"{}"',
]


def _encodings(value: Any) -> st.SearchStrategy[bytes]:
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    return st.sampled_from(
        [
            text.encode("utf-8", "surrogatepass"),
            json.dumps(value).encode(),
            text.encode("utf-16", "surrogatepass"),
            text.encode("utf-32-be", "surrogatepass"),
        ]
    )


# Create and commit requests with their fields mostly right and noise around them, in any encoding.
near_valid_requests: st.SearchStrategy[bytes] = (
    st.tuples(
        st.fixed_dictionaries(
            {},
            optional={
                "jobId": mostly(st.from_regex(JOB_ID_RE, fullmatch=True), json_values),
                "csr": mostly(
                    st.text(st.characters(max_codepoint=127), min_size=1, max_size=200), json_values
                ),
            },
        ),
        st.dictionaries(hostile_text, json_values, max_size=3),
    )
    .map(lambda parts: {**parts[1], **parts[0]})
    .flatmap(_encodings)
)

# Payload bytes: anything, any JSON in any encoding, deep nesting, the nasty spellings, oversize.
hostile_payloads: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=300),
    near_valid_requests,
    json_values.flatmap(_encodings),
    st.sampled_from(_NASTY_JSON),
    st.builds(_deep, st.sampled_from(["[", '{"a":']), st.just("]"), st.integers(1, 60_000)),
    st.builds(
        lambda n: b'{"jobId":"j","csr":"' + b"A" * n + b'"}',
        st.integers(MAX_CSR_BYTES - 5, MAX_PAYLOAD_BYTES + 10),
    ),
)

# Lambda events and decoded payloads: a JSON object with the protocol's keys among others.
PROTOCOL_KEYS = [
    "jobId",
    "csr",
    "thingName",
    "clientId",
    "principal",
    "topic",
    "thingArn",
    "status",
    "statusDetails",
    "certificatePem",
    "errorMsg",
    "message",
    "execution",
    "jobDocument",
]
protocol_objects: st.SearchStrategy[dict[str, Any]] = st.dictionaries(
    st.one_of(st.sampled_from(PROTOCOL_KEYS), hostile_text), json_values, max_size=8
)

# Topics: protocol-shaped (so parse_topic goes deep) and arbitrary.
_LEVELS = [
    "$aws", "things", "jobs", "awslabs", "certificate", "create", "commit", "announce", "accepted",
    "rejected", "get", "update", "$next", "notify-next", "events", "jobExecution", "succeeded", "failed",
    "timed_out", "dev1", "dev2", "job-1", "+", "#", "", "..", "\x00", "dev1#2",
]  # fmt: skip
_SLOT = st.one_of(
    st.from_regex(THING_RE, fullmatch=True),
    st.sampled_from(["+", "#", "", "$next", "a/b", "dev1 ", "x\x00", "\ud800"]),
    hostile_text,
)
_TEMPLATES = [
    "$aws/things/{t}/jobs/notify-next",
    "$aws/things/{t}/jobs/{j}/get{r}",
    "$aws/things/{t}/jobs/{j}/update{r}",
    "awslabs/things/{t}/certificate/create{r}",
    "awslabs/things/{t}/certificate/commit{r}",
    "awslabs/things/{t}/certificate/announce{r}",
    "$aws/events/jobExecution/{j}/{s}",
]
topics = st.one_of(
    st.builds(
        lambda template, t, j, r, s: template.format(t=t, j=j, r=r, s=s),
        st.sampled_from(_TEMPLATES),
        _SLOT,
        st.one_of(st.from_regex(JOB_ID_RE, fullmatch=True), _SLOT),
        st.sampled_from(["", "/accepted", "/rejected", "/other"]),
        st.one_of(
            st.sampled_from(["succeeded", "failed", "timed_out", "in_progress", "queued"]), hostile_text
        ),
    ),
    st.lists(st.one_of(st.sampled_from(_LEVELS), hostile_text), min_size=1, max_size=8).map("/".join),
    hostile_text,
)

statuses = st.one_of(st.sampled_from([s.value for s in JobExecutionStatus]), json_values)
# statusDetails as a device writes them: keys mostly in AWS's alphabet (so the values get looked at),
# values of every JSON type, empty, control characters, and around AWS's 1,024-character limit.
_DETAIL_VALUES = st.one_of(
    json_values,
    st.sampled_from(["", " ", "\x00", "ok\x7f", "\u200b"]),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\U0001f600"]), st.integers(500, 1100)),
)
status_details = st.one_of(
    json_values,
    st.dictionaries(
        mostly(
            st.one_of(st.just(STATUS_DETAILS_KEY), st.from_regex(r"[a-zA-Z0-9:_-]{1,130}", fullmatch=True)),
            hostile_text,
        ),
        _DETAIL_VALUES,
        max_size=5,
    ),
)
