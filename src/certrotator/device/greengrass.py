"""Greengrass mode: the agent as the `aws.greengrass.labs.CertificateRotator`-compatible component.

Assembly mirrors `standalone.py`, with three Greengrass specifics:

* Credentials are the nucleus's own: `system.certificateFilePath` / `system.privateKeyPath` (files or
  `pkcs11:` URIs) from `<root>/config/effectiveConfig.yaml`; where that file has them empty (fleet
  provisioning writes it before the provisioning plugin has run, seed #120) the latest values in the
  transaction log `<root>/config/config.tlog`; else the installer's defaults.
* Settings come from the component configuration over IPC (`keyAlgorithm`, `signingAlgorithm`,
  optional `stateTimeoutSeconds`). Proposed changes are validated on the validate-configuration stream
  and REJECTED with the reason, so an invalid deployment fails; accepted ones are applied live.
* A restart after new credentials were installed (or rolled back) means the nucleus must reconnect
  with them: the process exits with RESTART_EXIT_CODE, after flushing its last publishes, and the
  recipe's run script restarts the Greengrass service (systemd on Linux, the Windows service).
  A plain connection failure does not touch credentials, so it only resubscribes, with back-off.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from certrotator import crypto
from certrotator.device import machine as m
from certrotator.device.agent import Agent, AgentSettings, Observer
from certrotator.device.config import ConfigError, validate_algorithms
from certrotator.device.keystores.base import KeyStore
from certrotator.device.keystores.files import FileKeyStore
from certrotator.device.reactor import Reactor
from certrotator.device.transports.greengrass import (
    GreengrassTransport,
    IotCoreIpc,
    StreamOperation,
    describe,
)

log = logging.getLogger("certrotator.device")

# sysexits EX_TEMPFAIL: "try again" -- the run script restarts the Greengrass service on this code.
RESTART_EXIT_CODE = 75
PKCS11_PROVIDER = "aws.greengrass.crypto.Pkcs11Provider"
JOURNAL_FILE = "certrotator-journal.json"
# Where the certificate is kept as a file when the nucleus keeps it in the token (the store keeps both).
TOKEN_CERTIFICATE_FILE = "certificate.pem.crt"
DEFAULT_KEY_ALGORITHM = "RSA-2048"
DEFAULT_SIGNING_ALGORITHM = "SHA256WITHRSA"
DEFAULT_STATE_TIMEOUT_S = 30.0
FLUSH_TIMEOUT_S = 5.0


# ----------------------------------------------------------------------------- nucleus configuration

# The installer's defaults (`--provision true` writes the credentials under the root with these names).
_DEFAULT_FILES = {
    "certificateFilePath": "thingCert.crt",
    "privateKeyPath": "privKey.key",
    "rootCaPath": "rootCA.pem",
}
_PROVIDER_KEYS = ("name", "library", "slot", "userPin")


@dataclass(frozen=True, slots=True)
class NucleusCredentials:
    certificate: str  # a file path or a pkcs11: URI
    private_key: str
    root_ca: str
    pkcs11_provider: dict[str, Any] = field(default_factory=dict)  # name, library, slot, userPin
    sources: dict[str, str] = field(default_factory=dict)  # setting -> where its value came from

    @property
    def uses_pkcs11(self) -> bool:
        return self.private_key.startswith("pkcs11:")


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _lookup(tree: Any, path: Sequence[str]) -> Any:
    """Nested lookup; Greengrass configuration keys are case-insensitive."""
    node = tree
    for part in path:
        if not isinstance(node, Mapping):
            return None
        wanted = part.lower()
        node = next((v for k, v in node.items() if str(k).lower() == wanted), None)
    return node


def read_effective_config(path: Path) -> dict[str, Any]:
    """`effectiveConfig.yaml` as a dict; {} when missing or unreadable (the tlog and defaults follow)."""
    import yaml  # the device extra; not needed to import this module (component build does)

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        log.info("%s not found; using config.tlog and defaults", path)
        return {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        log.warning("cannot read %s (%s); using config.tlog and defaults", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _tlog_entry(line: str) -> tuple[tuple[str, ...], str, float, Any] | None:
    """(key path, what happened, timestamp, value) of one transaction log line; None if malformed."""
    try:
        entry = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(entry, dict):
        return None
    topic, what, timestamp = entry.get("TP"), entry.get("W"), entry.get("TS")
    if not isinstance(topic, list) or not topic or not all(isinstance(p, str) for p in topic):
        return None
    if not isinstance(timestamp, int | float) or isinstance(timestamp, bool) or not isinstance(what, str):
        return None
    return tuple(topic), what, float(timestamp), entry.get("V")


def read_tlog(path: Path) -> dict[tuple[str, ...], Any]:
    """Replay the nucleus's transaction log to the latest value of each leaf, keyed by the lowercased
    key path. One JSON object per line: `{"TS": ms, "TP": [key, ...], "W": what, "V": value}`.

    As the nucleus does when it replays it: `changed` sets a value unless a newer one is already there,
    `removed` deletes the node and everything under it; `childChanged`, `timestampUpdated`,
    `interiorAdded` carry no value. Malformed lines (a torn last line after a power cut) are skipped.
    """
    latest: dict[tuple[str, ...], tuple[float, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("cannot read %s: %s", path, exc)
        return {}
    for number, line in enumerate(lines, 1):
        parsed = _tlog_entry(line) if line.strip() else None
        if parsed is None:
            if line.strip():
                log.debug("%s:%d: not a transaction log entry, skipped", path, number)
            continue
        topic, what, timestamp, value = parsed
        key = tuple(p.lower() for p in topic)  # Greengrass keys are case-insensitive
        if what in ("changed", "initialized"):
            current = latest.get(key)
            if current is None or timestamp >= current[0]:
                latest[key] = (timestamp, value)
        elif what in ("removed", "childRemoved"):
            for existing in [k for k in latest if k[: len(key)] == key]:
                if latest[existing][0] <= timestamp:
                    del latest[existing]
    return {key: value for key, (_timestamp, value) in latest.items()}


def _tlog_subtree(tlog: Mapping[tuple[str, ...], Any], prefix: Sequence[str]) -> dict[str, Any]:
    wanted = tuple(p.lower() for p in prefix)
    return {
        key[len(wanted)]: value
        for key, value in tlog.items()
        if len(key) == len(wanted) + 1 and key[: len(wanted)] == wanted
    }


def _canonical_provider_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    canonical = {k.lower(): k for k in _PROVIDER_KEYS}
    return {canonical.get(str(k).lower(), str(k)): v for k, v in config.items()}


def resolve_nucleus_credentials(root: Path) -> NucleusCredentials:
    """Where the nucleus keeps its certificate, key and root CA, and its PKCS#11 provider settings."""
    config_dir = root / "config"
    effective = read_effective_config(config_dir / "effectiveConfig.yaml")
    tlog = read_tlog(config_dir / "config.tlog")
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for setting, default in _DEFAULT_FILES.items():
        candidates = (
            ("effectiveConfig.yaml", _lookup(effective, ("system", setting))),
            ("config.tlog", tlog.get(("system", setting.lower()))),
            ("default", str(root / default)),
        )
        source, value = next((s, v) for s, v in candidates if not _empty(v))
        text = str(value).strip()
        if source != "default" and not text.startswith("pkcs11:") and not Path(text).is_absolute():
            text = str(root / text)
        values[setting], sources[setting] = text, source

    provider_path = ("services", PKCS11_PROVIDER, "configuration")
    from_yaml = _lookup(effective, provider_path)
    provider = _canonical_provider_keys(_tlog_subtree(tlog, provider_path))
    for key, value in _canonical_provider_keys(from_yaml if isinstance(from_yaml, Mapping) else {}).items():
        if not _empty(value):
            provider[key] = value  # effectiveConfig.yaml first, the tlog fills what it lacks
    provider = {k: v for k, v in provider.items() if not _empty(v)}
    return NucleusCredentials(
        certificate=values["certificateFilePath"],
        private_key=values["privateKeyPath"],
        root_ca=values["rootCaPath"],
        pkcs11_provider=provider,
        sources=sources,
    )


# --------------------------------------------------------------------------- component configuration


@dataclass(frozen=True, slots=True)
class ComponentSettings:
    key_algorithm: crypto.KeyAlgorithm
    signing_algorithm: crypto.SigningAlgorithm
    state_timeout_s: float


def parse_component_configuration(configuration: Mapping[str, Any] | None, store: str) -> ComponentSettings:
    """Validate the component configuration; ConfigError says what is wrong (it becomes the REJECTED
    reason a deployment shows). Absent keys take the recipe's defaults."""
    configuration = configuration or {}
    key = configuration.get("keyAlgorithm", DEFAULT_KEY_ALGORITHM)
    signing = configuration.get("signingAlgorithm", DEFAULT_SIGNING_ALGORITHM)
    for name, value in (("keyAlgorithm", key), ("signingAlgorithm", signing)):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
    key_algorithm, signing_algorithm = validate_algorithms(key, signing, store)
    timeout: Any = configuration.get("stateTimeoutSeconds", DEFAULT_STATE_TIMEOUT_S)
    if isinstance(timeout, str):  # values typed into the console arrive as strings
        try:
            timeout = float(timeout)
        except ValueError:
            raise ConfigError(f"stateTimeoutSeconds must be a number of seconds, got {timeout!r}") from None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise ConfigError(f"stateTimeoutSeconds must be a number of seconds in (0, 3600], got {timeout!r}")
    return ComponentSettings(key_algorithm, signing_algorithm, float(timeout))


class ConfigIpc(Protocol):
    """The configuration part of `GreengrassCoreIPCClientV2` used here."""

    def get_configuration(
        self, *, component_name: str | None = None, key_path: list[str] | None = None
    ) -> Any: ...

    def get_configuration_async(
        self, *, component_name: str | None = None, key_path: list[str] | None = None
    ) -> Future[Any]: ...

    def subscribe_to_validate_configuration_updates(
        self,
        *,
        on_stream_event: Callable[[Any], None] | None = None,
        on_stream_error: Callable[[Exception], bool] | None = None,
        on_stream_closed: Callable[[], None] | None = None,
    ) -> tuple[Any, StreamOperation]: ...

    def subscribe_to_configuration_update(
        self,
        *,
        component_name: str | None = None,
        key_path: list[str] | None = None,
        on_stream_event: Callable[[Any], None] | None = None,
        on_stream_error: Callable[[Exception], bool] | None = None,
        on_stream_closed: Callable[[], None] | None = None,
    ) -> tuple[Any, StreamOperation]: ...

    def send_configuration_validity_report_async(
        self, *, configuration_validity_report: Any = None
    ) -> Future[Any]: ...


class GreengrassIpc(IotCoreIpc, ConfigIpc, Protocol):
    def close(self, *, executor_wait: bool = True) -> Future[Any]: ...


class ConfigurationWatcher:
    """Answers configuration validation requests and applies accepted configuration updates."""

    def __init__(self, client: ConfigIpc, store: str, apply: Callable[[ComponentSettings], None]) -> None:
        self.client, self.store, self.apply = client, store, apply
        self._operations: list[StreamOperation] = []

    def start(self) -> None:
        """Subscribe to both streams; raises if the nucleus refuses (then the component fails to start)."""
        _response, validate = self.client.subscribe_to_validate_configuration_updates(
            on_stream_event=self._validate,
            on_stream_error=_keep_stream("validate-configuration"),
            on_stream_closed=lambda: log.info("validate-configuration stream closed"),
        )
        self._operations.append(validate)
        _response, updates = self.client.subscribe_to_configuration_update(
            key_path=[],  # the whole component configuration
            on_stream_event=self._updated,
            on_stream_error=_keep_stream("configuration-update"),
            on_stream_closed=lambda: log.info("configuration-update stream closed"),
        )
        self._operations.append(updates)

    def check(self, configuration: Mapping[str, Any] | None) -> tuple[bool, str]:
        try:
            settings = parse_component_configuration(configuration, self.store)
        except ConfigError as exc:
            return False, str(exc)
        return True, (
            f"keyAlgorithm {settings.key_algorithm.value}, signingAlgorithm {settings.signing_algorithm.value}, "
            f"stateTimeoutSeconds {settings.state_timeout_s:g}"
        )

    def _validate(self, events: Any) -> None:
        from awsiot.greengrasscoreipc.model import ConfigurationValidityReport, ConfigurationValidityStatus

        event = getattr(events, "validate_configuration_update_event", None)
        if event is None:
            return
        valid, message = self.check(event.configuration)
        status = ConfigurationValidityStatus.ACCEPTED if valid else ConfigurationValidityStatus.REJECTED
        log.info("configuration for deployment %s %s: %s", event.deployment_id, status, message)
        report = ConfigurationValidityReport(
            status=status, deployment_id=event.deployment_id, message=message
        )
        try:
            # The async call: this runs on an IPC callback thread, which must never block on IPC.
            future = self.client.send_configuration_validity_report_async(
                configuration_validity_report=report
            )
        except Exception as exc:
            log.error("cannot report the configuration validity: %s", describe(exc))
            return
        future.add_done_callback(lambda f: _log_failure(f, "reporting the configuration validity"))

    def _updated(self, _events: Any) -> None:
        try:
            future = self.client.get_configuration_async(key_path=[])  # [] = all of it
        except Exception as exc:
            log.error("cannot read the updated configuration: %s", describe(exc))
            return
        future.add_done_callback(self._fetched)

    def _fetched(self, future: Future[Any]) -> None:
        if (error := future.exception()) is not None:
            log.error("cannot read the updated configuration: %s", describe(error))
            return
        try:
            settings = parse_component_configuration(future.result().value, self.store)
        except ConfigError as exc:
            # Only reachable if the nucleus merged a configuration we rejected: keep the last good one.
            log.error("ignoring invalid configuration update: %s", exc)
            return
        self.apply(settings)

    def close(self) -> None:
        for operation in self._operations:
            try:
                operation.close()
            except Exception as exc:
                log.debug("closing a configuration stream failed: %s", exc)
        self._operations.clear()


def _keep_stream(name: str) -> Callable[[Exception], bool]:
    def on_error(error: Exception) -> bool:
        log.warning("%s stream error: %s", name, describe(error))
        return False  # keep the stream open

    return on_error


def _log_failure(future: Future[Any], what: str) -> None:
    if (error := future.exception()) is not None:
        log.error("%s failed: %s", what, describe(error))


# ------------------------------------------------------------------------------------------ assembly


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
    if _empty(provider.get("library")):
        # Not in the nucleus files (e.g. a fresh deployment): ask the nucleus for the provider's configuration.
        value = client.get_configuration(component_name=PKCS11_PROVIDER, key_path=[]).value
        provider = _canonical_provider_keys(value or {})
    if _empty(provider.get("library")):
        raise ConfigError(
            f"the nucleus key is in PKCS#11 ({credentials.private_key}) but {PKCS11_PROVIDER} has no library configured"
        )
    from certrotator.device.keystores.pkcs11 import store_from_greengrass  # python-pkcs11 only when used

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
                thing, settings.key_algorithm, settings.signing_algorithm, settings.state_timeout_s
            ),
            key_store(self.credentials, work, client),
            self._new_transport,
            reactor,
            restart=self._restart,
            observer=self._observe,
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
    credentials (exit RESTART_EXIT_CODE, for the recipe to restart the Greengrass service).
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

    reactor = Reactor().start()
    component: GreengrassAgent | None = None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        component = GreengrassAgent(client, thing, root, work, reactor, exit_for_restart)
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
