"""The fault matrix's fast subset (the full matrix: bench/fault_matrix.py): every protocol step with its
message lost, and a power cut at every crash point of the file key store during a real rotation, each
on one device of its own (agent processes, `certrotator local up --faults`), all checked against
DESIGN.md §4's invariants per cell (sim/matrix_run.py): terminal, on a working pair, exactly one
certificate (or two the table keeps, brought to one by reconcile), no orphan, notifications exactly
where the table says, and the fault did fire."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from certrotator.sim.matrix import fast_subset, power_cut_cells, totals
from certrotator.sim.matrix_run import Settings, run_batch

pytestmark = pytest.mark.timeout(240)

# What each lost message leads to (docs/reliability.md, "Fault matrix"); an invariant that fails is
# reported with the cell's name.
LOST_ENDS = {
    1: "SUCCEEDED",  # the idle agent asks again and takes the job
    2: "SUCCEEDED",  # the update timed out; asked again, the job is still QUEUED
    3: "FAILED",  # the engine took it, the device did not hear: it finds IN_PROGRESS without new credentials
    4: "FAILED",  # nothing issued
    5: "FAILED",  # issued, the device never got it: the new certificate is deleted
    6: "FAILED",  # the new pair unproven: rolled back, new certificate deleted
    7: "FAILED",
    8: "FAILED",
    9: "FAILED",  # committed, the reply lost: rolled back; both kept and notified, reconcile retires one
    10: "SUCCEEDED",  # the commit marker proves the new pair: SUCCEEDED sent again on the resync
    11: "SUCCEEDED",  # the terminal handler fails once and is tried again
}


def test_every_protocol_step_with_its_message_lost(tmp_path: Path) -> None:
    started = time.monotonic()
    results = run_batch(fast_subset(), tmp_path, Settings())
    print(f"\n{len(results)} cells in {time.monotonic() - started:.1f} s")
    for r in results:
        print(f"  {r.cell.name:34} {r.outcome[:80]}")
    problems = {r.cell.name: r.problems for r in results if r.problems}
    assert problems == {}
    assert {r.cell.step: r.status for r in results} == LOST_ENDS
    assert totals(results) | {"reconciled": 0} == {
        "cells": 11,
        "passed": 11,
        "bricked": 0,
        "orphan_certificates": 0,
        "non_terminal": 0,
        "not_fired": 0,
        "reconciled": 0,
    }
    assert [r.cell.step for r in results if r.reconciled] == [9]


def test_a_power_cut_at_every_crash_point_of_the_file_store_during_a_rotation(tmp_path: Path) -> None:
    cells = power_cut_cells("file")
    assert len(cells) >= 13 and {c.crash_point.split(".")[1] for c in cells if c.crash_point} == {
        "install",
        "rollback",
        "commit",
    }
    started = time.monotonic()
    results = run_batch(cells, tmp_path, Settings())
    print(f"\n{len(results)} power cuts in {time.monotonic() - started:.1f} s")
    for r in results:
        print(f"  {r.cell.crash_point:36} {r.outcome[:80]}")
    assert {r.cell.name: r.problems for r in results if r.problems} == {}
    # A cut in a rollback ends the job FAILED (the device had reported it); after the install, the
    # restarted agent goes on and succeeds.
    by_point = {r.cell.crash_point: r.status for r in results}
    assert all(s == "FAILED" for p, s in by_point.items() if p and ".rollback." in p)
    assert by_point["files.install.installed"] == "SUCCEEDED"
    assert all(s == "SUCCEEDED" for p, s in by_point.items() if p and ".commit." in p)
