"""`tomllib` (Python 3.11+) or its backport `tomli` on Python 3.10 (a dependency there only).

Apart from `certrotator.compat` because parsing TOML costs ~4 ms of imports that only the modules reading TOML
files should pay (the agent's start-up and the Lambda's cold start do not).
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

__all__ = ["tomllib"]
