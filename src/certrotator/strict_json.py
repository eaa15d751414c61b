"""JSON as RFC 8259 and AWS IoT take it, for payloads from devices: no NaN or Infinity, only finite
numbers, integers of bounded length. `protocol.decode_json_object` turns every refusal into a
ProtocolError naming the message type.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

# The longest integer a payload may spell. CPython's own limit for int(str) (3.11, and 3.10.7+) is 4300
# digits and raises a bare ValueError; enforcing it here gives every supported Python the same answer
# (a ProtocolError), including 3.10 releases without the limit, where a 100,000-digit number is slow.
MAX_JSON_INTEGER_DIGITS: Final = 4300


class UnacceptableNumber(ValueError):
    """A number (or NaN / Infinity) that JSON or AWS IoT does not take; protocol.decode_json_object names
    the message type."""


def _parse_json_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_JSON_INTEGER_DIGITS:
        raise UnacceptableNumber(f"an integer of {digits} digits (at most {MAX_JSON_INTEGER_DIGITS})")
    return int(text)


def _parse_json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999: valid JSON, but no finite number; echoing it breaks JSON
        raise UnacceptableNumber(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is out of range")
    return value


def _reject_json_constant(name: str) -> Any:
    # Python's json module accepts NaN and Infinity, which are not JSON (RFC 8259); AWS IoT refuses them.
    raise UnacceptableNumber(f"{name} is not a JSON value")


# One decoder for every payload (json.loads with hooks would build a new one per call).
_DECODER: Final = json.JSONDecoder(
    parse_int=_parse_json_int, parse_float=_parse_json_float, parse_constant=_reject_json_constant
)


def loads(text: str) -> Any:
    """Decode one JSON document as json.loads does, but raise UnacceptableNumber for a number outside
    the limits above (and json's ValueErrors for the rest)."""
    return _DECODER.decode(text)
