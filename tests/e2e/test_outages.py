"""Outages end to end (issue 12), with real processes: the local IoT Core as `certrotator local up`, killed
with SIGKILL and started again on the same data directory and port, and agents as shipped
(`python -m certrotator.device.standalone.runtime device.toml`), stopped and started.

Each test ends with the same proof (`assert_settled`): every execution terminal, every device on a
pair that works (connected with the certificate it has on disk, no backup pending), exactly that one
certificate attached to each thing, and no other certificate left in the registry.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from certrotator.local.db import Database
from certrotator.local.handles.process import EngineProcess, RemoteEngine
from certrotator.local.operations import JobRequest
from certrotator.local.registry import LocalRegistry
from certrotator.local.terminal_work import CRASH_ENV, CRASH_TERMINAL_RECORDED, TerminalWorkStore
from certrotator.protocol import ACTIVE_EXECUTION_STATUSES, PENDING_ROLLOUT, JobExecutionStatus
from certrotator.sim.fleet import SimulatedDevice, SimulatedFleet

from .harness import create_job_offline

pytestmark = pytest.mark.timeout(120)

S = JobExecutionStatus
OPEN = {*(s.value for s in ACTIVE_EXECUTION_STATUSES), PENDING_ROLLOUT}
STATE_TIMEOUT_S = 3.0  # the agents' per-state timeout: short, so a lost reply costs little
IN_PROGRESS_TIMEOUT_MINUTES = 0.5  # the backstop for an execution nobody finishes
SETTLE_TIMEOUT_S = 60.0
SUBSCRIBED = "connected and subscribed"


def free_port() -> int:
    """A port free now: the engine must come back on the port the agents were given."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Outage:
    engine: EngineProcess
    fleet: SimulatedFleet[RemoteEngine]
    devices: list[SimulatedDevice]

    @property
    def remote(self) -> RemoteEngine:
        return self.fleet.engine

    def kill_engine(self) -> None:
        """SIGKILL: no clean shutdown, connections just drop, nothing is flushed."""
        process = self.engine.process
        assert process is not None
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        self.engine.process = None

    def start_agents(self) -> None:
        """Agent processes, each connected *and subscribed* (the engine sees a connection before its
        SUBSCRIBEs are answered; an outage between the two is another test)."""
        seen = {d.thing: agent_log(d).count(SUBSCRIBED) for d in self.devices}
        self.fleet.start_agent_processes(self.devices, timeout_s=60)
        subscribed = self.remote.wait_for(
            lambda: all(agent_log(d).count(SUBSCRIBED) > seen[d.thing] for d in self.devices), 60
        )
        assert subscribed, {d.thing: agent_log(d)[-1000:] for d in self.devices}

    def stop_agents(self) -> None:
        self.fleet.stop_agents()
        things = {d.thing for d in self.devices}
        gone = self.remote.wait_for(lambda: not things & {c.thing for c in self.remote.connections()}, 30)
        assert gone, "the engine still sees the agents connected"


def agent_log(device: SimulatedDevice) -> str:
    path = device.directory / "agent.log"
    return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def outage(tmp_path: Path, count: int, *engine_args: str) -> Iterator[Outage]:
    data = tmp_path / "engine"
    # EngineProcess passes `--port 0`; a later --port wins, as for any option given twice.
    engine = EngineProcess(data, args=["--port", str(free_port()), *engine_args])
    engine.start()
    remote = engine.open_handle()
    try:
        with SimulatedFleet(remote, tmp_path, threads=1) as fleet:
            devices = fleet.provision(count, state_timeout_s=STATE_TIMEOUT_S)
            yield Outage(engine, fleet, devices)
    finally:
        remote.close()
        engine.stop()


def rotation(job_id: str) -> JobRequest:
    return JobRequest(
        job_id,
        groups=("fleet",),
        unlimited_rollout=True,
        in_progress_timeout_minutes=IN_PROGRESS_TIMEOUT_MINUTES,
    )


def assert_settled(o: Outage, *job_ids: str) -> dict[str, int]:
    """Every execution of the jobs terminal; every device connected with the pair on its disk and no
    backup pending; that certificate the only one attached to its thing; no other certificate in the
    registry. Returns the executions' status counts."""
    remote = o.remote

    def terminal() -> bool:
        return all(not OPEN & set(remote.status_counts(j)) for j in job_ids)

    assert remote.wait_for(terminal, SETTLE_TIMEOUT_S, tick_s=0.1), [remote.status_counts(j) for j in job_ids]

    def working() -> bool:
        live = {(c.thing, c.principal) for c in remote.connections()}
        attached = remote.attached_certificates([d.thing for d in o.devices])
        return all(
            (d.thing, d.certificate_id()) in live
            and attached[d.thing] == [d.certificate_id()]
            and not d.config.certificate.with_name(d.config.certificate.name + ".bak").exists()
            for d in o.devices
        )

    settled = remote.wait_for(working, SETTLE_TIMEOUT_S, tick_s=0.1)
    logs = {d.thing: agent_log(d)[-1500:] for d in o.devices}
    assert settled, (remote.attached_certificates([d.thing for d in o.devices]), logs)
    for device in o.devices:
        assert device.pair_matches(), device.thing
    assert sorted(remote.certificate_ids()) == sorted(d.certificate_id() for d in o.devices), "orphans"
    counts: dict[str, int] = {}
    for job_id in job_ids:
        for status, n in remote.status_counts(job_id).items():
            counts[status] = counts.get(status, 0) + n
    return counts


def rotate_all_again(o: Outage, job_id: str) -> None:
    """Nothing is stuck: a new rotation of the whole group succeeds on every device."""
    for device in o.devices:
        device.certificate_before_job = device.certificate_id()
    o.remote.create_job(rotation(job_id))
    counts = assert_settled(o, job_id)
    assert counts == {S.SUCCEEDED.value: len(o.devices)}, counts
    assert all(d.certificate_id() != d.certificate_before_job for d in o.devices)


# ---------------------------------------------------------------------------------------- tests


def test_engine_killed_mid_rollout_and_restarted_ends_every_execution_and_leaves_no_certificate_behind(
    tmp_path: Path,
) -> None:
    """Two rotations in flight at a time; SIGKILL once two have succeeded, so the others are queued,
    pending or somewhere in the middle of the protocol; restart on the same data directory and port."""
    with outage(tmp_path, 6, "--max-in-flight", "2") as o:
        o.start_agents()
        o.remote.create_job(rotation("mid-rollout"))
        succeeded = S.SUCCEEDED.value
        assert o.remote.wait_for(
            lambda: o.remote.status_counts("mid-rollout").get(succeeded, 0) >= 2, 60, 0.01
        )
        o.kill_engine()
        at_kill = o.remote.status_counts("mid-rollout")
        assert OPEN & set(at_kill), f"the rollout was over before the kill: {at_kill}"

        o.engine.start()
        back = time.monotonic()
        counts = assert_settled(o, "mid-rollout")
        settled_s = time.monotonic() - back
        print(f"\nkilled at {at_kill}; restart -> all terminal and settled in {settled_s:.1f} s: {counts}")
        rotate_all_again(o, "after-the-outage")


def test_a_job_created_while_the_engine_is_down_rotates_every_device_once_it_is_back(tmp_path: Path) -> None:
    with outage(tmp_path, 4) as o:
        o.start_agents()
        before = {d.thing: d.certificate_id() for d in o.devices}
        o.kill_engine()
        create_job_offline(
            o.engine.data_dir, "while-down", "--in-progress-timeout-minutes", str(IN_PROGRESS_TIMEOUT_MINUTES)
        )

        o.engine.start()
        back = time.monotonic()
        counts = assert_settled(o, "while-down")
        print(f"\nengine back -> every execution terminal and settled in {time.monotonic() - back:.1f} s")
        assert counts == {S.SUCCEEDED.value: len(o.devices)}, counts
        assert all(d.certificate_id() != before[d.thing] for d in o.devices)


def test_agents_offline_when_the_job_is_created_rotate_once_they_are_started(tmp_path: Path) -> None:
    with outage(tmp_path, 4) as o:
        o.start_agents()
        before = {d.thing: d.certificate_id() for d in o.devices}
        o.stop_agents()
        o.remote.create_job(rotation("while-offline"))
        queued = o.remote.wait_for(
            lambda: o.remote.status_counts("while-offline") == {S.QUEUED.value: len(o.devices)}, 30, 0.05
        )
        assert queued, o.remote.status_counts("while-offline")  # released, notified, heard by nobody

        o.start_agents()
        back = time.monotonic()
        counts = assert_settled(o, "while-offline")
        print(f"\nagents back -> every execution terminal and settled in {time.monotonic() - back:.1f} s")
        assert counts == {S.SUCCEEDED.value: len(o.devices)}, counts
        assert all(d.certificate_id() != before[d.thing] for d in o.devices)


@pytest.mark.parametrize("ending", ["SUCCEEDED", "FAILED"])
def test_engine_killed_between_the_terminal_status_and_its_handler_finishes_the_clean_up_at_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """The crash point kills the engine (SIGKILL) right after the execution's terminal status has
    committed and before the terminal handler ran. SUCCEEDED: the old certificate must go; FAILED (the
    commit rule is off, so the device rolls back): the new one must go."""
    with outage(tmp_path, 1) as o:
        (device,) = o.devices
        first = device.certificate_id()
        o.engine.stop()
        set_rule(o, "commit", ending != "FAILED")  # read by the engine at start
        monkeypatch.setenv(CRASH_ENV, CRASH_TERMINAL_RECORDED)
        o.engine.start()
        monkeypatch.delenv(CRASH_ENV)
        o.start_agents()
        o.remote.create_job(rotation("crash"))
        process = o.engine.process
        assert process is not None
        assert process.wait(timeout=60) == -signal.SIGKILL, "the engine did not die at the crash point"
        o.engine.process = None

        # What the engine left: the terminal status and its work, and both certificates attached.
        assert o.remote.status_counts("crash") == {ending: 1}
        assert pending_terminal_work(o) == [(device.thing, "crash", ending)]
        attached = o.remote.attached_certificates([device.thing])[device.thing]
        assert len(attached) == 2 and first in attached

        set_rule(o, "commit", True)
        o.engine.start()
        back = time.monotonic()
        counts = assert_settled(o, "crash")
        print(f"\nrestart -> clean-up done and device settled in {time.monotonic() - back:.1f} s")
        assert counts == {ending: 1}
        assert pending_terminal_work(o) == []
        if ending == "SUCCEEDED":
            assert device.certificate_id() != first and first not in o.remote.certificate_ids()
        else:
            assert device.certificate_id() == first


def set_rule(o: Outage, name: str, enabled: bool) -> None:
    db = Database(o.engine.data_dir)
    try:
        LocalRegistry(db).set_rule_enabled(name, enabled)
    finally:
        db.close()


def pending_terminal_work(o: Outage) -> list[tuple[str, str, str]]:
    db = Database(o.engine.data_dir)
    try:
        return [(w.thing, w.job_id, w.status.value) for w in TerminalWorkStore(db).pending()]
    finally:
        db.close()

