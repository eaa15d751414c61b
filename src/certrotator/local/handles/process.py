"""A local IoT Core running in its own process (`certrotator local up`), driven by a SimulatedFleet.

The fleet needs little from an engine: provisioning (the registry and CA in the shared SQLite database
and `ca/` directory, as `certrotator local provision` does), job creation (the admin endpoint, as
`certrotator jobs create` does), reads of jobs and the registry (the database: WAL lets a reader run
beside the engine) and the live connections (the admin endpoint). `RemoteEngine` offers those with the
`call` / `wait_until` interface of `EngineThread`, so the same fleet code drives either.

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
from certrotator.local.ca import LocalCa, ensure_local_ca
from certrotator.local.db import Database
from certrotator.local.jobs import DEFAULT_TEMPLATE, JobStore
from certrotator.local.policy import Connection
from certrotator.local.registry import LocalRegistry

T = TypeVar("T")


class EngineGone(RuntimeError):
    """The engine process is not running (any more)."""


class RemoteBroker:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def connections(self) -> list[Connection]:
        live, rows = admin.call(self.data_dir, "connections")
        if not live:
            raise EngineGone(f"no engine is running on {self.data_dir}")
        return [Connection(str(r["client_id"]), str(r["principal"]), str(r["thing"])) for r in rows]


class RemoteView:
    """The part of `LocalIoTCore` a SimulatedFleet uses, for an engine in another process."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        db = Database(data_dir)
        self.db = db
        self.registry = LocalRegistry(db)
        self.jobs = JobStore(db)
        self.ca: LocalCa = ensure_local_ca(data_dir)  # loads what the engine generated
        self.broker = RemoteBroker(data_dir)

    def create_job(
        self,
        job_id: str,
        things: Sequence[str] = (),
        groups: Sequence[str] = (),
        template: str = DEFAULT_TEMPLATE,
        max_per_minute: int | None = None,
        in_progress_timeout_minutes: float | None = None,
        unlimited_rollout: bool = False,
    ) -> None:
        live, _ = admin.call(
            self.data_dir,
            "create_job",
            job_id=job_id,
            things=list(things),
            groups=list(groups),
            template=template,
            max_per_minute=max_per_minute,
            in_progress_timeout_minutes=in_progress_timeout_minutes,
            unlimited_rollout=unlimited_rollout,
        )
        if not live:
            raise EngineGone(f"no engine is running on {self.data_dir}")


class RemoteEngine:
    """`EngineThread`'s interface over an engine running in another process on `data_dir`."""

    def __init__(self, data_dir: Path, poll_s: float = 0.05) -> None:
        info = admin.running_engine(data_dir)
        if info is None:
            raise EngineGone(f"no engine is running on {data_dir} (start `certrotator local up`)")
        self.data_dir = data_dir
        self.poll_s = poll_s
        self.view = RemoteView(data_dir, int(info["mqtt_port"]))
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.view.port

    def call(self, fn: Callable[[RemoteView], T], timeout: float = 60) -> T:
        """Run `fn` on the view here (one caller at a time, like the engine's loop)."""
        del timeout  # the database and admin calls have their own
        with self._lock:
            return fn(self.view)

    def wait_until(
        self, predicate: Callable[[RemoteView], bool], timeout: float, tick_s: float | None = None
    ) -> bool:
        """Poll `predicate` (there are no change events across processes); False after `timeout` s."""
        deadline = time.monotonic() + timeout
        interval = self.poll_s if tick_s is None else min(tick_s, self.poll_s)
        while True:
            if self.call(predicate):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(interval, remaining))

    def close(self) -> None:
        self.view.db.close()


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
