"""A job execution's statusDetails as AWS IoT Jobs takes them: the device's update (`status_update`, always
carrying protocol.STATUS_DETAILS_KEY) and what the local Jobs API stores of a device's update
(`coerce_status_details`), within AWS's limits on keys and values.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any, Final

from certrotator.protocol import (
    FAILURE_REASON_KEY,
    STATUS_DETAILS_KEY,
    JobExecutionStatus,
    ProtocolError,
)

MAX_STATUS_DETAIL_LENGTH: Final = 1024


def _status_detail_value(text: str, fallback: str) -> str:
    """A statusDetails value AWS IoT accepts: 1-1024 characters, none of Unicode category C."""
    cleaned = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text).strip()
    value = cleaned or fallback
    # AWS counts UTF-16 code units (Java characters): a character beyond the BMP counts twice.
    units = 0
    for index, ch in enumerate(value):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > MAX_STATUS_DETAIL_LENGTH:
            return value[:index]
    return value


# AWS IoT Jobs' limits on a statusDetails entry (API reference, JobExecutionState / UpdateJobExecution):
# a key of 1-128 characters of [a-zA-Z0-9:_-]; a value of 1-1024 characters, none of Unicode category C.
MAX_STATUS_DETAIL_KEY_LENGTH: Final = 128
_STATUS_DETAIL_KEY_RE: Final = re.compile(r"[a-zA-Z0-9:_-]+")


def coerce_status_details(details: object) -> dict[str, str]:
    """A device's `statusDetails` as AWS IoT Jobs stores it: a map of strings to strings.

    AWS accepts JSON scalars as values and keeps them as strings (the seed's component sends
    `{"CertificateRotator": true}`; see docs/decisions.md for the evidence): true/false become "true"/
    "false", numbers their JSON spelling. null, objects and arrays are refused, as are keys and values
    outside AWS's limits. Raises ProtocolError saying which entry is wrong. Pure.
    """
    if not isinstance(details, dict):
        raise ProtocolError(
            f"statusDetails must be a JSON object of names to values, got {_json_kind(details)}"
        )
    coerced: dict[str, str] = {}
    for key, value in details.items():
        if (
            not isinstance(key, str)
            or len(key) > MAX_STATUS_DETAIL_KEY_LENGTH
            or not _STATUS_DETAIL_KEY_RE.fullmatch(key)
        ):
            shown = repr(key) if len(str(key)) <= 40 else f"{str(key)[:40]!r}... ({len(str(key))} characters)"
            raise ProtocolError(
                f"statusDetails key {shown} must be 1-{MAX_STATUS_DETAIL_KEY_LENGTH} of [a-zA-Z0-9:_-]"
            )
        coerced[key] = _status_detail_text(key, value)
    return coerced


def _status_detail_text(key: str, value: object) -> str:
    if isinstance(value, bool):  # before int: bool is an int in Python
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = json.dumps(value)  # the JSON spelling a Python device writes (finite: decode_json_object)
    else:
        raise ProtocolError(
            f"statusDetails value of {key!r} must be a string, number or boolean, got {_json_kind(value)}"
        )
    if not text:
        raise ProtocolError(
            f"statusDetails value of {key!r} is empty; AWS requires 1-{MAX_STATUS_DETAIL_LENGTH} characters"
        )
    # AWS counts Java characters (UTF-16 code units): a character beyond the BMP counts twice.
    length = len(text.encode("utf-16-le", "surrogatepass")) // 2
    if length > MAX_STATUS_DETAIL_LENGTH:
        raise ProtocolError(
            f"statusDetails value of {key!r} has {length} characters; at most {MAX_STATUS_DETAIL_LENGTH}"
        )
    for ch in text:
        if unicodedata.category(ch).startswith("C"):
            raise ProtocolError(
                f"statusDetails value of {key!r} contains the control or unassigned character {ch!r}"
            )
    return text


def _json_kind(value: object) -> str:
    """The JSON name of a decoded value's type, for messages a device's author reads."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


def status_update(
    status: JobExecutionStatus, detail: str = "", failure_reason: str | None = None
) -> dict[str, Any]:
    """A device's job execution update. statusDetails always carries STATUS_DETAILS_KEY."""
    details = {STATUS_DETAILS_KEY: _status_detail_value(detail, status.value)}
    if failure_reason is not None:
        details[FAILURE_REASON_KEY] = _status_detail_value(failure_reason, "unspecified")
    return {"status": status.value, "statusDetails": details}
