"""Standalone mode (non-Greengrass devices): the agent over direct MQTT with the credentials of a
`device.toml`; a restart is a reconnect with the credentials now in place."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from certrotator.algorithms import CryptoError
from certrotator.device.agent import Agent, AgentSettings, Observer, OnFatal
from certrotator.device.keystores.base import KeyStore, KeyStoreError
from certrotator.device.keystores.files import FileKeyStore
from certrotator.device.reactor import Reactor
from certrotator.device.settings import ConfigError
from certrotator.device.standalone.config import DeviceConfig, load_device_config
from certrotator.device.standalone.transport import FileCredentials, MqttTransport, Pkcs11Credentials
from certrotator.device.startup import STARTUP_FAILED_EXIT_CODE

log = logging.getLogger("certrotator.device")


def key_store(config: DeviceConfig) -> KeyStore:
    if config.store == "file":
        assert config.private_key is not None
        return FileKeyStore(config.certificate, config.private_key, config.journal)
    from certrotator.device.keystores.pkcs11.from_settings import (
        store_from_settings,  # python-pkcs11 only when used
    )

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


def build_agent(
    config: DeviceConfig,
    reactor: Reactor,
    observer: Observer | None = None,
    on_fatal: OnFatal | None = None,
) -> Agent:
    settings = AgentSettings(
        config.thing_name,
        config.key_algorithm,
        config.signing_algorithm,
        config.state_timeout_s,
        startup=config.startup,
        # Every reconnect re-synchronises (the transport reports them); the periodic ask is a safety net.
        resync_interval_s=config.resync_interval_s,
    )
    return Agent(
        settings,
        key_store(config),
        lambda: transport_factory(config),
        reactor,
        observer=observer,
        commit_marker=config.journal.with_name(config.journal.name + ".committed"),
        on_fatal=on_fatal,
    )


class AgentFailed(RuntimeError):
    """The agent gave up (start-up failed, or an unexpected error): the process must end non-zero."""

    def __init__(self, reason: str, exit_code: int) -> None:
        super().__init__(reason)
        self.exit_code = exit_code


def run(config_path: Path) -> None:
    """Run one agent until SIGINT/SIGTERM. Raises AgentFailed when the agent gives up, ConfigError for
    a configuration that cannot work, KeyStoreError for a key store that cannot even be opened."""
    config = load_device_config(config_path)
    reactor = Reactor().start()
    stop = threading.Event()
    failed: list[AgentFailed] = []

    def fatal(reason: str, exit_code: int) -> None:
        failed.append(AgentFailed(reason, exit_code))
        stop.set()

    try:
        agent = build_agent(config, reactor, on_fatal=fatal)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        agent.start()
        log.info("agent for %s started (%s:%d)", config.thing_name, config.endpoint, config.port)
        stop.wait()
        agent.stop()
    finally:
        reactor.stop()
    if failed:
        raise failed[0]


def main(argv: list[str]) -> int:
    """`python -m certrotator.device.standalone.runtime device.toml`: the exit status is the outcome."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        print("usage: python -m certrotator.device.standalone.runtime DEVICE_TOML", file=sys.stderr)
        return 2
    try:
        run(Path(argv[0]))
    except AgentFailed as exc:
        print(f"error: agent stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ConfigError, CryptoError) as exc:
        print(f"error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except KeyStoreError as exc:
        print(f"error: cannot open the key store: {exc}", file=sys.stderr)
        return STARTUP_FAILED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
