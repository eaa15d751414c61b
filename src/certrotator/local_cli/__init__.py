"""`certrotator local ...` and `certrotator jobs ...`: run and administer the local IoT Core.

Read-only commands read the SQLite registry directly (safe beside a running engine: WAL). Commands
that change live state go through the running engine's admin endpoint, or straight to the database
when no engine runs (the engine catches up when it starts). One module per group of commands; importing
them registers their commands on the apps in `common`."""

from certrotator.local_cli import engine, jobs, registry  # noqa: F401  (registers the commands)
from certrotator.local_cli.common import jobs_app, local_app

__all__ = ["jobs_app", "local_app"]
