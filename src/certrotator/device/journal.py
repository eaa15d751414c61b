"""The rotation journal and the atomic file writes every credential change goes through.

A journal is a small JSON file naming the job and the phase a credential change is in. It is written
before the step it describes (temp file, fsync, rename, fsync of the directory), so after a power cut
`recover()` of a key store knows exactly which step was interrupted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certrotator.fsutil import atomic_move, atomic_write, fsync_dir, remove

__all__ = [
    "CRASH_ENV",
    "Entry",
    "Journal",
    "atomic_move",
    "atomic_write",
    "crash_point",
    "fsync_dir",
    "remove",
]

# Crash points for the power-loss tests: CERTROTATOR_CRASH_AT=<name> kills the process right there.
CRASH_ENV = "CERTROTATOR_CRASH_AT"
crash_hook: Callable[[str], None] | None = None


def crash_point(name: str) -> None:
    """Die here (SIGKILL-like: no cleanup, no flush) if the power-loss tests ask for it."""
    if crash_hook is not None:
        crash_hook(name)
    if os.environ.get(CRASH_ENV) == name:
        os._exit(86)


@dataclass(frozen=True, slots=True)
class Entry:
    job_id: str
    phase: str
    extra: dict[str, Any]


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> Entry | None:
        try:
            data = json.loads(self.path.read_bytes())
            return Entry(str(data["jobId"]), str(data["phase"]), dict(data.get("extra", {})))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            # Only our atomic writes produce this file, so garbage means tampering or disk damage.
            raise RuntimeError(
                f"rotation journal {self.path} is unreadable ({exc}); inspect it by hand"
            ) from None

    def write(self, job_id: str, phase: str, **extra: Any) -> None:
        body = json.dumps({"jobId": job_id, "phase": phase, "extra": extra}).encode()
        atomic_write(self.path, body, 0o600)

    def clear(self) -> None:
        remove(self.path)
