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

from certrotator.sim.faults import faketime_library
from certrotator.sim.matrix import Cell, Fault, fast_subset, power_cut_cells, thing_name, totals
from certrotator.sim.matrix_run import GROUP, Settings, run_batch

pytestmark = pytest.mark.timeout(240)

# What each lost message leads to (docs/reliability.md, "Fault matrix"); an invariant that fails is
# reported with the cell's name.
LOST_ENDS = {
    1: "SUCCEEDED",  # the idle agent asks again and takes the job
    2: "SUCCEEDED",  # the update timed out; asked again, the job is still QUEUED
    3: "SUCCEEDED",  # the engine took it, the device did not hear: it takes the job once more, accepted
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


def test_the_other_faults_of_a_plan_end_on_a_working_pair(tmp_path: Path) -> None:
    """What the matrix does not cover, one device each: disconnected at a step, its new certificate
    deactivated as it is sent, every message delayed, its clock an hour ahead and two minutes behind
    (with libfaketime: the AWS CRT's TLS checks see the skewed clock too)."""
    skew = faketime_library() is not None
    cells = [Cell(Fault.PLANNED, "file") for _ in range(5 if skew else 3)]
    plan: dict[str, object] = {
        "seed": 5,
        "at_step": [
            {"step": 3, "action": "disconnect_device", "things": [thing_name(GROUP, 0)]},
            {
                "step": 5,
                "action": "deactivate_certificate",
                "certificate": "new",
                "things": [thing_name(GROUP, 1)],
            },
        ],
        "message": [
            {"topic": t, "action": "delay", "delay_s": [0.2, 1.0], "things": [thing_name(GROUP, 2)]}
            for t in ("$aws/things/#", "awslabs/things/#")
        ],
    }
    if skew:
        # Not more than 5 minutes behind: the local CA backdates the broker's certificate by that much,
        # and it was made a moment ago (AWS IoT's server certificates are old).
        plan["device"] = [
            {"things": [thing_name(GROUP, 3)], "clock_skew_s": 3600},
            {"things": [thing_name(GROUP, 4)], "clock_skew_s": -120},
        ]
    results = run_batch(cells, tmp_path, Settings(), plan)
    for r in results:
        print(f"  {r.thing}: {r.outcome[:90]}")
    assert {r.thing: r.problems for r in results if r.problems} == {}
    statuses = [r.status for r in results]
    assert statuses[1] == "FAILED"  # the new pair cannot connect: rolled back, new certificate deleted
    assert statuses[2] == "SUCCEEDED"  # late, not lost
    if skew:
        # The key stores refuse a certificate outside its validity, but neither skew puts it there: an hour
        # ahead is past its notBefore, two minutes behind is within the 60-minute notBefore allowance.
        assert statuses[3:] == ["SUCCEEDED", "SUCCEEDED"]


def test_a_slow_issuer_loses_the_race_with_the_device_and_nothing_is_left_behind(tmp_path: Path) -> None:
    """The issuer takes longer than the device waits (DESIGN's create/terminal race, end to end): the
    device fails the job, and the certificate issued after that is deleted."""
    results = run_batch([Cell(Fault.PLANNED, "file")], tmp_path, Settings(), {"slow": {"issuer_s": 6.0}})
    (result,) = results
    assert result.problems == [], result.problems
    assert result.status == "FAILED" and "new certificate deleted" in result.outcome, result.outcome
