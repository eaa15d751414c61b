"""End-to-end harness: the local IoT Core on a thread and a simulated fleet of real agents, and the
rotate-then-check-every-invariant step most tests share."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from certrotator.local.engine import EngineConfig
from certrotator.local.handles.thread import EngineThread
from certrotator.sim.fleet import SimulatedFleet
from certrotator.sim.report import JobReport

Fleet = SimulatedFleet[EngineThread]


@contextmanager
def running_fleet(tmp_path: Path, **engine_options: Any) -> Iterator[Fleet]:
    """An engine (EngineConfig's options) on a thread and a fleet of four reactor threads; both are
    stopped, and every agent (thread or process) with them, when the block ends."""
    config = EngineConfig(tmp_path / "engine", port=0, **engine_options)
    with EngineThread(config) as engine, SimulatedFleet(engine, tmp_path, threads=4) as fleet:
        yield fleet


def rotate_verified(fleet: Fleet, job_id: str, group: str = "fleet", timeout_s: float = 60.0) -> JobReport:
    """Rotate the group (rollout uncapped), check DESIGN.md §4's invariants on every device, and fail
    the test with the report's problems if any device did not rotate cleanly."""
    report = fleet.run_job(job_id, group, timeout_s=timeout_s, unlimited_rollout=True)
    fleet.verify(report)
    assert report.problems == [], report.problems
    assert report.verified == report.devices > 0
    return report


def create_job_offline(data_dir: Path, job_id: str, *options: str) -> None:
    """`certrotator jobs create --group fleet` as an operator runs it with no engine up: the shipped CLI
    writes the job to the data directory, and says the engine will roll it out when it starts."""
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "certrotator.cli",
            "jobs",
            "create",
            "--group",
            "fleet",
            "--job-id",
            job_id,
            *options,
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    assert "no engine running" in created.stdout
