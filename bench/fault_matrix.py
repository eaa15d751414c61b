"""The fault matrix: every protocol step × {message lost, device killed before it, device killed after
it, engine restarted at it, rule disabled}, for the file and the PKCS#11 (SoftHSM2) key store, plus a
power cut at every crash point of both key stores during a real rotation (docs/reliability.md).

Each cell is one device (its own agent process, and for PKCS#11 its own token directory) rotated by
`certrotator local up --faults plan.toml` with the cell's fault; the invariants are checked per cell
(sim/matrix_run.py). Batches of cells that only touch their own device share an engine; engine
restarts and disabled rules get one each. Batches run as separate processes, `--workers` at a time.

Run:
    .venv/bin/python bench/fault_matrix.py                      # the full matrix -> fault_matrix.json
    .venv/bin/python bench/fault_matrix.py --fast               # what `make test` runs
    .venv/bin/python bench/fault_matrix.py --stores file --faults LOST,POWER_CUT
    .venv/bin/python bench/fault_matrix.py --no-resync          # agents as shipped (no idle resync)

Writes per cell: fault, step (or crash point), store, outcome, and totals `cells`, `bricked`,
`orphan_certificates`, `non_terminal`; prints the matrix. Exit 0 only if every cell held.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from certrotator.local.faults import Step
from certrotator.sim.matrix import (
    NOT_RUN,
    STORES,
    Cell,
    Fault,
    batches,
    fast_subset,
    full_matrix,
)
from certrotator.sim.softhsm import softhsm_available

SHORT = {"SUCCEEDED": "S", "FAILED": "F", "TIMED_OUT": "T", "": "?"}


def run_batch(index: int, cells: list[Cell], work: Path, extra: list[str]) -> list[dict[str, Any]]:
    """One batch in its own process, tried a second time if its process breaks (e.g. the engine did not
    start: its log is kept in the problem); a batch that breaks twice counts against each of its cells."""
    results = run_batch_once(index, cells, work / "try-1", extra)
    if all(r["thing"] for r in results):
        return results
    again = run_batch_once(index, cells, work / "try-2", extra)
    first = results[0]["problems"][0]
    return [{**r, "attempts": 2, "first_attempt": first[:1500]} for r in again]


def run_batch_once(index: int, cells: list[Cell], work: Path, extra: list[str]) -> list[dict[str, Any]]:
    directory = work / f"batch-{index:03d}"
    directory.mkdir(parents=True)
    spec, out = directory / "cells.json", directory / "results.json"
    spec.write_text(json.dumps([c.to_json() for c in cells]))
    command = [sys.executable, "-m", "certrotator.sim.matrix_run", "--cells", str(spec)]
    command += ["--work", str(directory / "run"), "--out", str(out), *extra]
    with (directory / "batch.log").open("wb") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=900, check=False)
    if done.returncode == 0 and out.exists():
        results: list[dict[str, Any]] = json.loads(out.read_text())
        return results
    tail = (directory / "batch.log").read_text(errors="replace")[-800:]
    for engine_log in directory.rglob("*-engine.log"):
        tail += f"\n{engine_log.name}: " + engine_log.read_text(errors="replace")[-1200:]
    return [
        {
            "fault": c.fault.value,
            "step": c.step,
            "crash_point": c.crash_point,
            "store": c.store,
            "thing": "",
            "status": "",
            "outcome": f"batch failed (exit {done.returncode})",
            "fired": False,
            "notifications": 0,
            "reconciled": False,
            "bricked": True,
            "orphan_certificates": 0,
            "non_terminal": True,
            "problems": [f"batch {index} failed: {tail}"],
            "seconds": 0.0,
        }
        for c in cells
    ]


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, int]:
    return {
        "cells": len(results),
        "passed": sum(not r["problems"] for r in results),
        "bricked": sum(bool(r["bricked"]) for r in results),
        "orphan_certificates": sum(int(r["orphan_certificates"]) for r in results),
        "non_terminal": sum(bool(r["non_terminal"]) for r in results),
        "not_fired": sum(not r["fired"] for r in results),
        "reconciled": sum(bool(r["reconciled"]) for r in results),
    }


def mark(result: dict[str, Any]) -> str:
    text = SHORT.get(result["status"], result["status"][:1])
    if result["reconciled"]:
        text += "+R"
    return text if not result["problems"] else f"{text}!"


def print_tables(results: Sequence[dict[str, Any]]) -> None:
    steps = [int(s) for s in Step]
    by_key = {(r["fault"], r["store"], r["step"]): r for r in results if r["crash_point"] is None}
    rows = dict.fromkeys((r["fault"], r["store"]) for r in results if r["crash_point"] is None)
    if rows:
        print(
            "\nS = SUCCEEDED, F = FAILED, T = TIMED_OUT, +R = two certificates kept by the table, reconcile"
        )
        print("brought them to one; ! = an invariant failed; - = not run (see not_run in the JSON)\n")
        print(f"{'fault':22} {'store':7}" + "".join(f"{s:>6}" for s in steps))
        for fault, store in rows:
            cells = []
            for step in steps:
                result = by_key.get((fault, store, step))
                not_run = (Fault(fault), Step(step)) in NOT_RUN
                cells.append("-" if result is None and not_run else mark(result) if result else "")
            print(f"{fault:22} {store:7}" + "".join(f"{c:>6}" for c in cells))
    cuts = [r for r in results if r["crash_point"] is not None]
    if cuts:
        print(f"\n{'power cut at':40} {'store':7} outcome")
        for r in cuts:
            problems = f"  PROBLEMS: {r['problems']}" if r["problems"] else ""
            print(f"{r['crash_point']:40} {r['store']:7} {mark(r):5} {r['outcome'][:70]}{problems}")
    failed = [r for r in results if r["problems"] and r["crash_point"] is None]
    for r in failed:
        print(f"  PROBLEMS {r['fault']} @ step {r['step']} [{r['store']}] {r['thing']}: {r['problems']}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stores", default=",".join(STORES), help="file,pkcs11 (default: both)")
    parser.add_argument("--faults", help="only these faults, e.g. LOST,POWER_CUT (Fault names)")
    parser.add_argument(
        "--fast", action="store_true", help="the make-test subset: every step, message lost, file"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="batches at a time (default 2: the cores here)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="cells sharing one engine at most")
    parser.add_argument(
        "--no-resync", action="store_true", help="agents as shipped: no idle re-synchronisation"
    )
    parser.add_argument("--out", default="fault_matrix.json", help="where the results go")
    parser.add_argument("--work-dir", help="where engines and devices live (default: a temp directory)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    stores = [s for s in args.stores.split(",") if s]
    if "pkcs11" in stores and softhsm_available() is not None:
        print(f"PKCS#11 store skipped: {softhsm_available()}")
        stores.remove("pkcs11")
    cells = fast_subset() if args.fast else full_matrix(stores)
    if args.faults:
        wanted = {Fault[name] for name in args.faults.split(",")}
        cells = [c for c in cells if c.fault in wanted]
    groups = batches(cells, args.batch_size)
    extra = ["--no-resync"] if args.no_resync else []
    print(f"{len(cells)} cells in {len(groups)} batches, {args.workers} at a time; {os.cpu_count()} CPUs")
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="certrotator-faults-", dir=args.work_dir) as tmp,
        ThreadPoolExecutor(args.workers) as pool,
    ):
        futures = [pool.submit(run_batch, i, group, Path(tmp), extra) for i, group in enumerate(groups)]
        results = [r for f in futures for r in f.result()]
    wall = time.monotonic() - started
    totals = summarise(results)
    document = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "wall_s": round(wall, 1),
        "totals": totals,
        "cells_retried": sum(1 for r in results if r.get("attempts", 1) > 1),
        "cells": results,
        "not_run": [{"fault": f.value, "step": int(s), "why": why} for (f, s), why in NOT_RUN.items()],
    }
    Path(args.out).write_text(json.dumps(document, indent=1))
    print_tables(results)
    print(f"\nwall time {wall:.0f} s; results in {args.out}")
    retried = document["cells_retried"]
    if retried:
        print(f"{retried} cells were run a second time: their batch's process broke (see first_attempt)")
    print(" ".join(f"{k}={v}" for k, v in totals.items()))
    held = totals["passed"] == totals["cells"] and not (
        totals["bricked"] or totals["orphan_certificates"] or totals["non_terminal"]
    )
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
