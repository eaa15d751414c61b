"""Every command's error line (certrotator.console): run as a process with stderr a pipe, not a terminal,
an error is exactly one line, never wrapped at rich's 80-column default, and its brackets are text, not
rich markup (before the shared helper, `certrotator agent` dropped `[device]`-like parts of a message
and wrapped long ones mid-word)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _certrotator(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TERM")}
    return subprocess.run(
        [sys.executable, "-m", "certrotator.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def _missing_file(tmp_path: Path, name: str) -> Path:
    """A path well over 80 characters with rich markup in it ([bold], [device]) that does not exist."""
    folder = tmp_path / "[bold]not bold[/bold]" / ("a-rather-long-directory-name-" * 3) / "[device]"
    assert len(str(folder / name)) > 120
    return folder / name


@pytest.mark.parametrize(
    ("args", "name", "expected"),
    [
        # the device agent's command: invalid configuration
        (("agent", "--config"), "device.toml", "error: invalid configuration: cannot read {path}: "),
        # the top-level command
        (("cert-id",), "device.pem.crt", "error: {path}: "),
    ],
    ids=["agent", "cert-id"],
)
def test_an_error_is_one_unwrapped_line_with_its_brackets_as_text(
    tmp_path: Path, args: tuple[str, ...], name: str, expected: str
) -> None:
    path = _missing_file(tmp_path, name)
    result = _certrotator(*args, str(path))
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected.format(path=path)), lines[0]
    assert "No such file or directory" in lines[0]
    assert "\x1b[" not in result.stderr  # no colour codes where stderr is not a terminal
