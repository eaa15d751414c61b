"""Crash-safe file operations, the one implementation every credential, CA and journal write uses.

A write goes to a temporary file in the same directory, is fsync'ed, renamed over the target and
the directory fsync'ed: after a power cut the path holds either the old or the new content.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows; NTFS journals metadata
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`; the file never exists with looser permissions than `mode`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_move(source: Path, target: Path) -> None:
    os.replace(source, target)
    fsync_dir(target.parent)


def remove(path: Path) -> None:
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)
