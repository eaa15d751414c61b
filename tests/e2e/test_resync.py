"""Device re-synchronisation end to end, with real processes: the local IoT Core as `certrotator local up`
and agents as shipped (`python -m certrotator.device.standalone.runtime device.toml`).

A job whose notify-next a device never got -- created while the engine was down, or while the device's
connection was cut -- must still be picked up as soon as the device is connected again, by the same
agent process (the AWS CRT reconnects by itself; nobody restarts the agent). notify-next is not
replayed to a clean session: the agent learns of the job only because it asks `$next/get` on every
connection it gets (docs/reliability.md, "Device re-synchronisation").
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from certrotator.local.handles.process import EngineProcess, RemoteEngine
from certrotator.local.operations import JobRequest
from certrotator.protocol import JobExecutionStatus
from certrotator.sim.fleet import SimulatedDevice, SimulatedFleet

from .harness import create_job_offline

pytestmark = pytest.mark.timeout(240)

STATE_TIMEOUT_S = 10.0
RESYNC_LOG = "connection resumed: re-synchronising"
JOB_TIMEOUT_S = 120.0


def free_port() -> int:
    """A port the OS says is free now: the engine must come back on the port the agents know."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def engine_and_fleet(
    tmp_path: Path, port: int
) -> Iterator[tuple[EngineProcess, SimulatedFleet[RemoteEngine]]]:
    data = tmp_path / "engine"
    # `local up` gets `--port 0` from the handle; a later --port wins, as for any option given twice.
    engine = EngineProcess(data, args=["--port", str(port)])
    engine.start()
    remote = engine.open_handle()
    try:
        assert remote.port == port
        with SimulatedFleet(remote, tmp_path, threads=1) as fleet:
            yield engine, fleet
    finally:
        remote.close()
        engine.stop()


@contextmanager
def agent_processes(
    fleet: SimulatedFleet[RemoteEngine], devices: list[SimulatedDevice]
) -> Iterator[list[subprocess.Popen[bytes]]]:
    processes = fleet.start_agent_processes(devices, timeout_s=60)
    try:
        yield processes
    finally:
        for p in processes:
            p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def agent_log(device: SimulatedDevice) -> str:
    return (device.directory / "agent.log").read_text(errors="replace")


def assert_same_agents_rotated(
    fleet: SimulatedFleet[RemoteEngine],
    devices: list[SimulatedDevice],
    processes: list[subprocess.Popen[bytes]],
    pids: list[int],
    job_id: str,
    started: float,
) -> float:
    """Every execution SUCCEEDED, every invariant holds, and by the agents that were running before."""
    report = fleet.wait_job(job_id, timeout_s=JOB_TIMEOUT_S, started=started)
    took = time.monotonic() - started
    fleet.verify(report)
    logs = {d.thing: agent_log(d)[-3000:] for d in devices}
    assert report.problems == [], (report.problems, logs)
    assert report.count(JobExecutionStatus.SUCCEEDED) == len(devices)
    assert [p.pid for p in processes] == pids
    assert all(p.poll() is None for p in processes), "an agent process ended"
    for device in devices:
        assert RESYNC_LOG in agent_log(device), f"{device.thing} never re-synchronised"
    return took


def test_a_job_created_while_the_engine_is_down_is_picked_up_after_it_comes_back(tmp_path: Path) -> None:
    """SIGKILL the engine, create the job offline (the shipped CLI writes it to the data directory),
    start the engine again on the same data directory and port: the agents reconnect by themselves and
    rotate. At start-up the engine releases the job and notifies at once, before any device is back:
    those notifications reach nobody."""
    with engine_and_fleet(tmp_path, free_port()) as (engine, fleet):
        devices = fleet.provision(2, state_timeout_s=STATE_TIMEOUT_S)
        with agent_processes(fleet, devices) as processes:
            pids = [p.pid for p in processes]
            assert engine.process is not None
            engine.process.kill()  # SIGKILL: no clean shutdown, connections just drop
            engine.process.wait(timeout=30)
            engine.process = None

            create_job_offline(engine.data_dir, "while-down")

            engine.start()
            back = time.monotonic()
            assert fleet.wait_connected(devices, 90), "the agents did not reconnect by themselves"
            reconnected = time.monotonic() - back
            took = assert_same_agents_rotated(fleet, devices, processes, pids, "while-down", back)
            print(
                f"\nengine back -> agents reconnected {reconnected:.1f} s -> every execution SUCCEEDED {took:.1f} s"
            )


class Relay:
    """A loopback TCP relay in front of the engine: `cut()` drops every relayed connection and refuses
    new ones (the device's network is down), `restore()` lets them through again. TLS passes through
    untouched: the agent still authenticates to the engine itself."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.open = threading.Event()
        self.open.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(source, sink)

    def _drop(self, *sockets: socket.socket) -> None:
        for s in sockets:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
            with self._lock:
                self._sockets.discard(s)

    def cut(self) -> None:
        self.open.clear()
        with self._lock:
            sockets = list(self._sockets)
        self._drop(*sockets)

    def restore(self) -> None:
        self.open.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


def test_a_job_created_while_the_agents_are_cut_off_is_picked_up_when_they_reconnect(tmp_path: Path) -> None:
    """The engine runs throughout; the devices' network goes down, the job is created and released at
    once (its notify-next reaches nobody), the network comes back: the CRT reconnects on its own and
    the agents ask for their next job."""
    with engine_and_fleet(tmp_path, free_port()) as (_engine, fleet):
        relay = Relay(engine_port := fleet.engine.port)
        try:
            devices = fleet.provision(2, state_timeout_s=STATE_TIMEOUT_S)
            for device in devices:  # the devices reach the engine through the relay only
                toml = device.directory / "device.toml"
                text = toml.read_text()
                assert f"port = {engine_port}\n" in text
                toml.write_text(text.replace(f"port = {engine_port}\n", f"port = {relay.port}\n"))
            with agent_processes(fleet, devices) as processes:
                pids = [p.pid for p in processes]
                things = {d.thing for d in devices}
                relay.cut()
                gone = fleet.engine.wait_for(
                    lambda: not things & {c.thing for c in fleet.engine.connections()}, 30, tick_s=0.05
                )
                assert gone, "the engine still sees the devices connected"

                job = JobRequest("while-cut-off", groups=("fleet",), unlimited_rollout=True)
                fleet.engine.create_job(job)
                queued = fleet.engine.wait_for(
                    lambda: fleet.engine.status_counts(job.job_id).get(JobExecutionStatus.QUEUED.value) == 2,
                    30,
                    tick_s=0.05,
                )
                assert queued, fleet.engine.status_counts(job.job_id)

                relay.restore()
                back = time.monotonic()
                assert fleet.wait_connected(devices, 90), "the agents did not reconnect by themselves"
                reconnected = time.monotonic() - back
                took = assert_same_agents_rotated(fleet, devices, processes, pids, "while-cut-off", back)
                print(
                    f"\nnetwork back -> reconnected {reconnected:.1f} s -> every execution SUCCEEDED {took:.1f} s"
                )
        finally:
            relay.close()

