"""The fault matrix: every protocol step (DESIGN.md §2) × a fault, per key store, and every key-store
crash point hit during a real rotation (docs/reliability.md, "Fault matrix").

This module is the pure part: which cells there are (and which are not run, with the reason), the
fault plan of a batch of cells, and how cells are batched. `sim.matrix_run` runs a batch with real
agent processes against `certrotator local up --faults` and checks the invariants of each cell.

Cells that only touch their own device (message lost, device killed, power cut) share one engine, one
device each, in one rotation job; engine restarts and disabled rules touch everything, so each of those
has an engine of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from certrotator.local.faults import Step

STORES = ("file", "pkcs11")
_CRASH_POINT = re.compile(r'crash_point\("([a-z0-9_.]+)"\)')
_KEYSTORE_SOURCES = {"file": "device/keystores/files.py", "pkcs11": "device/keystores/pkcs11/*.py"}


class Fault(Enum):
    LOST = "message lost"
    KILLED_BEFORE = "device killed before"
    KILLED_AFTER = "device killed after"
    ENGINE_RESTART = "engine restarted"
    RULE_DISABLED = "rule disabled"
    POWER_CUT = "power cut"
    PLANNED = "as planned"  # whatever a hand-written plan does to the device (run_batch's `plan`)

    @property
    def shares_an_engine(self) -> bool:
        """Does the fault touch only its own device (so cells can share an engine and a job)?"""
        return self not in (Fault.ENGINE_RESTART, Fault.RULE_DISABLED)


# The rule that handles a step, where there is one (create, commit, terminal).
STEP_RULES = {Step.CREATE: "create", Step.COMMIT: "commit", Step.TERMINAL: "terminal"}

# Cells of step × fault that are not run, and why.
NOT_RUN: dict[tuple[Fault, Step], str] = {
    **{
        (Fault.RULE_DISABLED, s): "a Jobs API message, not a rule's: AWS IoT has no switch for it"
        for s in (Step.NOTIFY_NEXT, Step.TAKE_JOB, Step.TAKEN, Step.GET_WITH_NEW_PAIR, Step.GOT_IN_PROGRESS)
    },
    (Fault.RULE_DISABLED, Step.SUCCEEDED): "a Jobs API message, not a rule's: AWS IoT has no switch for it",
    (Fault.RULE_DISABLED, Step.CREATED): "the create rule's own reply: the rule disabled is the cell at 4",
    (Fault.RULE_DISABLED, Step.COMMITTED): "the commit rule's own reply: the rule disabled is the cell at 8",
}


@dataclass(frozen=True, slots=True)
class Cell:
    fault: Fault
    store: str  # "file" | "pkcs11"
    step: int | None = None  # a protocol step (None for a power cut)
    crash_point: str | None = None  # a power cut's key-store crash point

    @property
    def name(self) -> str:
        where = self.crash_point if self.crash_point else f"step {self.step}"
        return f"{self.fault.value} @ {where} [{self.store}]"

    @property
    def rollback(self) -> bool:
        """A power cut in a rollback: the rotation must be made to roll back first (commit lost)."""
        return self.crash_point is not None and ".rollback." in self.crash_point

    def to_json(self) -> dict[str, Any]:
        return {
            "fault": self.fault.name,
            "store": self.store,
            "step": self.step,
            "crash_point": self.crash_point,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cell:
        return cls(Fault[data["fault"]], data["store"], data.get("step"), data.get("crash_point"))


def crash_points(store: str) -> list[str]:
    """Every crash point of a key store, read from its source: a new one is in the matrix at once."""
    root = Path(__file__).resolve().parents[1]
    points: list[str] = []
    for source in sorted(root.glob(_KEYSTORE_SOURCES[store])):
        points += _CRASH_POINT.findall(source.read_text())
    return list(dict.fromkeys(points))


def step_cells(store: str, faults: Iterable[Fault], steps: Iterable[int] = tuple(Step)) -> list[Cell]:
    cells = []
    for fault in faults:
        for step in steps:
            if (fault, Step(step)) in NOT_RUN:
                continue
            cells.append(Cell(fault, store, int(step)))
    return cells


def power_cut_cells(store: str) -> list[Cell]:
    return [Cell(Fault.POWER_CUT, store, crash_point=p) for p in crash_points(store)]


def full_matrix(stores: Sequence[str] = STORES) -> list[Cell]:
    step_faults = [f for f in Fault if f not in (Fault.POWER_CUT, Fault.PLANNED)]
    return [c for s in stores for c in (*step_cells(s, step_faults), *power_cut_cells(s))]


def fast_subset() -> list[Cell]:
    """What `make test` runs: every step × the cheapest fault (a lost message), file store."""
    return step_cells("file", [Fault.LOST])


def batches(cells: Sequence[Cell], size: int = 16) -> list[list[Cell]]:
    """Cells that share an engine, per store, at most `size` a batch; the others one a batch."""
    out: list[list[Cell]] = []
    for store in dict.fromkeys(c.store for c in cells):
        shared = [c for c in cells if c.store == store and c.fault.shares_an_engine]
        out += [shared[i : i + size] for i in range(0, len(shared), size)]
        out += [[c] for c in cells if c.store == store and not c.fault.shares_an_engine]
    return out


# ---------------------------------------------------------------------------------------- the plan


def thing_name(group: str, index: int) -> str:
    """The name SimulatedFleet.provision gives the index-th device of a group."""
    return f"{group}-{index:04d}"


def plan_for(cells: Sequence[Cell], group: str, seed: int = 0) -> dict[str, Any]:
    """The fault plan (as its TOML document) of a batch: cell i acts on thing_name(group, i)."""
    messages: list[dict[str, Any]] = []
    at_step: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    disabled: list[str] = []
    for i, cell in enumerate(cells):
        things = [thing_name(group, i)]
        if cell.fault is Fault.LOST:
            messages.append({"step": cell.step, "action": "drop", "nth": 1, "things": things})
        elif cell.fault in (Fault.KILLED_BEFORE, Fault.KILLED_AFTER):
            when = "before" if cell.fault is Fault.KILLED_BEFORE else "after"
            at_step.append({"step": cell.step, "action": "kill_device", "when": when, "things": things})
        elif cell.fault is Fault.ENGINE_RESTART:
            at_step.append({"step": cell.step, "action": "restart_engine", "things": things})
        elif cell.fault is Fault.RULE_DISABLED:
            disabled.append(STEP_RULES[Step(cell.step or 0)])
        elif cell.fault is Fault.POWER_CUT:
            devices.append({"things": things, "crash_at": cell.crash_point})
            if cell.rollback:  # the commit is lost: the device rolls back, and dies doing it
                messages.append({"step": int(Step.COMMIT), "action": "drop", "nth": 1, "things": things})
    plan: dict[str, Any] = {"seed": seed}
    for key, value in (("message", messages), ("at_step", at_step), ("device", devices)):
        if value:
            plan[key] = value
    if disabled:
        plan["rules"] = {"disabled": disabled}
    return plan


def to_toml(plan: dict[str, Any]) -> str:
    """Write a plan document (scalars, lists of scalars, tables, arrays of tables) as TOML."""
    lines: list[str] = []
    tables = {k: v for k, v in plan.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in plan.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    lines += [f"{k} = {_value(v)}" for k, v in plan.items() if k not in tables and k not in arrays]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{k} = {_value(v)}" for k, v in table.items())]
    for name, items in arrays.items():
        for item in items:
            lines += ["", f"[[{name}]]", *(f"{k} = {_value(v)}" for k, v in item.items())]
    return "\n".join(lines) + "\n"


def _value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is JSON's, for what plans hold


# --------------------------------------------------------------------------------------- results


@dataclass
class CellResult:
    cell: Cell
    thing: str
    status: str  # the execution's final status ("" if it never got one)
    outcome: str  # what happened, in a few words
    fired: bool  # the fault did happen (a cell whose fault never fired proves nothing)
    notifications: int
    attached_before_reconcile: int
    reconciled: bool
    bricked: bool
    orphan_certificates: int
    non_terminal: bool
    problems: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cell"] = self.cell.to_json()
        return {
            "fault": self.cell.fault.value,
            "step": self.cell.step,
            "crash_point": self.cell.crash_point,
            "store": self.cell.store,
            **{k: v for k, v in data.items() if k != "cell"},
        }


def totals(results: Sequence[CellResult]) -> dict[str, int]:
    return {
        "cells": len(results),
        "passed": sum(r.ok for r in results),
        "bricked": sum(r.bricked for r in results),
        "orphan_certificates": sum(r.orphan_certificates for r in results),
        "non_terminal": sum(r.non_terminal for r in results),
        "not_fired": sum(not r.fired for r in results),
        "reconciled": sum(r.reconciled for r in results),
    }
