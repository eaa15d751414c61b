"""How every certrotator command reports an error: one line on stderr, `error: <message>`, exit status 2
unless told otherwise.

The line is printed with soft wrap: where stderr is not a terminal (a pipe, a log, a test, a service
manager's journal) it is never broken mid-message, and a terminal wraps it itself. The message is escaped:
brackets in it (a path, a PEM error, `pip install 'certrotator[device]'`) are text, not rich markup.
Only rich and typer load with this module, so the device agent's command may use it.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

# Writes to whatever sys.stderr is when it prints (rich resolves it then), so test runners see it.
err = Console(stderr=True, soft_wrap=True)


def print_error(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(message)}")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `message` as the command's error line and return the exit to raise: `raise fail(...)`."""
    print_error(message)
    return typer.Exit(code)
