"""The fleet commands' shared choice of backend (certrotator.ops.options): the local data directory by
default, AWS IoT with --aws, never both."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from certrotator.cli import app
from certrotator.ops.options import DEFAULT_DATA_DIR, local_data_dir


@pytest.mark.parametrize(
    "command", [["reconcile"], ["report"], ["schedule", "--renew-before", "30d"]], ids=lambda c: c[0]
)
def test_aws_and_a_data_dir_together_are_refused_before_any_work(command: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [*command, "--aws", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "error: give --aws or --data-dir, not both" in result.output


def test_the_backend_a_command_works_on() -> None:
    assert local_data_dir(None, aws=False) == DEFAULT_DATA_DIR
    assert local_data_dir(Path("elsewhere"), aws=False) == Path("elsewhere")
    assert local_data_dir(None, aws=True) is None
