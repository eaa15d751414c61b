"""`device.toml`: the configuration of a standalone (non-Greengrass) device. Every error names the
setting and what would be valid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certrotator import algorithms  # not certrotator.crypto: the agent loads `cryptography` lazily
from certrotator.device.settings import ConfigError, validate_algorithms
from certrotator.device.startup import StartupRetry
from certrotator.tomlcompat import tomllib

DEFAULT_RESYNC_INTERVAL_S = 6 * 3600.0
MIN_RESYNC_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class Pkcs11Settings:
    library: Path
    user_pin: str
    key_label: str
    token_label: str | None
    slot_id: int | None


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    thing_name: str
    endpoint: str
    port: int
    root_ca: Path
    store: str  # "file" | "pkcs11"
    certificate: Path
    private_key: Path | None
    pkcs11: Pkcs11Settings | None
    key_algorithm: algorithms.KeyAlgorithm
    signing_algorithm: algorithms.SigningAlgorithm
    state_timeout_s: float
    journal: Path
    startup: StartupRetry = field(default_factory=StartupRetry)
    # While idle, ask $next/get this often (None: never). Every reconnect re-synchronises anyway; this
    # covers a notify-next or a reply lost on a live connection.
    resync_interval_s: float | None = DEFAULT_RESYNC_INTERVAL_S


def _get(table: dict[str, Any], key: str, kind: type, where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}: '{key}' is required")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def load_device_config(path: Path) -> DeviceConfig:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    base = path.parent

    def rel(value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else base / p

    where = str(path)
    credentials = _get(data, "credentials", dict, where, {})
    rotation = _get(data, "rotation", dict, where, {})
    store = _get(credentials, "store", str, f"{where} [credentials]", "file")
    if store not in ("file", "pkcs11"):
        raise ConfigError(f"{where} [credentials]: store must be 'file' or 'pkcs11', got {store!r}")
    key, signing = validate_algorithms(
        _get(rotation, "key_algorithm", str, f"{where} [rotation]", "RSA-2048"),
        _get(rotation, "signing_algorithm", str, f"{where} [rotation]", "SHA256WITHRSA"),
        store,
    )
    timeout = _get(rotation, "state_timeout_s", float, f"{where} [rotation]", 30.0)
    if timeout <= 0:
        raise ConfigError(f"{where} [rotation]: state_timeout_s must be positive")
    resync = _get(rotation, "resync_interval_s", float, f"{where} [rotation]", DEFAULT_RESYNC_INTERVAL_S)
    if resync != 0 and resync < MIN_RESYNC_INTERVAL_S:
        raise ConfigError(
            f"{where} [rotation]: resync_interval_s must be 0 (never) or at least {MIN_RESYNC_INTERVAL_S:g}"
        )
    port = _get(data, "port", int, where, 8883)
    if not 0 < port < 65536:
        raise ConfigError(f"{where}: port {port} is out of range")
    pkcs11 = None
    private_key = None
    if store == "pkcs11":
        section = f"{where} [credentials]"
        slot = _get(credentials, "slot_id", int, section, None)
        token = _get(credentials, "token_label", str, section, None)
        if slot is None and token is None:
            raise ConfigError(f"{section}: give token_label (preferred: slot numbers change) or slot_id")
        pkcs11 = Pkcs11Settings(
            library=rel(_get(credentials, "library", str, section)),
            user_pin=_get(credentials, "user_pin", str, section),
            key_label=_get(credentials, "key_label", str, section),
            token_label=token,
            slot_id=slot,
        )
    else:
        private_key = rel(_get(credentials, "private_key", str, f"{where} [credentials]"))
    certificate = rel(_get(credentials, "certificate", str, f"{where} [credentials]"))
    return DeviceConfig(
        startup=_startup(_get(data, "startup", dict, where, {}), f"{where} [startup]"),
        thing_name=_get(data, "thing_name", str, where),
        endpoint=_get(data, "endpoint", str, where),
        port=port,
        root_ca=rel(_get(data, "root_ca", str, where)),
        store=store,
        certificate=certificate,
        private_key=private_key,
        pkcs11=pkcs11,
        key_algorithm=key,
        signing_algorithm=signing,
        state_timeout_s=timeout,
        resync_interval_s=resync or None,
        journal=rel(_get(credentials, "journal", str, f"{where} [credentials]", ".certrotator-journal.json")),
    )


def _startup(table: dict[str, Any], where: str) -> StartupRetry:
    """Optional `[startup]`: `attempts` (tries of the start-up step, default 8) and `max_delay_s`
    (the longest wait between tries, default 10) for failures that may pass (a busy token)."""
    default = StartupRetry()
    attempts = _get(table, "attempts", int, where, default.attempts)
    max_delay = _get(table, "max_delay_s", float, where, default.max_delay_s)
    if attempts < 1:
        raise ConfigError(f"{where}: attempts must be at least 1, got {attempts}")
    if max_delay < default.first_delay_s:
        raise ConfigError(
            f"{where}: max_delay_s must be at least {default.first_delay_s:g}, got {max_delay:g}"
        )
    return StartupRetry(attempts=attempts, max_delay_s=max_delay)
