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

# Crash points for the power-loss tests: CERTROTATOR_CRASH_AT=<name> kills the process right there.
CRASH_ENV = "CERTROTATOR_CRASH_AT"
crash_hook: Callable[[str], None] | None = None


def crash_point(name: str) -> None:
    """Die here (SIGKILL-like: no cleanup, no flush) if the power-loss tests ask for it."""
    if crash_hook is not None:
        crash_hook(name)
    if os.environ.get(CRASH_ENV) == name:
        os._exit(86)


def fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows; NTFS journals metadata
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_move(source: Path, target: Path) -> None:
    os.replace(source, target)
    fsync_dir(target.parent)


def remove(path: Path) -> None:
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


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
