"""What the fleet commands (`reconcile`, `report`, `schedule`) share: the backend they work on, the local
IoT Core's data directory (the default) or AWS IoT (`--aws`), never both."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Final

import typer

from certrotator.console import fail

DEFAULT_DATA_DIR: Final = Path(".certrotator")

# None when not given, so that a command can refuse it beside --aws.
LocalDataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="The local IoT Core's data directory (default: .certrotator)."),
]


def local_data_dir(data_dir: Path | None, aws: bool) -> Path | None:
    """The data directory to work on, or None to work on AWS IoT; exit 2 when given both."""
    if not aws:
        return data_dir or DEFAULT_DATA_DIR
    if data_dir is not None:
        raise fail("give --aws or --data-dir, not both")
    return None
