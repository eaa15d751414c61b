"""The few Python 3.11 names the package uses, also on Python 3.10 (Ubuntu 22.04's python3, the most common
Greengrass host).

Import them from here, never from `enum`/`datetime` directly: `ruff` and `mypy` target 3.10, so a direct
3.11-only import is caught. On 3.11+ these are the standard library's own objects. TOML parsing lives in
`certrotator.tomlcompat`, apart, so that importing this module stays as cheap as `enum` and `datetime`.
"""

from __future__ import annotations

import sys
from datetime import timezone
from enum import Enum
from typing import Final

__all__ = ["UTC", "StrEnum"]

# datetime.UTC (3.11) is this very object.
UTC: Final = timezone.utc

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:

    class StrEnum(str, Enum):
        """3.11's `enum.StrEnum` as far as this package relies on it: members are strings whose `str()` and
        `format()` (so f-strings) give the value, not `Class.MEMBER` as a plain `str, Enum` does on 3.10,
        and `auto()` gives the member's name in lower case."""

        def __str__(self) -> str:
            return str.__str__(self)

        def __format__(self, format_spec: str) -> str:
            return str.__format__(self, format_spec)

        @staticmethod
        def _generate_next_value_(name: str, start: int, count: int, last_values: list[str]) -> str:
            return name.lower()
