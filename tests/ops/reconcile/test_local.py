"""`certrotator reconcile --data-dir` end to end: a real engine (with its admin endpoint), things
provisioned with the shipped CLI, the shipped agent as a process, and certificates left behind the way
the terminal table and the create/terminal race leave them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from certrotator import crypto
from certrotator.backend.ports import RotationState
from certrotator.cli import app
from certrotator.device.journal import CRASH_ENV
from certrotator.local import admin
from certrotator.local.ca import IssuerName, ensure_local_ca
from certrotator.local.db import Database
from certrotator.local.engine import EngineConfig, LocalIoTCore
from certrotator.local.handles.thread import EngineThread
from certrotator.local.jobs import JobStore
from certrotator.local.registry import LocalRegistry
from certrotator.ops.reconcile.local import (
    EngineReconciler,
    delete_certificate,
    detach_certificate,
    run_every,
)
from certrotator.protocol import JobExecutionStatus, RotationProgress

pytestmark = pytest.mark.timeout(120)

runner = CliRunner()
WAIT_S = 30.0
SETTLE = "1"  # seconds a connection must last to count (the agents here are idle: nothing on trial)


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout


def reconcile(data_dir: Path, *args: str) -> tuple[int, list[dict[str, Any]]]:
    code, out = cli("reconcile", "--data-dir", str(data_dir), "--settle-seconds", SETTLE, "--json", *args)
    assert code in (0, 1), out
    return code, json.loads(out)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def connections(data_dir: Path) -> set[tuple[str, str]]:
    live, rows = admin.call(data_dir, "connections")
    assert live
    return {(str(r["thing"]), str(r["principal"])) for r in rows}


class Store:
    """The data directory's registry and jobs, opened from the test (beside the engine: WAL)."""

    def __init__(self, data_dir: Path) -> None:
        self.db = Database(data_dir)
        self.registry = LocalRegistry(self.db)
        self.jobs = JobStore(self.db)
        self.data_dir = data_dir

    def stray_certificate(self, thing: str) -> str:
        """What create leaves when the terminal event beat it (issue 12, item 3): a second ACTIVE
        certificate attached with the device's policies, which the device never received."""
        key = crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P256)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, thing)])
        cert = ensure_local_ca(self.data_dir).issuer(IssuerName.IOT).issue(key.public_key(), subject)
        stray = self.registry.add_certificate(crypto.certificate_pem(cert), IssuerName.IOT.value)
        (current,) = self.registry.thing_principals(thing)
        for policy in self.registry.certificate_policies(current):
            self.registry.attach_policy(policy, stray)
        self.registry.attach_exclusive(thing, stray)
        return stray


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def engine(data_dir: Path) -> Iterator[EngineThread]:
    with EngineThread(EngineConfig(data_dir, port=0), admin=True) as running:
        yield running


@pytest.fixture
def store(data_dir: Path, engine: EngineThread) -> Iterator[Store]:
    opened = Store(data_dir)
    yield opened
    opened.db.close()


class Agent:
    """The shipped standalone agent, as a process."""

    def __init__(self, directory: Path, env: dict[str, str] | None = None) -> None:
        with (directory / "agent.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "certrotator.device.standalone.runtime",
                    str(directory / "device.toml"),
                ],
                env={**os.environ, **(env or {})},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture
def agents() -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def start(directory: Path, env: dict[str, str] | None = None) -> Agent:
        started.append(Agent(directory, env))
        return started[-1]

    yield start
    for agent in started:
        agent.stop()


def provision(data_dir: Path, tmp_path: Path, thing: str) -> tuple[Path, str]:
    out = tmp_path / thing
    code, output = cli("local", "provision", thing, "--out", str(out), "--data-dir", str(data_dir))
    assert code == 0, output
    return out, crypto.certificate_id((out / "device.pem.crt").read_bytes())


# ----------------------------------------------------------------------------------------- tests


def test_retires_the_certificate_the_device_does_not_use_and_the_thing_rotates_again(
    data_dir: Path, tmp_path: Path, engine: EngineThread, store: Store, agents: Callable[..., Agent]
) -> None:
    directory, used = provision(data_dir, tmp_path, "dev1")
    provision(data_dir, tmp_path, "dev2")  # a healthy neighbour: never listed, never touched
    stray = store.stray_certificate("dev1")

    # No device connected: no evidence, so nothing is deleted and an operator is needed.
    code, rows = reconcile(data_dir)
    assert code == 1
    assert [(r["thing"], r["decision"], r["findings"]) for r in rows] == [
        ("dev1", "operator-action-needed", ["extra-certificates"])
    ]
    assert "no evidence" in rows[0]["reason"] and rows[0]["applied"] is False
    assert sorted(store.registry.thing_principals("dev1")) == sorted([used, stray])
    (asked,) = store.registry.notifications()
    assert asked["operatorAction"].startswith("2 certificates attached")

    agents(directory)
    wait_for(lambda: ("dev1", used) in connections(data_dir), "the agent to connect")

    # Dry run: the decision, nothing done, nobody told (the connection settles during the run).
    code, rows = reconcile(data_dir, "--dry-run")
    assert code == 0
    (row,) = rows
    assert (row["decision"], row["retire"], row["keep"], row["applied"], row["note"]) == (
        "retire",
        [stray],
        used,
        False,
        "dry run",
    )
    assert sorted(store.registry.thing_principals("dev1")) == sorted([used, stray])
    assert store.registry.notifications() == [asked]

    code, rows = reconcile(data_dir)
    assert code == 0
    assert [(r["thing"], r["decision"], r["applied"]) for r in rows] == [("dev1", "retire", True)]
    assert store.registry.thing_principals("dev1") == [used]
    assert store.registry.certificate(stray) is None  # INACTIVE, detached, policies gone, deleted
    note = store.registry.notifications()[-1]
    assert note["thingName"] == "dev1" and note["status"] == "RECONCILE" and stray in note["outcome"]

    # The device never noticed, and the thing can rotate again (create needs exactly one certificate).
    assert ("dev1", used) in connections(data_dir)
    code, output = cli("jobs", "create", "--thing", "dev1", "--job-id", "after", "--data-dir", str(data_dir))
    assert code == 0, output

    def rotated() -> bool:
        execution = store.jobs.execution("dev1", "after")
        return execution is not None and execution.status is JobExecutionStatus.SUCCEEDED

    wait_for(rotated, "the next rotation to succeed")
    new = crypto.certificate_id((directory / "device.pem.crt").read_bytes())
    assert new != used and store.registry.thing_principals("dev1") == [new]
    assert reconcile(data_dir) == (0, [])


def test_after_a_commit_that_timed_out_the_old_certificate_goes(
    data_dir: Path, tmp_path: Path, engine: EngineThread, store: Store, agents: Callable[..., Agent]
) -> None:
    """TIMED_OUT after commit (DESIGN.md §2: both kept, operator notified): the device committed the new
    pair and died before reporting SUCCEEDED; back online it uses the new one, so the old one goes."""
    directory, old = provision(data_dir, tmp_path, "dev1")
    agent = agents(directory, {CRASH_ENV: "files.commit.cert_backup_deleted"})
    wait_for(lambda: ("dev1", old) in connections(data_dir), "the agent to connect")
    code, output = cli(
        "jobs",
        "create",
        "--thing",
        "dev1",
        "--job-id",
        "lost",
        "--in-progress-timeout-minutes",
        str(6 / 60),
        "--data-dir",
        str(data_dir),
    )
    assert code == 0, output
    assert agent.process.wait(timeout=60) == 86, "the agent did not die after committing"
    new = crypto.certificate_id((directory / "device.pem.crt").read_bytes())

    def timed_out() -> bool:
        execution = store.jobs.execution("dev1", "lost")
        return execution is not None and execution.status is JobExecutionStatus.TIMED_OUT

    wait_for(timed_out, "the execution to time out")
    assert sorted(store.registry.thing_principals("dev1")) == sorted([old, new])

    agents(directory)  # back online, on the committed pair
    wait_for(lambda: ("dev1", new) in connections(data_dir), "the agent to reconnect with the new pair")
    code, rows = reconcile(data_dir)
    assert code == 0
    (row,) = rows
    assert (row["decision"], row["retire"], row["keep"], row["applied"]) == ("retire", [old], new, True)
    assert store.registry.thing_principals("dev1") == [new]
    assert store.registry.certificate(old) is None
    assert ("dev1", new) in connections(data_dir)


def test_leftover_state_is_cleared_and_a_rotation_in_progress_is_left_alone(
    data_dir: Path, tmp_path: Path, engine: EngineThread, store: Store
) -> None:
    _, current = provision(data_dir, tmp_path, "dev1")
    state = RotationState("gone", current, "f" * 64, RotationProgress.COMMITTED)
    store.registry.save_state("dev1", state)

    code, output = cli("jobs", "create", "--thing", "dev1", "--job-id", "busy", "--data-dir", str(data_dir))
    assert code == 0, output
    wait_for(lambda: store.jobs.execution("dev1", "busy") is not None, "the execution to be released")
    code, rows = reconcile(data_dir)
    assert code == 0 and [(r["decision"], r["applied"]) for r in rows] == [("skip", False)]
    assert "busy QUEUED" in rows[0]["reason"]
    assert store.registry.load_state("dev1") == state

    code, output = cli("jobs", "cancel", "busy", "--data-dir", str(data_dir))
    assert code == 0, output
    code, rows = reconcile(data_dir)
    assert code == 0
    assert [(r["findings"], r["decision"], r["applied"]) for r in rows] == [
        (["leftover-state"], "clear-state", True)
    ]
    assert store.registry.load_state("dev1") is None
    assert store.registry.thing_principals("dev1") == [current]


def test_without_an_engine_it_only_reports(data_dir: Path, tmp_path: Path) -> None:
    _, used = provision(data_dir, tmp_path, "dev1")
    _, other = provision(data_dir, tmp_path, "dev2")
    offline = Store(data_dir)
    try:
        stray = offline.stray_certificate("dev1")
        offline.registry.save_state("dev2", RotationState("j", other, "f" * 64, RotationProgress.CREATED))

        code, out = cli("reconcile", "--data-dir", str(data_dir))
        assert code == 1 and "operator action needed" in out
        code, rows = reconcile(data_dir)
        assert code == 1
        by_thing = {r["thing"]: r for r in rows}
        assert by_thing["dev1"]["decision"] == "operator-action-needed"
        assert "no engine is running" in by_thing["dev1"]["reason"]
        assert by_thing["dev2"]["decision"] == "clear-state" and by_thing["dev2"]["applied"] is False
        assert "report only" in by_thing["dev2"]["note"]
        assert sorted(offline.registry.thing_principals("dev1")) == sorted([used, stray])
        assert offline.registry.load_state("dev2") is not None
        assert offline.registry.notifications() == []
    finally:
        offline.db.close()
    code, out = cli("reconcile", "--data-dir", str(tmp_path / "nowhere"))
    assert code == 2 and out == ""


def test_the_engine_hook_retires_on_its_loop_and_tells_once(
    data_dir: Path, tmp_path: Path, engine: EngineThread, store: Store, agents: Callable[..., Agent]
) -> None:
    directory, used = provision(data_dir, tmp_path, "dev1")
    stray = store.stray_certificate("dev1")
    clock = [time.time()]
    reconciler = engine.call(lambda e: EngineReconciler(e, settle_s=60, clock=lambda: clock[0]))

    def run() -> list[tuple[str, str, bool]]:
        outcomes = engine.call(lambda _e: reconciler.run())
        return [
            (o.decision.thing, o.decision.verdict.value, o.applied) for o in outcomes if o.decision.findings
        ]

    assert run() == [("dev1", "operator-action-needed", False)]  # nobody connected
    assert run() == [("dev1", "operator-action-needed", False)]
    assert len(store.registry.notifications()) == 1  # told once, not on every run

    agents(directory)
    wait_for(lambda: ("dev1", used) in connections(data_dir), "the agent to connect")
    assert run() == [("dev1", "skip", False)]  # seen for the first time: watch it settle
    clock[0] += 61
    assert run() == [("dev1", "retire", True)]
    assert store.registry.thing_principals("dev1") == [used]
    assert store.registry.certificate(stray) is None
    assert len(store.registry.notifications()) == 2
    assert run() == []


def test_the_engine_runs_it_on_a_timer(
    data_dir: Path, tmp_path: Path, engine: EngineThread, store: Store, agents: Callable[..., Agent]
) -> None:
    directory, used = provision(data_dir, tmp_path, "dev1")
    stray = store.stray_certificate("dev1")
    agents(directory)
    wait_for(lambda: ("dev1", used) in connections(data_dir), "the agent to connect")
    stop = engine.call(lambda _e: asyncio.Event())
    reconciler = engine.call(lambda e: EngineReconciler(e, settle_s=0.2))
    task = engine.call(lambda _e: asyncio.get_running_loop().create_task(run_every(reconciler, 0.1, stop)))
    try:
        wait_for(
            lambda: store.registry.certificate(stray) is None, "the timer to retire the stray certificate"
        )
        assert store.registry.thing_principals("dev1") == [used]
    finally:
        engine.call(lambda _e: stop.set())
        engine.call(lambda _e: asyncio.wait_for(task, 5))
    assert task.done() and task.exception() is None


def test_operator_commands_detach_and_delete(
    data_dir: Path, tmp_path: Path, engine: EngineThread, store: Store, agents: Callable[..., Agent]
) -> None:
    directory, used = provision(data_dir, tmp_path, "dev1")
    stray = store.stray_certificate("dev1")
    agents(directory)
    wait_for(lambda: ("dev1", used) in connections(data_dir), "the agent to connect")

    with pytest.raises(ValueError, match="in use by dev1"):
        delete_certificate(data_dir, used)
    assert store.registry.certificate(used) is not None

    assert detach_certificate(data_dir, "dev1", stray) == f"detached {stray} from dev1"
    assert store.registry.thing_principals("dev1") == [used]
    with pytest.raises(ValueError, match="not attached"):
        detach_certificate(data_dir, "dev1", stray)
    assert delete_certificate(data_dir, stray) == f"deleted {stray}"
    assert store.registry.certificate(stray) is None
    with pytest.raises(ValueError, match="does not exist"):
        delete_certificate(data_dir, stray)

    # forced: the device is cut off at once (INACTIVE through the engine disconnects it)
    assert delete_certificate(data_dir, used, force=True) == f"deleted {used}"
    wait_for(lambda: ("dev1", used) not in connections(data_dir), "the connection to be closed")
    assert engine.call(lambda e: e.registry.certificate(used)) is None


def test_engine_parts_protocol_is_what_the_engine_has(engine: EngineThread) -> None:
    # EngineReconciler is built on LocalIoTCore as the engine would build it for --reconcile-every.
    assert engine.call(lambda e: isinstance(e, LocalIoTCore) and EngineReconciler(e).run() == [])
