"""Hypothesis settings for the property-based suite (hostile input, issue 13).

`make test` runs the `certrotator` profile: a bounded number of examples per property, derandomized
(the same examples on every run and machine, so CI is reproducible), no example database on disk and
no per-example deadline (a loaded CI machine must not turn slowness into a failure). The `deep` profile
searches far more examples and is random, for a manual hunt:

    HYPOTHESIS_PROFILE=deep .venv/bin/pytest tests/property -p no:cacheprovider
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# The suite-wide autouse fixture (tests/conftest.py: no network) is function-scoped; it only sets
# environment variables, which every example may share.
SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]

settings.register_profile(
    "certrotator",
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=SUPPRESSED,
)
settings.register_profile(
    "deep",
    max_examples=5_000,
    derandomize=False,
    database=None,
    deadline=None,
    suppress_health_check=SUPPRESSED,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "certrotator"))
