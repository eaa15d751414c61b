"""Crash-safe file operations, the one implementation every credential, CA and journal write uses.

A write goes to a temporary file in the same directory, is fsync'ed, renamed over the target and
the directory fsync'ed: after a power cut the path holds either the old or the new content. Several
files changed together can share the directory fsync (`stage` each, then `publish` them all).
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows; NTFS journals metadata
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(paths: Iterable[Path]) -> None:
    """fsync the directory of each path, once per directory."""
    for directory in dict.fromkeys(path.parent for path in paths):
        fsync_dir(directory)


def stage(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """`data` in a durable temporary file beside `path` (never looser than `mode`), not yet in place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def publish(staged: Path, path: Path) -> None:
    """Rename a staged file over `path`; durable once the caller has fsync'ed the directory."""
    try:
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def remove_stale_temps(path: Path) -> None:
    """Delete temporary files `stage` left beside `path` when the process died before `publish`."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`; the file never exists with looser permissions than `mode`."""
    publish(stage(path, data, mode), path)
    fsync_dir(path.parent)


def atomic_move(source: Path, target: Path) -> None:
    os.replace(source, target)
    fsync_dir(target.parent)


def second_name(source: Path, target: Path) -> None:
    """Give `source`'s content the name `target` as well, durable once the caller has fsync'ed the
    directory: a hard link (nothing copied, nothing to flush but the directory), or a staged copy on
    file systems without hard links (FAT, some flash file systems). `target` must not exist."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # EPERM / ENOTSUP / EXDEV: no hard links here
        publish(stage(target, source.read_bytes(), os.stat(source).st_mode & 0o777), target)


def remove(path: Path) -> None:
    remove_all([path])


def remove_all(paths: Sequence[Path]) -> None:
    """Delete the paths that exist, then fsync their directories once."""
    gone = [path for path in paths if path.exists()]
    for path in gone:
        path.unlink()
    fsync_dirs(gone)
