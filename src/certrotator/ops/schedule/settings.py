"""The renewal policy's settings (one trigger, jitter, back-off, job size) and the text forms operators
write them in: durations ("30d"), and the `--schedule` spec that `local up`, the CDK context and
`Settings.describe` share."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from certrotator.compat import UTC

MINUTE: Final = 60.0
HOUR: Final = 3600.0
DAY: Final = 86400.0

DEFAULT_JITTER_FRACTION: Final = 0.10  # of the renewal window
MAX_DEFAULT_JITTER_S: Final = 7 * DAY
DEFAULT_BACKOFF_BASE_S: Final = HOUR  # cert-manager's first retry
DEFAULT_BACKOFF_CAP_S: Final = 32 * HOUR  # cert-manager's longest
# A job per at most this many things: a job's failures (and its abort threshold) stay about few devices,
# and `describe-job` lists them; the rollout rate limits how fast each job runs.
DEFAULT_MAX_PER_JOB: Final = 100


_DURATION_RE: Final = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([wdhms])\s*$")
_UNITS: Final = {"w": 7 * DAY, "d": DAY, "h": HOUR, "m": MINUTE, "s": 1.0}


def parse_duration(text: str) -> float:
    """ "30d", "12h", "90m", "45s", "2w" -> seconds; ValueError naming the accepted form."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: a number and one unit of w, d, h, m, s (e.g. 30d)")
    return float(match[1]) * _UNITS[match[2]]


def format_duration(seconds: float) -> str:
    """Seconds as the largest unit that keeps one decimal meaningful: "29.5 d", "3.0 h", "45 s"."""
    sign, value = ("-" if seconds < 0 else ""), abs(seconds)
    for unit, size in (("d", DAY), ("h", HOUR), ("min", MINUTE)):
        if value >= size:
            return f"{sign}{value / size:.1f} {unit}"
    return f"{sign}{value:.0f} s"


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True, slots=True)
class Settings:
    """Exactly one trigger: `renew_before_s` (seconds before notAfter) or `renew_at_fraction` (of the
    lifetime notBefore..notAfter)."""

    renew_before_s: float | None = None
    renew_at_fraction: float | None = None
    jitter_s: float | None = None  # None: DEFAULT_JITTER_FRACTION of the window, at most 7 days
    backoff_base_s: float = DEFAULT_BACKOFF_BASE_S
    backoff_cap_s: float = DEFAULT_BACKOFF_CAP_S
    max_per_job: int = DEFAULT_MAX_PER_JOB
    group: str | None = None

    def __post_init__(self) -> None:
        if (self.renew_before_s is None) == (self.renew_at_fraction is None):
            raise ValueError("give exactly one of renew-before and renew-at-fraction")
        if self.renew_before_s is not None and not (
            math.isfinite(self.renew_before_s) and self.renew_before_s > 0
        ):
            raise ValueError(f"renew-before must be a positive duration, not {self.renew_before_s:g} s")
        if self.renew_at_fraction is not None and not 0 < self.renew_at_fraction < 1:
            raise ValueError(
                f"renew-at-fraction must be above 0 and below 1 (of the lifetime), not {self.renew_at_fraction:g}"
            )
        if self.jitter_s is not None and not (math.isfinite(self.jitter_s) and self.jitter_s >= 0):
            raise ValueError(f"jitter must be a duration of 0 or more, not {self.jitter_s:g} s")
        if not (0 < self.backoff_base_s <= self.backoff_cap_s and math.isfinite(self.backoff_cap_s)):
            raise ValueError("back-off: the first wait must be positive and at most the cap")
        if self.max_per_job < 1:
            raise ValueError(f"max-per-job must be at least 1, not {self.max_per_job}")

    def describe(self) -> str:
        """The settings in the `--schedule` spec form (`parse_spec` reads it back)."""
        if self.renew_before_s is not None:
            parts = [f"renew-before={_spec_duration(self.renew_before_s)}"]
        else:
            parts = [f"renew-at-fraction={self.renew_at_fraction:g}"]
        if self.group:
            parts.append(f"group={self.group}")
        if self.max_per_job != DEFAULT_MAX_PER_JOB:
            parts.append(f"max-per-job={self.max_per_job}")
        if self.jitter_s is not None:
            parts.append(f"jitter={_spec_duration(self.jitter_s)}")
        return ",".join(parts)

    def trigger(self) -> str:
        if self.renew_before_s is not None:
            return f"renew-before {format_duration(self.renew_before_s)}"
        return f"renew at {self.renew_at_fraction:g} of the lifetime"


def _spec_duration(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True)
class Spec:
    settings: Settings
    every_s: float | None = None  # how often to run (local up --schedule); None where not allowed


_SPEC_KEYS: Final = ("renew-before", "renew-at-fraction", "group", "max-per-job", "jitter", "every")


def parse_spec(text: str, *, allow_every: bool = False, default_every_s: float = HOUR) -> Spec:
    """ "renew-before=30d[,group=G][,max-per-job=N][,jitter=2d][,every=1h]" (or renew-at-fraction=0.66)
    -> Spec; ValueError with one line saying what is wrong. `every` only where `allow_every`."""
    values: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _SPEC_KEYS or (key == "every" and not allow_every):
            keys = [k for k in _SPEC_KEYS if allow_every or k != "every"]
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(keys)}")
        if key in values:
            raise ValueError(f"{key} is given twice")
        values[key] = value.strip()
    try:
        fraction = values.get("renew-at-fraction")
        settings = Settings(
            renew_before_s=parse_duration(values["renew-before"]) if "renew-before" in values else None,
            renew_at_fraction=float(fraction) if fraction is not None else None,
            jitter_s=parse_duration(values["jitter"]) if "jitter" in values else None,
            max_per_job=int(values.get("max-per-job", DEFAULT_MAX_PER_JOB)),
            group=values.get("group") or None,
        )
    except ValueError as exc:
        raise ValueError(f"schedule {text!r}: {exc}") from None
    every = parse_duration(values["every"]) if "every" in values else None
    if every is not None and every <= 0:
        raise ValueError(f"schedule {text!r}: every must be positive")
    return Spec(settings, every if every is not None else (default_every_s if allow_every else None))
