"""Where the Greengrass nucleus keeps its credentials, read from its own configuration files.

`system.certificateFilePath` / `system.privateKeyPath` / `system.rootCaPath` (files or `pkcs11:` URIs)
come from `<root>/config/effectiveConfig.yaml`; where that file has them empty (fleet provisioning
writes it before the provisioning plugin has run, seed #120) from the latest values in the transaction
log `<root>/config/config.tlog`; else the installer's defaults. The configuration of the
`aws.greengrass.crypto.Pkcs11Provider` component (library, slot, user PIN) is merged from both files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certrotator.device.keystores.pkcs11.location import PKCS11_PROVIDER

log = logging.getLogger("certrotator.device")

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


def is_unset(value: Any) -> bool:
    """Whether a configuration value counts as absent: None, or a string of blanks."""
    return value is None or (isinstance(value, str) and not value.strip())


def canonical_provider_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """A Pkcs11Provider configuration with its keys spelt as documented (`userPin`, whatever the case)."""
    canonical = {k.lower(): k for k in _PROVIDER_KEYS}
    return {canonical.get(str(k).lower(), str(k)): v for k, v in config.items()}


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
    import yaml  # the device extra; not needed to import this module (the component build does)

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
        source, value = next((s, v) for s, v in candidates if not is_unset(v))
        text = str(value).strip()
        if source != "default" and not text.startswith("pkcs11:") and not Path(text).is_absolute():
            text = str(root / text)
        values[setting], sources[setting] = text, source

    provider_path = ("services", PKCS11_PROVIDER, "configuration")
    from_yaml = _lookup(effective, provider_path)
    provider = canonical_provider_keys(_tlog_subtree(tlog, provider_path))
    for key, value in canonical_provider_keys(from_yaml if isinstance(from_yaml, Mapping) else {}).items():
        if not is_unset(value):
            provider[key] = value  # effectiveConfig.yaml first, the tlog fills what it lacks
    provider = {k: v for k, v in provider.items() if not is_unset(v)}
    return NucleusCredentials(
        certificate=values["certificateFilePath"],
        private_key=values["privateKeyPath"],
        root_ca=values["rootCaPath"],
        pkcs11_provider=provider,
        sources=sources,
    )
