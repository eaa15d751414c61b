"""A simulated fleet on the local IoT Core: real provisioned devices running the real agent (the
standalone transport that ships), on a few reactor threads of this process or as agent processes.
Used by the demo, the end-to-end tests and the benchmarks.

The fleet talks to the engine only through its `EngineHandle` (provision, create jobs, read
executions, the registry and the live connections): the same code drives an engine on a thread of this
process or one in its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from certrotator import crypto
from certrotator.device import machine
from certrotator.device.agent import Agent, Observer
from certrotator.device.reactor import Reactor
from certrotator.device.standalone.config import DeviceConfig, load_device_config
from certrotator.device.standalone.runtime import build_agent
from certrotator.local.handles.base import EngineHandle
from certrotator.local.operations import JobRequest
from certrotator.local.provision import CONFIG_FILE, DEFAULT_STATE_TIMEOUT_S, ProvisionRequest
from certrotator.protocol import (
    ACTIVE_EXECUTION_STATUSES,
    FAILURE_REASON_KEY,
    PENDING_ROLLOUT,
    JobExecutionStatus,
)
from certrotator.sim.report import JobReport, Problem
from certrotator.sim.softhsm import SoftHsm

# What the agent logs once it is connected and subscribed: it can hear its job from then on.
AGENT_SUBSCRIBED_LOG = "connected and subscribed"
OPEN = (*ACTIVE_EXECUTION_STATUSES, PENDING_ROLLOUT)
# Where OpenSSL-style libraries (aws-lc in the AWS CRT) find the default trust store.
_DEFAULT_TRUST_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR")
KeyStoreKind = Literal["file", "pkcs11"]
H = TypeVar("H", bound=EngineHandle)


@dataclass
class SimulatedDevice:
    thing: str
    directory: Path
    config: DeviceConfig
    first_certificate_id: str
    agent: Agent | None = None
    certificate_before_job: str = ""
    connected: threading.Event = field(default_factory=threading.Event)
    softhsm: SoftHsm | None = None  # where a PKCS#11 device's token is

    @property
    def env(self) -> dict[str, str]:
        """What this device's agent process needs in its environment beyond ours."""
        return self.softhsm.env if self.softhsm is not None else {}

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


Progress = Callable[[dict[str, int], float], None]  # (status counts, elapsed seconds)


class SimulatedFleet(Generic[H]):
    def __init__(self, engine: H, root: Path, threads: int = 8, resync_s: float | None = None) -> None:
        """`resync_s`: agents also ask `$next/get` this often while idle (sim.agent_process), as the
        Greengrass runtime does; None = as the shipped standalone agent, only on each connection."""
        self.engine = engine
        self.root = root
        self.resync_s = resync_s
        # Each device would have its own disk; here they share one, and every credential write is
        # fsync'ed (~11 ms here). Agents spread over a few reactor threads so those waits overlap
        # (fsync releases the GIL) instead of queueing behind each other on one thread.
        self.reactors = [Reactor(f"fleet-agents-{i}").start() for i in range(threads)]
        self.devices: list[SimulatedDevice] = []
        self.processes: list[subprocess.Popen[bytes]] = []  # agent processes, ended by stop_agents()
        self.agent_processes: dict[str, subprocess.Popen[bytes]] = {}  # each thing's latest one
        self.device_env: dict[str, dict[str, str]] = {}  # extra environment of a thing's agent process
        # The AWS CRT builds a TLS context per connection, starting with the system's default trust
        # store (11-30 ms of CPU with the GIL held), which the device's root CA then replaces. While
        # the fleet runs, the default store is the local root CA: each connection still trusts exactly
        # its device.toml's root CA, in ~0.5 ms (see docs/performance.md).
        self._saved_env = {name: os.environ.get(name) for name in _DEFAULT_TRUST_ENV}
        root_ca = engine.root_ca()
        os.environ["SSL_CERT_FILE"] = str(root_ca)
        os.environ["SSL_CERT_DIR"] = str(root_ca.parent / "no-default-ca-dir")

    def __enter__(self) -> SimulatedFleet[H]:
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
        state_timeout_s: float = DEFAULT_STATE_TIMEOUT_S,
        keystore: KeyStoreKind = "file",
        softhsm: SoftHsm | None = None,
    ) -> list[SimulatedDevice]:
        """Provision things as an installer would: a credentials directory and device.toml each.

        With `keystore="pkcs11"` each device's key goes into a SoftHSM2 token of its own token
        directory (or into `softhsm`'s, shared by these devices, when given) and no key file is
        written; such devices run as agent processes (`start_agent_processes`)."""
        made = []
        start = len(self.devices)
        for i in range(start, start + count):
            thing = f"{group}-{i:04d}"
            directory = self.root / "devices" / thing
            request = ProvisionRequest(
                thing,
                directory,
                group=group,
                key_algorithm=key_algorithm,
                signing_algorithm=signing_algorithm,
                state_timeout_s=state_timeout_s,
            )
            hsm = None
            if keystore == "pkcs11":
                hsm = softhsm or SoftHsm.create(directory / "softhsm")
                key = crypto.generate_private_key(key_algorithm)
                token = hsm.import_key(key, thing, scratch=directory)
                request = replace(request, pkcs11=token, public_key=key.public_key())
            cert_id = self.engine.provision(request).certificate_id
            config = load_device_config(directory / CONFIG_FILE)
            made.append(SimulatedDevice(thing, directory, config, cert_id, softhsm=hsm))
        self.devices.extend(made)
        return made

    def start_agents(self, devices: list[SimulatedDevice] | None = None, timeout_s: float = 60.0) -> None:
        """Start agents on this process's reactor threads and wait until each is connected and
        subscribed."""
        targets = devices if devices is not None else self.devices
        if any(d.softhsm is not None for d in targets):
            # A process initialises a PKCS#11 library once, with one SOFTHSM2_CONF: one token directory.
            raise ValueError("PKCS#11 devices run as agent processes: use start_agent_processes")
        for device in targets:
            device.connected.clear()
            reactor = self.reactors[self.devices.index(device) % len(self.reactors)]
            device.agent = build_agent(device.config, reactor, observer=_on_started(device.connected))
            if self.resync_s is not None:
                device.agent.settings = replace(device.agent.settings, resync_interval_s=self.resync_s)
            device.agent.start()
        deadline = time.monotonic() + timeout_s
        for device in targets:
            if not device.connected.wait(max(deadline - time.monotonic(), 0.0)):
                missing = [d.thing for d in targets if not d.connected.is_set()]
                raise TimeoutError(f"{len(missing)} agents did not connect in {timeout_s:g} s: {missing[:5]}")

    def start_agent_processes(
        self, devices: list[SimulatedDevice], env: dict[str, str] | None = None, timeout_s: float = 60.0
    ) -> list[subprocess.Popen[bytes]]:
        """Run agents as separate processes (`python -m certrotator.device.standalone.runtime`), as shipped,
        each with its device's environment (its SoftHSM2 configuration) plus `env`; returns once each
        is connected to the engine. `stop_agents` (and closing the fleet) ends them."""
        processes = [self.start_agent_process(d, env) for d in devices]
        # Connected is not enough: until its SUBSCRIBEs are answered an agent cannot hear its job, and a
        # connection lost before then is a fresh start to it, not a resumed one.
        if not (self.wait_connected(devices, timeout_s) and self._wait_subscribed(devices, timeout_s)):
            self.stop_agents()
            logs = [str(d.directory / "agent.log") for d in devices]
            raise TimeoutError(f"agent processes did not connect and subscribe in {timeout_s:g} s; see {logs}")
        return processes

    def _wait_cleaned_up(self, job_id: str, timeout_s: float = 10.0) -> None:
        """The terminal clean-up runs just after a status change commits (local.terminal_work), so a
        reader in another process can see SUCCEEDED before the old certificate is gone: wait (bounded)
        until each succeeded thing holds one certificate; what does not settle, verify() reports."""
        things = [e.thing for e in self.engine.executions(job_id) if e.status is JobExecutionStatus.SUCCEEDED]
        if things:
            self.engine.wait_for(
                lambda: all(len(ids) == 1 for ids in self.engine.attached_certificates(things).values()),
                timeout_s,
                0.05,
            )

    def _wait_subscribed(self, devices: list[SimulatedDevice], timeout_s: float) -> bool:
        def subscribed() -> bool:
            return all(AGENT_SUBSCRIBED_LOG in (d.directory / "agent.log").read_text(errors="replace") for d in devices)

        return self.engine.wait_for(subscribed, timeout_s, 0.05)

    def start_agent_process(
        self, device: SimulatedDevice, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start one device's agent process (not waiting for it to connect); its log is agent.log."""
        command = [sys.executable, "-m", "certrotator.device.standalone.runtime"]
        if self.resync_s is not None:
            command = [sys.executable, "-m", "certrotator.sim.agent_process", "--resync-s", str(self.resync_s)]
        with (device.directory / "agent.log").open("ab") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [*command, str(device.directory / CONFIG_FILE)],
                env={**os.environ, **device.env, **self.device_env.get(device.thing, {}), **(env or {})},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.processes.append(process)
        self.agent_processes[device.thing] = process
        return process

    def wait_connected(
        self, devices: list[SimulatedDevice], timeout_s: float, certificates: dict[str, str] | None = None
    ) -> bool:
        """Wait until each device has a live connection (with `certificates[thing]`, if given)."""
        wanted = {d.thing for d in devices}

        def connected() -> bool:
            live = {(c.thing, c.principal) for c in self.engine.connections()}
            if certificates is None:
                return wanted <= {thing for thing, _ in live}
            return {(t, certificates[t]) for t in wanted} <= live

        return self.engine.wait_for(connected, timeout_s, tick_s=0.05)

    def stop_agents(self) -> None:
        """Stop every agent: those on reactor threads, and agent processes (SIGTERM, then SIGKILL)."""
        for device in self.devices:
            if device.agent is not None:
                device.agent.stop()
                device.agent = None
        processes, self.processes = self.processes, []
        self.agent_processes.clear()
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def statuses(self, job_id: str) -> dict[str, str]:
        return {e.thing: e.status.value for e in self.engine.executions(job_id)}

    def run_job(
        self,
        job_id: str,
        group: str = "fleet",
        timeout_s: float = 600.0,
        progress: Progress | None = None,
        **job_options: Any,
    ) -> JobReport:
        """Create a rotation job for the group (`job_options`: the other `JobRequest` fields) and wait
        until every execution is terminal."""
        for device in self.devices:
            device.certificate_before_job = device.certificate_id()
        started = time.monotonic()
        self.engine.create_job(JobRequest(job_id, groups=(group,), **job_options))
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

        def done() -> bool:
            counts = self.engine.status_counts(job_id)
            if progress is not None:
                progress(counts, time.monotonic() - started)
            return bool(counts) and not any(counts.get(s) for s in OPEN)

        finished = self.engine.wait_for(done, timeout_s, tick_s=0.25)
        duration = time.monotonic() - started
        if finished:
            self._wait_cleaned_up(job_id)
        executions = self.engine.executions(job_id)
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
        rotated = [
            t for t, s in report.statuses.items() if s == JobExecutionStatus.SUCCEEDED and t in by_thing
        ]
        attached = self.engine.attached_certificates(rotated)
        registered = set(self.engine.certificate_ids())
        live: dict[str, set[str]] = {}
        for c in self.engine.connections():
            live.setdefault(c.thing, set()).add(c.principal)
        notified = {n.get("thingName") for n in self.engine.notifications(report.job_id)}
        for thing in rotated:
            device = by_thing[thing]
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
                    attached[thing] == [new_id],
                    f"registry attaches {len(attached[thing])} certificate(s), not just the new one",
                ),
                (
                    device.certificate_before_job not in registered,
                    "the old certificate is still in the registry",
                ),
                (new_id in live.get(thing, set()), "the device is not connected with its new certificate"),
                (thing not in notified, "a notification was sent for a successful rotation"),
            ]
            report.problems.extend(Problem(thing, what) for ok, what in checks if not ok)


def _on_started(flag: threading.Event) -> Observer:
    """An agent observer that raises `flag` once the agent is connected and subscribed."""

    def observe(_state: machine.State, event: machine.Event, _actions: list[machine.Action]) -> None:
        if isinstance(event, machine.Started):
            flag.set()

    return observe
