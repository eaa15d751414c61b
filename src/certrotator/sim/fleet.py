"""A simulated fleet on the local IoT Core: real provisioned devices running the real agent (the
standalone transport that ships), all in this process on a few reactor threads. Used by the demo, the
end-to-end tests and the benchmarks.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from certrotator import crypto
from certrotator.device import machine
from certrotator.device.agent import Agent, Observer
from certrotator.device.reactor import Reactor
from certrotator.device.standalone.config import DeviceConfig, load_device_config
from certrotator.device.standalone.runtime import build_agent
from certrotator.local.ca import LocalCa
from certrotator.local.jobs import DEFAULT_TEMPLATE, JobStore
from certrotator.local.policy import Connection
from certrotator.local.provision import CONFIG_FILE, provision_thing
from certrotator.local.registry import LocalRegistry
from certrotator.protocol import (
    ACTIVE_EXECUTION_STATUSES,
    FAILURE_REASON_KEY,
    PENDING_ROLLOUT,
    JobExecutionStatus,
)
from certrotator.sim.softhsm import move_key_into_token

OPEN = (*ACTIVE_EXECUTION_STATUSES, PENDING_ROLLOUT)
# Where OpenSSL-style libraries (aws-lc in the AWS CRT) find the default trust store.
_DEFAULT_TRUST_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR")
T = TypeVar("T")


class _Connections(Protocol):
    def connections(self) -> list[Connection]: ...


class EngineView(Protocol):
    """What the fleet uses of an engine: `LocalIoTCore` in-process, `fleet.remote.RemoteView` across
    processes."""

    @property
    def registry(self) -> LocalRegistry: ...
    @property
    def jobs(self) -> JobStore: ...
    @property
    def ca(self) -> LocalCa: ...
    @property
    def port(self) -> int: ...
    @property
    def broker(self) -> _Connections: ...

    def create_job(
        self,
        job_id: str,
        things: Sequence[str] = (),
        groups: Sequence[str] = (),
        template: str = DEFAULT_TEMPLATE,
        max_per_minute: int | None = None,
        in_progress_timeout_minutes: float | None = None,
        unlimited_rollout: bool = False,
    ) -> None: ...


class EngineHandle(Protocol):
    """`local.runner.EngineThread` (engine in this process) or `fleet.remote.RemoteEngine`."""

    @property
    def port(self) -> int: ...

    def call(self, fn: Callable[[EngineView], T], timeout: float = 60) -> T: ...

    def wait_until(
        self, predicate: Callable[[EngineView], bool], timeout: float, tick_s: float | None = None
    ) -> bool: ...


@dataclass
class SimulatedDevice:
    thing: str
    directory: Path
    config: DeviceConfig
    first_certificate_id: str
    agent: Agent | None = None
    certificate_before_job: str = ""
    connected: threading.Event = field(default_factory=threading.Event)

    def certificate_id(self) -> str:
        return crypto.certificate_id(self.config.certificate.read_bytes())

    def key(self) -> crypto.PrivateKey:
        assert self.config.private_key is not None
        return crypto.load_private_key(self.config.private_key.read_bytes())

    def pair_matches(self) -> bool:
        try:
            return crypto.certificate_matches_key(self.config.certificate.read_text(), self.key())
        except (OSError, crypto.CryptoError):
            return False


@dataclass(frozen=True, slots=True)
class Problem:
    thing: str
    what: str


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (1 - 99) of `values`; 0.0 when there are none."""
    if len(values) < 2:
        return values[0] if values else 0.0
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


@dataclass
class JobReport:
    job_id: str
    devices: int
    statuses: dict[str, str]
    latencies_s: list[float]
    duration_s: float
    problems: list[Problem] = field(default_factory=list)

    def count(self, status: JobExecutionStatus) -> int:
        return sum(1 for s in self.statuses.values() if s == status.value)

    @property
    def verified(self) -> int:
        bad = {p.thing for p in self.problems}
        return sum(1 for thing, s in self.statuses.items() if s == JobExecutionStatus.SUCCEEDED and thing not in bad)

    def percentile(self, q: float) -> float:
        return percentile(self.latencies_s, q)

    def summary(self) -> dict[str, object]:
        succeeded = self.count(JobExecutionStatus.SUCCEEDED)
        return {
            "job_id": self.job_id,
            "devices": self.devices,
            "succeeded": succeeded,
            "failed": self.count(JobExecutionStatus.FAILED),
            "timed_out": self.count(JobExecutionStatus.TIMED_OUT),
            "other": self.devices
            - succeeded
            - self.count(JobExecutionStatus.FAILED)
            - self.count(JobExecutionStatus.TIMED_OUT),
            "verified": self.verified,
            "duration_s": round(self.duration_s, 3),
            "rotations_per_s": round(succeeded / self.duration_s, 2) if self.duration_s > 0 else 0.0,
            "p50_s": round(self.percentile(50), 3),
            "p99_s": round(self.percentile(99), 3),
            "problems": [{"thing": p.thing, "problem": p.what} for p in self.problems],
        }


Progress = Callable[[dict[str, int], float], None]  # (status counts, elapsed seconds)


class SimulatedFleet:
    def __init__(self, engine: EngineHandle, root: Path, threads: int = 8) -> None:
        self.engine = engine
        self.root = root
        # Each device would have its own disk; here they share one, and every credential write is
        # fsync'ed (~11 ms here). Agents spread over a few reactor threads so those waits overlap
        # (fsync releases the GIL) instead of queueing behind each other on one thread.
        self.reactors = [Reactor(f"fleet-agents-{i}").start() for i in range(threads)]
        self.devices: list[SimulatedDevice] = []
        # PERF: the AWS CRT builds a TLS context per connection, as it must (a context keeps the key it
        # was built with, so the one after a rotation has to be new). Building one starts with s2n
        # loading the *default* trust store (the system CA bundle: 11-30 ms of CPU here, with the GIL
        # held), which the device's own root CA then replaces. A real device pays that once per
        # connection on its own CPU; a thousand simulated ones pay it on the fleet's one GIL, where it
        # was 97% of the fleet's CPU while 1,000 agents connected. So while the fleet runs, the default
        # store is the local root CA: each connection still trusts exactly its device.toml's root CA and
        # still gets a new context, built in ~0.5 ms.
        self._saved_env = {name: os.environ.get(name) for name in _DEFAULT_TRUST_ENV}
        root_ca = engine.call(lambda e: e.ca.files.root_ca)
        os.environ["SSL_CERT_FILE"] = str(root_ca)
        os.environ["SSL_CERT_DIR"] = str(root_ca.parent / "no-default-ca-dir")

    def __enter__(self) -> SimulatedFleet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop_agents()
        for reactor in self.reactors:
            reactor.stop()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def provision(
        self,
        count: int,
        group: str = "fleet",
        key_algorithm: crypto.KeyAlgorithm = crypto.KeyAlgorithm.ECDSA_P256,
        signing_algorithm: crypto.SigningAlgorithm | None = None,
        state_timeout_s: float = 30.0,
    ) -> list[SimulatedDevice]:
        """Provision things as an installer would: a credentials directory and device.toml each."""
        made = []
        start = len(self.devices)
        for i in range(start, start + count):
            thing = f"{group}-{i:04d}"
            directory = self.root / "devices" / thing

            def make(engine: EngineView, thing: str = thing, directory: Path = directory) -> str:
                return provision_thing(
                    engine.registry,
                    engine.ca,
                    thing,
                    directory,
                    group=group,
                    key_algorithm=key_algorithm,
                    signing_algorithm=signing_algorithm,
                    port=engine.port,
                ).certificate_id

            cert_id = self.engine.call(make)
            toml = directory / CONFIG_FILE
            toml.write_text(
                toml.read_text().replace("state_timeout_s = 30", f"state_timeout_s = {state_timeout_s:g}")
            )
            made.append(SimulatedDevice(thing, directory, load_device_config(toml), cert_id))
        self.devices.extend(made)
        return made

    def start_agents(self, devices: list[SimulatedDevice] | None = None, timeout_s: float = 60.0) -> None:
        """Start agents and wait until each is connected and subscribed."""
        targets = devices if devices is not None else self.devices
        for device in targets:
            device.connected.clear()
            reactor = self.reactors[self.devices.index(device) % len(self.reactors)]
            device.agent = build_agent(device.config, reactor, observer=_on_started(device.connected))
            device.agent.start()
        deadline = time.monotonic() + timeout_s
        for device in targets:
            if not device.connected.wait(max(deadline - time.monotonic(), 0.0)):
                missing = [d.thing for d in targets if not d.connected.is_set()]
                raise TimeoutError(f"{len(missing)} agents did not connect in {timeout_s:g} s: {missing[:5]}")

    def start_agent_processes(
        self, devices: list[SimulatedDevice], env: dict[str, str] | None = None, timeout_s: float = 60.0
    ) -> list[subprocess.Popen[bytes]]:
        """Run agents as separate processes (`python -m certrotator.device.standalone.runtime`), as shipped;
        returns once each is connected to the engine."""
        processes = []
        for d in devices:
            with (d.directory / "agent.log").open("ab") as log:  # the child keeps its own descriptor
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "certrotator.device.standalone.runtime",
                            str(d.directory / CONFIG_FILE),
                        ],
                        env={**os.environ, **(env or {})},
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                    )
                )
        things = {d.thing for d in devices}

        def connected(engine: EngineView) -> bool:
            return things <= {c.thing for c in engine.broker.connections()}

        if not self.engine.wait_until(connected, timeout_s, tick_s=0.05):
            for p in processes:
                p.kill()
            logs = [str(d.directory / "agent.log") for d in devices]
            raise TimeoutError(f"agent processes did not connect in {timeout_s:g} s; see {logs}")
        return processes

    def move_keys_into_tokens(self, softhsm_conf: Path, devices: list[SimulatedDevice]) -> None:
        """Make these devices PKCS#11 devices: each key goes into its own SoftHSM2 token."""
        for device in devices:
            move_key_into_token(softhsm_conf, device.directory, device.thing)
            device.config = load_device_config(device.directory / CONFIG_FILE)

    def stop_agents(self) -> None:
        for device in self.devices:
            if device.agent is not None:
                device.agent.stop()
                device.agent = None

    def statuses(self, job_id: str) -> dict[str, str]:
        return {
            e.thing: e.status.value for e in self.engine.call(lambda engine: engine.jobs.executions(job_id))
        }

    def run_job(
        self,
        job_id: str,
        group: str = "fleet",
        timeout_s: float = 600.0,
        progress: Progress | None = None,
        **job_options: object,
    ) -> JobReport:
        """Create a rotation job for the group and wait until every execution is terminal."""
        for device in self.devices:
            device.certificate_before_job = device.certificate_id()
        started = time.monotonic()
        self.engine.call(lambda e: e.create_job(job_id, groups=[group], **job_options))  # type: ignore[arg-type]
        return self.wait_job(job_id, timeout_s, progress, started)

    def wait_job(
        self,
        job_id: str,
        timeout_s: float = 600.0,
        progress: Progress | None = None,
        started: float | None = None,
    ) -> JobReport:
        """Wait until every execution of an existing job is terminal and report on it."""
        started = time.monotonic() if started is None else started

        def done(engine: EngineView) -> bool:
            counts = engine.jobs.status_counts(job_id)
            if progress is not None:
                progress(counts, time.monotonic() - started)
            return bool(counts) and not any(counts.get(s) for s in OPEN)

        finished = self.engine.wait_until(done, timeout_s, tick_s=0.25)
        duration = time.monotonic() - started
        executions = self.engine.call(lambda e: e.jobs.executions(job_id))
        report = JobReport(
            job_id=job_id,
            devices=len(executions),
            statuses={e.thing: e.status.value for e in executions},
            latencies_s=sorted(
                e.updated_at - e.queued_at for e in executions if e.status is JobExecutionStatus.SUCCEEDED
            ),
            duration_s=duration,
        )
        if not finished:
            report.problems.append(Problem("*", f"job did not finish within {timeout_s:g} s"))
        for e in executions:
            if e.status is not JobExecutionStatus.SUCCEEDED:
                reason = e.status_details.get(FAILURE_REASON_KEY, "no reason reported by the device")
                report.problems.append(Problem(e.thing, f"{e.status.value}: {reason}"))
        return report

    def verify(self, report: JobReport) -> None:
        """Check DESIGN.md §4's invariants for every device the job rotated; add what fails to the report."""
        by_thing = {d.thing: d for d in self.devices}

        def facts(engine: EngineView) -> dict[str, tuple[list[str], bool, set[str]]]:
            live: dict[str, set[str]] = {}
            for c in engine.broker.connections():
                live.setdefault(c.thing, set()).add(c.principal)
            return {
                thing: (
                    engine.registry.thing_principals(thing),
                    engine.registry.certificate(by_thing[thing].certificate_before_job) is None,
                    live.get(thing, set()),
                )
                for thing in report.statuses
                if thing in by_thing
            }

        seen = self.engine.call(facts)
        notified = {
            n.get("thingName")
            for n in self.engine.call(lambda e: e.registry.notifications())
            if n.get("jobId") == report.job_id
        }
        for thing, status in report.statuses.items():
            if status != JobExecutionStatus.SUCCEEDED or thing not in by_thing:
                continue
            device = by_thing[thing]
            principals, old_gone, live = seen[thing]
            new_id = device.certificate_id()
            checks = [
                # A PKCS#11 key never leaves its token: there the live mutual-TLS connection with the new
                # certificate (checked below) is the proof that certificate and key belong together.
                (
                    device.config.store == "pkcs11" or device.pair_matches(),
                    "certificate and key on the device do not match",
                ),
                (new_id != device.certificate_before_job, "the device still has its previous certificate"),
                (
                    principals == [new_id],
                    f"registry attaches {len(principals)} certificate(s), not just the new one",
                ),
                (old_gone, "the old certificate is still in the registry"),
                (new_id in live, "the device is not connected with its new certificate"),
                (thing not in notified, "a notification was sent for a successful rotation"),
            ]
            report.problems.extend(Problem(thing, what) for ok, what in checks if not ok)


def _on_started(flag: threading.Event) -> Observer:
    """An agent observer that raises `flag` once the agent is connected and subscribed."""

    def observe(_state: machine.State, event: machine.Event, _actions: list[machine.Action]) -> None:
        if isinstance(event, machine.Started):
            flag.set()

    return observe
