"""The engine's work on its event loop, apart from what the work is: the inbox of device messages, the
one in-progress timeout timer, and periodic tasks. Each takes the engine's callbacks, so it can be read
(and tested) without an engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress

from certrotator.local.broker import Connection

log = logging.getLogger("certrotator.local")

# Longest stretch of device-message handling per event-loop turn (see Inbox).
WORK_SLICE_S = 0.05

Work = Callable[[], None]


class Inbox:
    """Device messages, handled in arrival order by `run_unit`, at most WORK_SLICE_S of them per
    event-loop turn, so the broker's own work (handshakes, CONNECT, SUBSCRIBE) never waits behind a
    burst (see docs/performance.md, fix 11)."""

    def __init__(self, run_unit: Callable[[str, Connection, Work], None]) -> None:
        self._run_unit = run_unit
        self._queue: deque[tuple[str, Connection, Work]] = deque()
        self._worker: asyncio.Task[None] | None = None

    def put(self, topic: str, connection: Connection, work: Work) -> None:
        self._queue.append((topic, connection, work))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            turn_ends = loop.time() + WORK_SLICE_S
            while self._queue and loop.time() < turn_ends:
                self._run_unit(*self._queue.popleft())
            await asyncio.sleep(0)  # let the rest of this turn's I/O run

    async def close(self) -> None:
        """Drop what is not handled yet (as messages in flight are) and stop the worker."""
        self._queue.clear()
        if self._worker is not None:
            self._worker.cancel()
            with suppress(asyncio.CancelledError):
                await self._worker


class TimeoutTimer:
    """One timer for every execution's in-progress timeout, armed for the earliest one (the database
    knows the rest): `on_due` expires what is due and arms it again for the next."""

    def __init__(self, on_due: Callable[[], None]) -> None:
        self._on_due = on_due
        self._at = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def fire_by(self, at: float) -> None:
        if self._handle is not None and self._at <= at:
            return
        self.cancel()
        self._at = at
        self._handle = asyncio.get_running_loop().call_later(max(at - time.time(), 0.0), self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._on_due()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class PeriodicTasks:
    """Named tasks run every so many seconds through `run` (the engine runs each as one unit of work),
    from `start` until `stop`; a task that raises is logged and runs again at its next time."""

    def __init__(self, run: Callable[[Callable[[], object]], None]) -> None:
        self._run = run
        self._tasks: dict[str, tuple[float, Callable[[], object]]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, name: str, interval_s: float, task: Callable[[], object]) -> None:
        if interval_s <= 0:
            raise ValueError(f"the interval of {name} must be positive, not {interval_s}")
        self._tasks[name] = (interval_s, task)
        if self._loop is not None:
            self._arm(name)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for name in self._tasks:
            self._arm(name)

    def stop(self) -> None:
        self._loop = None
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _arm(self, name: str) -> None:
        assert self._loop is not None
        self._timers[name] = self._loop.call_later(self._tasks[name][0], self._fire, name)

    def _fire(self, name: str) -> None:
        try:
            self._run(self._tasks[name][1])
        except Exception:
            log.exception("periodic task %s failed", name)
        if self._loop is not None:
            self._arm(name)
