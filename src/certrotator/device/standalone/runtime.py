"""Standalone mode (non-Greengrass devices): the agent over direct MQTT with the credentials of a
`device.toml`; a restart is a reconnect with the credentials now in place."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from certrotator.device.agent import Agent, AgentSettings, Observer
from certrotator.device.keystores.base import KeyStore
from certrotator.device.keystores.files import FileKeyStore
from certrotator.device.reactor import Reactor
from certrotator.device.standalone.config import DeviceConfig, load_device_config
from certrotator.device.standalone.transport import FileCredentials, MqttTransport, Pkcs11Credentials

log = logging.getLogger("certrotator.device")


def key_store(config: DeviceConfig) -> KeyStore:
    if config.store == "file":
        assert config.private_key is not None
        return FileKeyStore(config.certificate, config.private_key, config.journal)
    from certrotator.device.keystores.pkcs11.store import store_from_settings  # python-pkcs11 only when used

    assert config.pkcs11 is not None
    return store_from_settings(config.pkcs11, config.certificate, config.journal)


def transport_factory(config: DeviceConfig) -> MqttTransport:
    credentials: FileCredentials | Pkcs11Credentials
    if config.store == "file":
        assert config.private_key is not None
        credentials = FileCredentials(config.certificate, config.private_key)
    else:
        p = config.pkcs11
        assert p is not None
        credentials = Pkcs11Credentials(
            p.library, p.user_pin, p.key_label, config.certificate, p.token_label, p.slot_id
        )
    return MqttTransport(config.endpoint, config.port, config.thing_name, config.root_ca, credentials)


def build_agent(config: DeviceConfig, reactor: Reactor, observer: Observer | None = None) -> Agent:
    settings = AgentSettings(
        config.thing_name, config.key_algorithm, config.signing_algorithm, config.state_timeout_s
    )
    return Agent(
        settings,
        key_store(config),
        lambda: transport_factory(config),
        reactor,
        observer=observer,
        commit_marker=config.journal.with_name(config.journal.name + ".committed"),
    )


def run(config_path: Path) -> None:
    """Run one agent until SIGINT/SIGTERM."""
    config = load_device_config(config_path)
    reactor = Reactor().start()
    agent = build_agent(config, reactor)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    log.info("agent for %s started (%s:%d)", config.thing_name, config.endpoint, config.port)
    stop.wait()
    agent.stop()
    reactor.stop()


if __name__ == "__main__":  # python -m certrotator.device.standalone.runtime device.toml
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(Path(sys.argv[1]))
