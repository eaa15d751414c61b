"""End-to-end harness: the local IoT Core on a thread, real provisioned devices, real agents."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from certrotator import crypto
from certrotator.device.agent import Agent
from certrotator.device.config import DeviceConfig, load_device_config
from certrotator.device.reactor import Reactor
from certrotator.device.standalone import build_agent
from certrotator.local.engine import EngineConfig, LocalIoTCore
from certrotator.local.provision import provision_thing
from certrotator.local.runner import EngineThread
from certrotator.protocol import JobExecutionStatus


@dataclass
class Device:
    thing: str
    directory: Path
    config: DeviceConfig
    first_certificate_id: str
    agent: Agent | None = None

    def key(self) -> crypto.PrivateKey:
        assert self.config.private_key is not None
        return crypto.load_private_key(self.config.private_key.read_bytes())

    def certificate_id(self) -> str:
        return crypto.certificate_id(self.config.certificate.read_bytes())

    def pair_matches(self) -> bool:
        return crypto.certificate_matches_key(self.config.certificate.read_text(), self.key())


@dataclass
class Fleet:
    engine: EngineThread
    root: Path
    reactor: Reactor
    devices: list[Device] = field(default_factory=list)

    def provision(
        self,
        count: int,
        group: str = "fleet",
        key_algorithm: crypto.KeyAlgorithm = crypto.KeyAlgorithm.ECDSA_P256,
        signing_algorithm: crypto.SigningAlgorithm | None = None,
        timeout_s: float = 5.0,
    ) -> list[Device]:
        made = []
        for i in range(count):
            thing = f"{group}-{len(self.devices) + i:03d}"
            directory = self.root / "devices" / thing

            def provision(engine: LocalIoTCore, thing: str = thing, directory: Path = directory) -> str:
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

            cert_id = self.engine.call(provision)
            toml = directory / "device.toml"
            toml.write_text(
                toml.read_text().replace("state_timeout_s = 30", f"state_timeout_s = {timeout_s}")
            )
            made.append(Device(thing, directory, load_device_config(toml), cert_id))
        self.devices.extend(made)
        return made

    def start_agents(self, devices: list[Device] | None = None) -> None:
        for device in devices or self.devices:
            device.agent = build_agent(device.config, self.reactor)
            device.agent.start()

    def stop_agents(self) -> None:
        for device in self.devices:
            if device.agent is not None:
                device.agent.stop()
                device.agent = None

    def statuses(self, job_id: str) -> dict[str, JobExecutionStatus]:
        return {e.thing: e.status for e in self.engine.call(lambda engine: engine.jobs.executions(job_id))}

    def wait_terminal(self, job_id: str, count: int, timeout: float = 60) -> dict[str, JobExecutionStatus]:
        def done(engine: LocalIoTCore) -> bool:
            executions = engine.jobs.executions(job_id)
            return len(executions) == count and all(e.status.is_terminal for e in executions)

        assert self.engine.wait_until(done, timeout), f"job {job_id} not terminal: {self.statuses(job_id)}"
        return self.statuses(job_id)


@contextmanager
def running_fleet(tmp_path: Path, **engine_options: object) -> Iterator[Fleet]:
    config = EngineConfig(tmp_path / "engine", port=0, **engine_options)  # type: ignore[arg-type]
    reactor = Reactor().start()
    with EngineThread(config) as engine:
        fleet = Fleet(engine, tmp_path, reactor)
        try:
            yield fleet
        finally:
            fleet.stop_agents()
            reactor.stop()
