"""A local IoT Core running in its own process (`certrotator local up`), and the `EngineHandle` that
drives it from another.

`RemoteEngine` reaches the engine the way the operator's CLI does: writes that need the live engine
(create a job, list connections) go to its loopback admin endpoint; provisioning writes the shared
registry and reads the `ca/` directory as `certrotator local provision` does; reads of jobs and the
registry come from the shared SQLite database (WAL lets a reader run beside the engine).

Why a second process at all: engine and fleet in one process share one GIL, so the broker's TLS
handshakes and the agents' work queue behind each other on a 2-core machine. The benchmarks run them
apart, as a real fleet and a real IoT Core are.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from certrotator.local import admin
from certrotator.local.ca import load_local_ca
from certrotator.local.db import Database
from certrotator.local.handles.base import EngineHandle, EngineRefused, Stores
from certrotator.local.jobs import JobStore
from certrotator.local.operations import JobRequest
from certrotator.local.policy import Connection
from certrotator.local.registry import LocalRegistry

T = TypeVar("T")


class EngineGone(RuntimeError):
    """The engine process is not running (any more)."""


class RemoteEngine(EngineHandle):
    """The handle of an engine running in another process on `data_dir`."""

    def __init__(self, data_dir: Path, poll_s: float = 0.05) -> None:
        info = admin.running_engine(data_dir)
        if info is None:
            raise EngineGone(f"no engine is running on {data_dir} (start `certrotator local up`)")
        self._data_dir = data_dir
        self.poll_s = poll_s  # no change events cross processes: conditions are polled
        self._host, self._port = str(info["host"]), int(info["mqtt_port"])
        self._db = Database(data_dir)
        self._stores = Stores(LocalRegistry(self._db), JobStore(self._db), load_local_ca(data_dir))
        self._lock = threading.Lock()

    def _refresh_address(self) -> None:
        # An engine restarted on the same data directory may listen elsewhere (`--port 0`): follow its
        # engine.json; while none runs, keep the last address known.
        info = admin.running_engine(self.data_dir)
        if info is not None:
            self._host, self._port = str(info["host"]), int(info["mqtt_port"])

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def host(self) -> str:
        self._refresh_address()
        return self._host

    @property
    def port(self) -> int:
        self._refresh_address()
        return self._port

    def _admin(self, op: str, **args: object) -> object:
        try:
            live, result = admin.call(self.data_dir, op, **args)
        except admin.AdminError as exc:
            raise EngineRefused(str(exc)) from exc
        if not live:
            raise EngineGone(f"no engine is running on {self.data_dir}")
        return result

    def create_job(self, request: JobRequest) -> None:
        self._admin("create_job", **request.to_json())

    def fault_released(self, thing: str) -> None:
        self._admin("fault_released", thing=thing)

    def connections(self) -> list[Connection]:
        rows = self._admin("connections")
        assert isinstance(rows, list)
        return [Connection(str(r["client_id"]), str(r["principal"]), str(r["thing"])) for r in rows]

    def _with_stores(self, fn: Callable[[Stores], T]) -> T:
        with self._lock:  # one caller at a time, like the engine's loop
            return fn(self._stores)

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, tick_s: float | None = None) -> bool:
        deadline = time.monotonic() + timeout_s
        interval = self.poll_s if tick_s is None else min(tick_s, self.poll_s)
        while True:
            if condition():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(interval, remaining))

    def close(self) -> None:
        self._db.close()


class EngineProcess:
    """`certrotator local up --port 0 --data-dir DIR` as a child process, stopped with SIGTERM."""

    def __init__(self, data_dir: Path, args: Sequence[str] = (), log: Path | None = None) -> None:
        self.data_dir = data_dir
        self.args = list(args)
        self.log = log or data_dir.with_name(data_dir.name + "-engine.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.launcher = ["-m", "certrotator.cli"]  # how to run the CLI; a profiling wrapper may replace it

    def __enter__(self) -> EngineProcess:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout_s: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, *self.launcher, "local", "up", "--port", "0"]
        command += ["--data-dir", str(self.data_dir), *self.args]
        with self.log.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"}
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = admin.running_engine(self.data_dir)
            if info is not None and int(info["pid"]) == self.process.pid:
                return
            if self.process.poll() is not None:
                raise EngineGone(f"the engine exited with {self.process.returncode}; see {self.log}")
            time.sleep(0.05)
        self.stop()
        raise EngineGone(f"the engine did not start in {timeout_s:g} s; see {self.log}")

    def open_handle(self) -> RemoteEngine:
        """A handle on this running engine. The engine is stopped if none can be opened (e.g. its data
        directory is of a newer schema than this process knows), so a caller's clean-up, which needs
        the handle, cannot leave the engine process behind."""
        try:
            return RemoteEngine(self.data_dir)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 30.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
