"""A Pkcs11KeyStore from each mode's settings: the standalone `device.toml`, or the Greengrass nucleus'
configuration (its `pkcs11:` URIs and the PKCS#11 provider component's)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from certrotator.device.keystores.pkcs11.location import (
    PKCS11_PROVIDER,
    Pkcs11Config,
    Pkcs11ConfigError,
    parse_pkcs11_uri,
)
from certrotator.device.keystores.pkcs11.store import Pkcs11KeyStore


class Pkcs11Settings(Protocol):
    """The PKCS#11 part of a standalone `device.toml` (certrotator.device.standalone.config.Pkcs11Settings)."""

    @property
    def library(self) -> Path: ...
    @property
    def user_pin(self) -> str: ...
    @property
    def key_label(self) -> str: ...
    @property
    def token_label(self) -> str | None: ...
    @property
    def slot_id(self) -> int | None: ...


def store_from_settings(
    settings: Pkcs11Settings, certificate_file: Path, journal_path: Path
) -> Pkcs11KeyStore:
    """Standalone mode: the key pair and the certificate object share the key label (told apart by
    their class), and `certificate_file` is the copy the AWS CRT reads."""
    config = Pkcs11Config(
        library=settings.library,
        key_label=settings.key_label,
        certificate_label=settings.key_label,
        user_pin=settings.user_pin,
        token_label=settings.token_label,
        slot_id=settings.slot_id,
    )
    return Pkcs11KeyStore(config, journal_path, certificate_file)


def store_from_greengrass(
    provider: Mapping[str, Any],
    certificate: str,
    private_key: str,
    certificate_file: Path,
    journal_path: Path,
) -> Pkcs11KeyStore:
    """Greengrass mode: the nucleus' `privateKeyPath` (a `pkcs11:` URI), its `certificateFilePath` (a
    `pkcs11:` URI or a file) and the `aws.greengrass.crypto.Pkcs11Provider` configuration (`library`,
    `slot`, `userPin`). A certificate kept as a file is stored in the token under the key label by
    `recover()`, and the file stays the copy the nucleus reads."""
    slot = provider.get("slot")
    try:
        slot_id = None if slot is None or str(slot).strip() == "" else int(str(slot))
    except ValueError:
        raise Pkcs11ConfigError(f"{PKCS11_PROVIDER} slot {slot!r} is not a number") from None
    pin = provider.get("userPin")
    key = parse_pkcs11_uri(private_key, "private")
    certificate_uri = (
        certificate
        if certificate.startswith("pkcs11:")
        else f"pkcs11:object={quote(key.object, safe='')};type=cert"
    )
    config = Pkcs11Config.from_uris(
        library=str(provider.get("library") or ""),
        private_key_uri=private_key,
        certificate_uri=certificate_uri,
        user_pin=None if pin is None else str(pin),
        slot_id=slot_id,
    )
    return Pkcs11KeyStore(config, journal_path, certificate_file)
