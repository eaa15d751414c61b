"""The benchmarks in bench/ still run end to end and report what docs/performance.md quotes: at a tiny
size, so the suite stays fast. Their figures are not asserted against targets here (see bench/)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.timeout(180)


def run(script: str, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=170, check=False
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout.splitlines()


def test_fleet_bench_rotates_and_verifies_every_device(tmp_path: Path) -> None:
    lines = run("fleet.py", "--devices", "4", "--floor-samples", "3", "--json", "--work-dir", str(tmp_path))
    result = json.loads(next(line for line in lines if line.startswith("{")))
    assert (result["devices"], result["succeeded"], result["verified"], result["problems"]) == (4, 4, 4, 0)
    assert result["floor_ms"] > 0 and result["cpu_per_rotation_ms"] > result["floor_ms"]
    assert 0 < result["p50_s"] <= result["p99_s"] <= result["end_to_end_p99_s"] + 1e-3
    assert result["engine_rss_peak_mb"] > result["engine_rss_idle_mb"] > 0
    final = re.fullmatch(r"rotations_per_s=([\d.]+) overhead_vs_floor=([\d.]+)", lines[-1])
    assert final is not None, lines[-1]
    assert float(final[1]) == pytest.approx(result["rotations_per_s"], abs=0.1)
    assert list(tmp_path.iterdir()) == [], "the work directory is cleaned up"


def test_api_calls_bench_counts_calls_per_rotation_and_per_unrelated_event() -> None:
    lines = run("api_calls.py")
    # an unrelated job costs one document read for its first terminal event, nothing after that
    assert "unrelated_job_event_calls=1/0/0" in lines
    assert lines[-1] == "api_calls_per_rotation=25"


def test_agent_footprint_bench_reports_and_finds_no_forbidden_import() -> None:
    lines = run("agent_footprint.py", "--runs", "2", "--idle", "0.2")
    assert any(line.startswith("standalone agent:") and line.endswith("forbidden: none") for line in lines)
    final = re.fullmatch(r"agent_rss_mb=([\d.]+) agent_ready_s=([\d.]+)", lines[-1])
    assert final is not None, lines[-1]
    assert float(final[1]) > 5 and float(final[2]) > 0
