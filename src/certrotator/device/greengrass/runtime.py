"""Greengrass mode: the agent as the `aws.greengrass.labs.CertificateRotator`-compatible component.

Assembly mirrors `standalone.py`, with three Greengrass specifics:

* Credentials are the nucleus's own: `system.certificateFilePath` / `system.privateKeyPath` (files or
  `pkcs11:` URIs), found as `greengrass_config` describes.
* Settings come from the component configuration over IPC (`keyAlgorithm`, `signingAlgorithm`,
  optional `stateTimeoutSeconds`); `greengrass_settings` validates proposed changes, so an invalid
  deployment fails, and applies accepted ones live.
* A restart after new credentials were installed (or rolled back) means the nucleus must reconnect
  with them: the process exits with RESTART_EXIT_CODE, after flushing its last publishes, and the
  recipe's run script restarts the Greengrass service (systemd on Linux, the Windows service).
  A plain connection failure does not touch credentials, so it only resubscribes, with back-off.

The component cannot see the nucleus's MQTT connection, so it cannot re-synchronise when it comes back
(see `greengrass.transport`); it asks `$next/get` every RESYNC_INTERVAL_S while idle instead.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

from certrotator.device import machine as m
from certrotator.device.agent import Agent, AgentSettings, Observer, OnFatal
from certrotator.device.greengrass.component_settings import (
    ComponentSettings,
    ConfigIpc,
    ConfigurationWatcher,
    parse_component_configuration,
)
from certrotator.device.greengrass.nucleus_config import (
    NucleusCredentials,
    canonical_provider_keys,
    is_unset,
    resolve_nucleus_credentials,
)
from certrotator.device.greengrass.transport import GreengrassTransport, IotCoreIpc
from certrotator.device.keystores.base import KeyStore
from certrotator.device.keystores.files import FileKeyStore
from certrotator.device.keystores.pkcs11.location import PKCS11_PROVIDER
from certrotator.device.reactor import Reactor
from certrotator.device.settings import ConfigError

log = logging.getLogger("certrotator.device")

# sysexits EX_TEMPFAIL: "try again" -- the run script restarts the Greengrass service on this code.
RESTART_EXIT_CODE = 75
JOURNAL_FILE = "certrotator-journal.json"
# Where the certificate is kept as a file when the nucleus keeps it in the token (the store keeps both).
TOKEN_CERTIFICATE_FILE = "certificate.pem.crt"
FLUSH_TIMEOUT_S = 5.0
# While idle, ask $next/get this often (+-20%): the nucleus's persistent session keeps QoS 1 messages
# for 1 hour by default, so a notify-next is lost only after a longer outage, and is then found within
# an hour of the reconnect. One small request an hour per device.
RESYNC_INTERVAL_S = 3600.0


class GreengrassIpc(IotCoreIpc, ConfigIpc, Protocol):
    def close(self, *, executor_wait: bool = True) -> Future[Any]: ...


def key_store(credentials: NucleusCredentials, work: Path, client: ConfigIpc) -> KeyStore:
    journal = work / JOURNAL_FILE
    if not credentials.uses_pkcs11:
        if credentials.certificate.startswith("pkcs11:"):
            raise ConfigError(
                "the nucleus keeps its certificate in a PKCS#11 token but its private key in a file "
                f"({credentials.private_key}); this combination is not supported"
            )
        return FileKeyStore(Path(credentials.certificate), Path(credentials.private_key), journal)
    provider = dict(credentials.pkcs11_provider)
    if is_unset(provider.get("library")):
        # Not in the nucleus files (e.g. a fresh deployment): ask the nucleus for the provider's configuration.
        value = client.get_configuration(component_name=PKCS11_PROVIDER, key_path=[]).value
        provider = canonical_provider_keys(value or {})
    if is_unset(provider.get("library")):
        raise ConfigError(
            f"the nucleus key is in PKCS#11 ({credentials.private_key}) but {PKCS11_PROVIDER} has no library configured"
        )
    from certrotator.device.keystores.pkcs11.from_settings import (
        store_from_greengrass,  # python-pkcs11 only when used
    )

    certificate_file = (
        work / TOKEN_CERTIFICATE_FILE
        if credentials.certificate.startswith("pkcs11:")
        else Path(credentials.certificate)
    )
    store: KeyStore = store_from_greengrass(
        provider, credentials.certificate, credentials.private_key, certificate_file, journal
    )
    return store


class GreengrassAgent:
    """The agent wired to Greengrass: IPC transport, nucleus credentials, live configuration.

    `on_restart` is called when new credentials (or the restored old ones) must be picked up by the
    nucleus; it returns True when it handled that (production: exit), False to just resubscribe
    (tests, where a stand-in nucleus reconnects itself).
    """

    def __init__(
        self,
        client: GreengrassIpc,
        thing: str,
        root: Path,
        work: Path,
        reactor: Reactor,
        on_restart: Callable[[m.Restart], bool],
        observer: Observer | None = None,
        on_fatal: OnFatal | None = None,
        resync_interval_s: float | None = RESYNC_INTERVAL_S,
    ) -> None:
        self.client, self.thing = client, thing
        self.credentials = resolve_nucleus_credentials(root)
        self.store_kind = "pkcs11" if self.credentials.uses_pkcs11 else "file"
        log.info(
            "nucleus credentials: certificate %s, key %s (%s)",
            self.credentials.certificate,
            self.credentials.private_key,
            ", ".join(f"{k} from {v}" for k, v in self.credentials.sources.items()),
        )
        settings = parse_component_configuration(client.get_configuration(key_path=[]).value, self.store_kind)
        work.mkdir(parents=True, exist_ok=True)  # the journal lives there
        self.on_restart = on_restart
        self.user_observer = observer
        self.transports: list[GreengrassTransport] = []
        self._restart_action: m.Restart | None = None
        self.agent = Agent(
            AgentSettings(
                thing,
                settings.key_algorithm,
                settings.signing_algorithm,
                settings.state_timeout_s,
                resync_interval_s=resync_interval_s,
            ),
            key_store(self.credentials, work, client),
            self._new_transport,
            reactor,
            restart=self._restart,
            observer=self._observe,
            on_fatal=on_fatal,
        )
        self.watcher = ConfigurationWatcher(client, self.store_kind, self._apply)

    def _new_transport(self) -> GreengrassTransport:
        transport = GreengrassTransport(self.client, self.thing)
        self.transports = [t for t in self.transports if not t.flush(0)] + [transport]
        return transport

    def _observe(self, state: m.State, event: m.Event, actions: list[m.Action]) -> None:
        # The restart hook only gets a reason; the Restart action itself says whether credentials
        # changed (no back-off) or a connection merely failed (back-off).
        self._restart_action = next((a for a in actions if isinstance(a, m.Restart)), None)
        if self.user_observer is not None:
            self.user_observer(state, event, actions)

    def _restart(self, reason: str) -> bool:
        action = self._restart_action or m.Restart(reason)
        if action.backoff:
            return False  # credentials unchanged: resubscribe through the same nucleus
        return self.on_restart(action)

    def _apply(self, settings: ComponentSettings) -> None:
        log.info(
            "configuration applied: %s / %s, state timeout %g s",
            settings.key_algorithm.value,
            settings.signing_algorithm.value,
            settings.state_timeout_s,
        )
        self.agent.reconfigure(settings.key_algorithm, settings.signing_algorithm, settings.state_timeout_s)

    def start(self) -> None:
        self.watcher.start()
        self.agent.start()

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        return all(t.flush(max(deadline - time.monotonic(), 0.0)) for t in self.transports)

    def close(self) -> None:
        self.watcher.close()


def connect_ipc(attempts: int = 10, delay_s: float = 3.0) -> GreengrassIpc:
    """Connect to the nucleus's IPC server. Connecting can time out while the nucleus is busy (the seed
    retried for that reason), so a few attempts before giving up (the nucleus then restarts us)."""
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    for attempt in range(1, attempts + 1):
        try:
            client: GreengrassIpc = GreengrassCoreIPCClientV2()
            return client
        except Exception as exc:
            if attempt == attempts:
                raise
            log.warning("connecting to Greengrass IPC failed (%s); attempt %d of %d", exc, attempt, attempts)
            time.sleep(delay_s)
    raise AssertionError("unreachable")


def run(
    root: Path, work: Path | None = None, client_factory: Callable[[], GreengrassIpc] | None = None
) -> int:
    """Run the component until SIGTERM/SIGINT (exit 0) or until the nucleus must reconnect with changed
    credentials (exit RESTART_EXIT_CODE, for the recipe to restart the Greengrass service), or until the
    agent gives up (the exit status it names: the nucleus restarts a component that fails).
    Raises ConfigError for a configuration that cannot work."""
    thing = os.environ.get("AWS_IOT_THING_NAME", "")
    if not thing:
        raise ConfigError("AWS_IOT_THING_NAME is not set: --greengrass runs as a Greengrass component")
    if not (root / "config").is_dir():
        raise ConfigError(
            f"{root} is not a Greengrass root (no config/ directory); pass --root {{kernel:rootPath}}"
        )
    work = work or Path.cwd()
    client = (client_factory or connect_ipc)()
    done = threading.Event()
    exit_code = 0

    def exit_for_restart(action: m.Restart) -> bool:
        nonlocal exit_code
        log.info("exiting for a Greengrass restart: %s", action.reason)
        exit_code = RESTART_EXIT_CODE
        done.set()
        return True

    def fatal(reason: str, code: int) -> None:
        nonlocal exit_code
        log.error("exiting: %s", reason)
        exit_code = code
        done.set()

    reactor = Reactor().start()
    component: GreengrassAgent | None = None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        component = GreengrassAgent(client, thing, root, work, reactor, exit_for_restart, on_fatal=fatal)
        for sig in previous:
            signal.signal(sig, lambda *_: done.set())  # Greengrass stops a component with SIGTERM
        component.start()
        log.info("certificate rotator for %s running (store: %s)", thing, component.store_kind)
        while not done.wait(1.0):  # a bounded wait: Ctrl+C must get through on Windows too
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if component is not None:
            component.agent.stop()
        reactor.stop()  # after this, no more publishes can be started
        if component is not None:
            if not component.flush():
                log.warning("some publishes were still in flight at exit")
            component.close()
        client.close()
    return exit_code
