"""End-to-end harness: the local IoT Core on a thread and a simulated fleet of real agents."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from certrotator.local.engine import EngineConfig
from certrotator.local.handles.thread import EngineThread
from certrotator.sim.fleet import SimulatedFleet


@contextmanager
def running_fleet(tmp_path: Path, **engine_options: object) -> Iterator[SimulatedFleet]:
    config = EngineConfig(tmp_path / "engine", port=0, **engine_options)  # type: ignore[arg-type]
    with EngineThread(config) as engine, SimulatedFleet(engine, tmp_path, threads=4) as fleet:
        yield fleet
