"""Run a local IoT Core as this process's job (`certrotator local up`): the engine with its loopback
admin endpoint until told to stop, and the garbage-collector settings such a process wants."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

from certrotator.local.admin import AdminServer
from certrotator.local.engine import EngineConfig, LocalIoTCore


def relax_gc() -> None:
    """For processes that run an engine or a fleet (`local up`, the demo, the benchmarks; not the
    library's callers): freeze what exists (imports, set-up) out of the collector's way and run young
    collections every 50,000 allocations instead of 700, since with thousands of live connections each
    one walks many survivors. Reference cycles are still collected, in larger batches (see
    docs/performance.md, fix 5)."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


async def serve(
    config: EngineConfig, stop: asyncio.Event, ready: Callable[[LocalIoTCore], None] | None = None
) -> None:
    """Run the engine with its admin endpoint until `stop` is set."""
    engine = LocalIoTCore(config)
    await engine.start()
    relax_gc()  # this process is the engine's
    admin = AdminServer(asyncio.get_running_loop(), engine.admin_ops())  # loopback only
    admin.write_engine_file(config.data_dir, config.host, engine.port)
    try:
        if ready is not None:
            ready(engine)
        await stop.wait()
    finally:
        admin.close(config.data_dir)
        await engine.stop()
