"""bench/soak.py and bench/fault_matrix.py still run end to end and report what docs/reliability.md
quotes, at a tiny size: a few devices with random loss and delays, and the matrix's disabled-rule
cells (three engines of their own, so the runner, its JSON and its table are all exercised)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.timeout(240)


def run(script: str, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=230, check=False
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout.splitlines()


def test_soak_rotates_a_small_fleet_through_loss_and_delays_and_leaves_nothing_behind(tmp_path: Path) -> None:
    lines = run(
        "soak.py",
        *("--devices", "8", "--loss", "0.05", "--in-progress-timeout", "0.5", "--state-timeout", "4"),
        *("--resync", "3", "--settle", "45", "--seed", "3", "--json", "--work-dir", str(tmp_path)),
    )
    result = json.loads(next(line for line in lines if line.startswith("{")))
    assert sum(result["statuses"].values()) == 8
    assert result["dropped"] > 0, "the plan lost nothing: the soak proves nothing"
    for key in (
        "bricked",
        "orphan_certificates",
        "non_terminal",
        "wrong_notifications",
        "wrong_certificate_count",
    ):
        assert result[key] == 0, (key, result)
    assert re.fullmatch(r"bricked=0 orphan_certificates=0 non_terminal=0 .* wall_s=[\d.]+", lines[-1]), lines[
        -1
    ]
    assert list(tmp_path.iterdir()) == [], "the work directory is cleaned up"


def test_fault_matrix_runs_cells_and_writes_the_results(tmp_path: Path) -> None:
    out = tmp_path / "fault_matrix.json"
    lines = run(
        "fault_matrix.py",
        *("--stores", "file", "--faults", "RULE_DISABLED", "--out", str(out), "--work-dir", str(tmp_path)),
    )
    document = json.loads(out.read_text())
    assert document["totals"] | {"reconciled": 0} == {
        "cells": 3,
        "passed": 3,
        "bricked": 0,
        "orphan_certificates": 0,
        "non_terminal": 0,
        "not_fired": 0,
        "reconciled": 0,
    }
    outcomes = {c["step"]: (c["fault"], c["store"], c["status"], c["reconciled"]) for c in document["cells"]}
    assert outcomes == {
        4: ("rule disabled", "file", "FAILED", False),  # nothing issued
        8: ("rule disabled", "file", "FAILED", False),  # rolled back, new certificate deleted
        11: ("rule disabled", "file", "SUCCEEDED", True),  # both kept, reconcile retired the old one
    }
    assert any(n["fault"] == "rule disabled" and n["step"] == 5 for n in document["not_run"])
    row = next(line for line in lines if line.startswith("rule disabled"))
    assert row.split()[3:] == ["-", "-", "-", "F", "-", "-", "-", "F", "-", "-", "S+R"], row
    assert lines[-1].startswith("cells=3 passed=3 bricked=0 orphan_certificates=0 non_terminal=0")
