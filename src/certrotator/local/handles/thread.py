"""Run the local IoT Core on a background thread: for the demo, the fleet simulator and tests, which
drive it from ordinary (non-async) code."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from certrotator.local.admin import AdminServer
from certrotator.local.engine import EngineConfig, LocalIoTCore
from certrotator.local.jobs import Execution

T = TypeVar("T")


class EngineThread:
    def __init__(self, config: EngineConfig, admin: bool = False) -> None:
        self.config = config
        self.admin_enabled = admin  # also serve the loopback admin endpoint the CLI talks to
        self.admin: AdminServer | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="local-iot-core", daemon=True)
        self._changed = threading.Condition()
        self._version = 0
        self.engine: LocalIoTCore | None = None

    def __enter__(self) -> EngineThread:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> LocalIoTCore:
        self._thread.start()

        async def boot() -> LocalIoTCore:
            engine = LocalIoTCore(self.config)
            engine.listeners.append(self._notify)
            await engine.start()
            if self.admin_enabled:
                self.admin = AdminServer(asyncio.get_running_loop(), engine.admin_ops())
                self.admin.write_engine_file(self.config.data_dir, self.config.host, engine.port)
            return engine

        self.engine = asyncio.run_coroutine_threadsafe(boot(), self.loop).result(timeout=60)
        return self.engine

    def stop(self) -> None:
        if self.admin is not None:
            self.admin.close(self.config.data_dir)
            self.admin = None
        if self.engine is not None:
            asyncio.run_coroutine_threadsafe(self.engine.stop(), self.loop).result(timeout=60)
            self.engine = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()

    @property
    def port(self) -> int:
        assert self.engine is not None
        return self.engine.port

    def call(self, fn: Callable[[LocalIoTCore], T], timeout: float = 60) -> T:
        """Run `fn(engine)` on the engine's loop (coroutine functions are awaited) and return its result."""
        assert self.engine is not None
        engine = self.engine

        async def run() -> Any:
            result = fn(engine)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        future: Future[T] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return future.result(timeout=timeout)

    def _notify(self, _execution: Execution) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _moved_since(self, seen: int) -> Callable[[], bool]:
        def moved() -> bool:
            return self._version != seen

        return moved

    def wait_until(
        self, predicate: Callable[[LocalIoTCore], bool], timeout: float, tick_s: float | None = None
    ) -> bool:
        """Wait until `predicate(engine)` (evaluated on the engine's loop) holds; re-checked whenever an
        execution changes (and every `tick_s`, for progress displays). False if it still does not hold
        after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                seen = self._version
            if self.call(predicate):  # outside the lock: the loop thread takes it in _notify
                return True
            with self._changed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                wait = remaining if tick_s is None else min(remaining, tick_s)
                self._changed.wait_for(self._moved_since(seen), timeout=wait)
