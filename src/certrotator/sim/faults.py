"""The simulated fleet's side of a fault plan: the fault driver.

The engine decides every fault at the protocol step where it happens (local.faults, local.fault_hooks),
but it cannot reach the devices' processes: it writes what it wants into `faults.log` in its data
directory and cuts the device off. The driver follows that log and does the device side:

- `kill_device`: SIGKILL the thing's agent process, tell the engine it is dead (the device's traffic
  passes again), start the process again after the plan's `restart_after_s`;
- key-store crash points (`[[device]] crash_at`): the agent process starts with CERTROTATOR_CRASH_AT,
  dies there (exit 86, as at a power cut) and is started again without it;
- clock skew (`[[device]] clock_skew_s`): the agent process runs under libfaketime (its whole clock,
  the AWS CRT's TLS checks included, not only Python's);
- `restart_engine`: an engine process that died is started again on the same data directory and port.

Every action is kept in `events` (with the time) for the report.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certrotator.device.journal import CRASH_ENV
from certrotator.local.fault_hooks import FAULT_LOG
from certrotator.local.faults import FaultPlan, StepAction
from certrotator.local.handles.process import EngineProcess
from certrotator.sim.fleet import SimulatedDevice, SimulatedFleet

log = logging.getLogger("certrotator.sim")

CRASH_EXIT = 86  # device/journal.py crash_point
FAKETIME_LIBRARIES = (
    Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/faketime/libfaketime.so.1"),
)


def faketime_library() -> Path | None:
    return next((p for p in FAKETIME_LIBRARIES if p.exists()), None)


def skew_env(seconds: float) -> dict[str, str]:
    """The environment that runs a process `seconds` ahead of (or behind) the real clock."""
    library = faketime_library()
    if library is None:
        raise RuntimeError("clock skew needs libfaketime (Debian: apt-get install faketime)")
    # Monotonic clocks stay real: the agent's timers must not jump, only the wall clock is wrong.
    return {"LD_PRELOAD": str(library), "FAKETIME": f"{seconds:+.0f}", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@dataclass(frozen=True, slots=True)
class DriverEvent:
    time: float
    what: str  # killed, restarted, crashed, exited, engine_restarted
    thing: str = ""
    detail: str = ""


class FaultDriver:
    """Runs a plan's device side for a fleet of agent processes (and restarts an engine process)."""

    def __init__(
        self,
        fleet: SimulatedFleet[Any],
        plan: FaultPlan,
        engine_process: EngineProcess | None = None,
        poll_s: float = 0.02,
    ) -> None:
        self.fleet, self.plan, self.engine_process, self.poll_s = fleet, plan, engine_process, poll_s
        self.log_path = fleet.engine.data_dir / FAULT_LOG
        self.events: list[DriverEvent] = []
        self.fault_log: list[dict[str, Any]] = []  # the engine's faults.log, as read so far
        self._offset = 0
        self._by_thing = {d.thing: d for d in fleet.devices}
        self._restarts: list[tuple[float, SimulatedDevice]] = []  # (due, device)
        self._killed: set[str] = set()  # processes this driver ended on purpose
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-driver", daemon=True)
        self._lock = threading.Lock()
        for device in fleet.devices:
            env: dict[str, str] = {}
            for fault in plan.device_faults(device.thing):
                if fault.clock_skew_s:
                    env |= skew_env(fault.clock_skew_s)
                    self._note("clock_skewed", device.thing, f"{fault.clock_skew_s:+g} s")
            if env:
                fleet.device_env[device.thing] = env

    def __enter__(self) -> FaultDriver:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def start_agents(self, devices: list[SimulatedDevice], timeout_s: float = 60.0) -> None:
        """Start the devices' agent processes (a crash point armed where the plan names one) and wait
        until those without one are connected."""
        plain = []
        for device in devices:
            crash = next((f.crash_at for f in self.plan.device_faults(device.thing) if f.crash_at), None)
            self.fleet.start_agent_process(device, {CRASH_ENV: crash} if crash else None)
            if crash is None:
                plain.append(device)
        if not self.fleet.wait_connected(plain, timeout_s):
            raise TimeoutError(f"agent processes did not connect in {timeout_s:g} s")

    def events_of(self, thing: str) -> list[DriverEvent]:
        with self._lock:
            return [e for e in self.events if e.thing == thing]

    def fired(self, thing: str) -> list[dict[str, Any]]:
        """What the engine's plan did to `thing` (faults.log), as read so far."""
        with self._lock:
            return [r for r in self.fault_log if r.get("thing") == thing]

    # ------------------------------------------------------------------------------ the loop

    def _note(self, what: str, thing: str = "", detail: str = "") -> None:
        with self._lock:
            self.events.append(DriverEvent(time.time(), what, thing, detail))
        log.info("fault driver: %s %s %s", what, thing, detail)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._read_log()
                self._watch_agents()
                self._watch_engine()
                self._due_restarts()
            except Exception:  # the driver must outlive a failed step; the checks will show it
                log.exception("fault driver step failed")

    def _read_log(self) -> None:
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            record = json.loads(line)
            with self._lock:
                self.fault_log.append(record)
            if record.get("event") == StepAction.KILL_DEVICE.value:
                self._kill(str(record["thing"]))

    def _kill(self, thing: str) -> None:
        process = self.fleet.agent_processes.get(thing)
        if process is not None and process.poll() is None:
            self._killed.add(thing)
            process.kill()
            process.wait(timeout=30)
        self._note("killed", thing)
        try:
            self.fleet.engine.fault_released(thing)
        except Exception as exc:  # an engine restarting: it forgot the cut-off anyway
            self._note("release_failed", thing, str(exc))
        self._schedule_restart(thing)

    def _schedule_restart(self, thing: str) -> None:
        device = self._by_thing[thing]
        delay = max((f.restart_after_s for f in self.plan.device_faults(thing)), default=0.2)
        self._restarts.append((time.monotonic() + delay, device))

    def _watch_agents(self) -> None:
        for thing, process in list(self.fleet.agent_processes.items()):
            code = process.poll()
            if code is None or thing in self._killed or any(d.thing == thing for _, d in self._restarts):
                continue
            # A crash point (exit 86) is a power cut: the device comes back. Any other exit (69, 70) is
            # what systemd would restart too; it is noted, and the checks decide whether it mattered.
            self._note("crashed" if code == CRASH_EXIT else "exited", thing, f"exit {code}")
            self._schedule_restart(thing)

    def _due_restarts(self) -> None:
        now = time.monotonic()
        due = [d for at, d in self._restarts if at <= now]
        self._restarts = [(at, d) for at, d in self._restarts if at > now]
        for device in due:
            self._killed.discard(device.thing)
            self.fleet.start_agent_process(device)  # no crash point the second time
            self._note("restarted", device.thing)

    def _watch_engine(self) -> None:
        engine = self.engine_process
        if engine is None or engine.process is None or engine.process.poll() is None:
            return
        code = engine.process.returncode
        engine.process = None
        self._note("engine_died", detail=f"exit {code}")
        engine.start()
        self._note("engine_restarted")
