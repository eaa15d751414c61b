"""A single-threaded event loop for agents: callbacks and timers run one at a time on one thread.

MQTT callbacks arrive on the AWS CRT's threads; they only `submit` here, so an agent's state is only
ever touched by this thread. One reactor can serve many agents (the simulated fleet), which keeps a
fleet of a thousand devices at one thread instead of a thousand.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger("certrotator.device")


class TimerHandle:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self, name: str = "certrotator-agent") -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, TimerHandle, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = threading.Event()

    def start(self) -> Reactor:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def in_reactor(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the reactor thread (thread-safe)."""
        self._queue.put(fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        """Run `fn` on the reactor thread after `delay` seconds. Only call from the reactor thread."""
        handle = TimerHandle()
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), handle, fn))
        return handle

    def _run(self) -> None:
        while True:
            timeout = None
            if self._timers:
                timeout = max(self._timers[0][0] - time.monotonic(), 0.0)
            try:
                fn = self._queue.get(timeout=timeout)
            except queue.Empty:
                fn = _NOTHING
            if fn is None:
                self._stopped.set()
                return
            self._call(fn)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, handle, due = heapq.heappop(self._timers)
                if not handle.cancelled:
                    self._call(due)

    @staticmethod
    def _call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("agent callback failed")


def _NOTHING() -> None:
    return None
