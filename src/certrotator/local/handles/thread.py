"""Run the local IoT Core on a background thread of this process: the `EngineHandle` the demo, the
simulated fleet and the tests use by default.

Besides the handle's named operations, `call` and `wait_until` run arbitrary code against the engine
object on its loop: for tests that must reach inside the engine (sabotage an issuer, switch a rule)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from certrotator.local.admin import AdminServer
from certrotator.local.engine import EngineConfig, LocalIoTCore
from certrotator.local.handles.base import EngineHandle, EngineRefused, Stores
from certrotator.local.jobs import Execution, JobError
from certrotator.local.operations import JobRequest
from certrotator.local.policy import Connection
from certrotator.local.registry import RegistryError

T = TypeVar("T")
log = logging.getLogger("certrotator.local")


def _cannot_restart() -> None:
    # SIGKILL here would take the caller's process with it.
    log.error("fault plan: restart_engine needs the engine in its own process (handles.process)")


class EngineThread(EngineHandle):
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
            if engine.faults is not None:
                engine.faults.kill_engine = _cannot_restart
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
    def host(self) -> str:
        return self.config.host

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    def fault_released(self, thing: str) -> None:
        self.call(lambda e: e.fault_released(thing))

    @property
    def port(self) -> int:
        assert self.engine is not None
        return self.engine.port

    def create_job(self, request: JobRequest) -> None:
        try:
            self.call(lambda e: e.create_job(request))
        except (JobError, RegistryError) as exc:
            raise EngineRefused(str(exc)) from exc

    def connections(self) -> list[Connection]:
        return self.call(lambda e: e.broker.connections())

    def _with_stores(self, fn: Callable[[Stores], T]) -> T:
        return self.call(lambda e: fn(Stores(e.registry, e.jobs, e.ca)))

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
        """Wait until `predicate(engine)`, evaluated on the engine's loop, holds (see `wait_for`)."""
        return self.wait_for(lambda: self.call(predicate), timeout, tick_s)

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, tick_s: float | None = None) -> bool:
        """Wait until `condition()` (run on the calling thread) holds; re-checked whenever an execution
        changes (and every `tick_s`, for progress displays and conditions on connections). False if
        it still does not hold after `timeout_s` seconds."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._changed:
                seen = self._version
            if condition():  # outside the lock: the loop thread takes it in _notify
                return True
            with self._changed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                wait = remaining if tick_s is None else min(remaining, tick_s)
                self._changed.wait_for(self._moved_since(seen), timeout=wait)
