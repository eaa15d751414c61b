"""Configuration of the PKCS#11 key store: Greengrass-style `pkcs11:` URIs plus library, token and PIN.

Kept free of python-pkcs11 so that configuration can be validated (and a bad one refused) on machines
where the device extra is not installed.

Greengrass names the key and certificate with RFC 7512 URIs such as
`pkcs11:object=greengrass_privatekey;type=private` and `pkcs11:object=greengrass_cert;type=cert`; the
`aws.greengrass.crypto.Pkcs11Provider` component adds the library path, slot and user PIN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote

from certrotator.crypto import CryptoError, KeyAlgorithm

PKCS11_PROVIDER = "aws.greengrass.crypto.Pkcs11Provider"

# Labels the store derives from the configured ones while a rotation is in flight.
NEW_SUFFIX = ".new"
BACKUP_SUFFIX = ".bak"

# RFC 7512 path attributes; only object/type/token matter here, the others are accepted and ignored
# so that URIs written for other tools still parse.
_KNOWN_PATH_ATTRIBUTES = frozenset(
    {
        "object",
        "type",
        "token",
        "id",
        "manufacturer",
        "model",
        "serial",
        "library-description",
        "library-manufacturer",
        "library-version",
        "slot-description",
        "slot-id",
        "slot-manufacturer",
    }
)

P521_REFUSAL = (
    "keyAlgorithm ECDSA-P521 cannot be used with a PKCS#11 (HSM) key: the AWS IoT Device SDK's "
    "TLS stack cannot sign with P-521 token keys (AWS_ERROR_PKCS11_ENCODING_ERROR, awslabs/aws-c-io "
    "issue #591); use ECDSA-P256 or ECDSA-P384 for keys in a PKCS#11 token"
)


class Pkcs11ConfigError(CryptoError):
    """The PKCS#11 configuration is unusable; the text says why."""


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI the store uses."""

    object: str
    type: str
    token: str | None = None
    slot_id: int | None = None
    pin_value: str | None = None
    module_path: str | None = None


def parse_pkcs11_uri(uri: str, expected_type: str) -> Pkcs11Uri:
    """Parse `pkcs11:object=LABEL;type=private` (RFC 7512); `expected_type` is `private` or `cert`."""
    if not uri.startswith("pkcs11:"):
        raise Pkcs11ConfigError(
            f"{uri!r} is not a PKCS#11 URI (expected pkcs11:object=LABEL;type={expected_type})"
        )
    body = uri[len("pkcs11:") :]
    path, _, query = body.partition("?")
    attributes: dict[str, str] = {}
    for part in filter(None, path.split(";")):
        name, sep, value = part.partition("=")
        if not sep:
            raise Pkcs11ConfigError(f"PKCS#11 URI {uri!r}: attribute {part!r} has no value")
        name = name.strip().lower()
        if name not in _KNOWN_PATH_ATTRIBUTES:
            raise Pkcs11ConfigError(f"PKCS#11 URI {uri!r}: unknown attribute {name!r}")
        if name in attributes:
            raise Pkcs11ConfigError(f"PKCS#11 URI {uri!r}: attribute {name!r} given twice")
        attributes[name] = unquote(value)
    queries: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        name, _, value = part.partition("=")
        queries[name.strip().lower()] = unquote(value)

    label = attributes.get("object", "")
    if not label:
        raise Pkcs11ConfigError(f"PKCS#11 URI {uri!r} has no object=LABEL: the store finds objects by label")
    kind = attributes.get("type", expected_type).lower()
    if kind != expected_type:
        raise Pkcs11ConfigError(f"PKCS#11 URI {uri!r} has type={kind}; expected type={expected_type}")
    slot: int | None = None
    if "slot-id" in attributes:
        try:
            slot = int(attributes["slot-id"])
        except ValueError:
            raise Pkcs11ConfigError(f"PKCS#11 URI {uri!r}: slot-id is not a number") from None
    return Pkcs11Uri(
        object=label,
        type=kind,
        token=attributes.get("token") or None,
        slot_id=slot,
        pin_value=queries.get("pin-value") or None,
        module_path=queries.get("module-path") or None,
    )


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    """Where the device key and certificate live in a PKCS#11 token.

    Prefer `token_label` over `slot_id`: SoftHSM (and some HSMs) renumber the slot when a token is
    initialised, while the label stays.
    """

    library: Path
    key_label: str
    certificate_label: str
    user_pin: str
    token_label: str | None = None
    slot_id: int | None = None

    def __post_init__(self) -> None:
        if str(self.library) in ("", "."):
            raise Pkcs11ConfigError("PKCS#11 configuration needs the path of the token's library (.so/.dll)")
        if self.token_label is None and self.slot_id is None:
            raise Pkcs11ConfigError("PKCS#11 configuration needs a token label (preferred) or a slot id")
        if not self.user_pin:
            raise Pkcs11ConfigError("PKCS#11 configuration needs the token's user PIN")
        for what, label in (("private key", self.key_label), ("certificate", self.certificate_label)):
            if not label:
                raise Pkcs11ConfigError(f"PKCS#11 {what} label is empty")
            # The store relabels to LABEL.new / LABEL.bak during a rotation; a configured label with
            # such a suffix would be mistaken for a leftover and destroyed by recovery.
            if label.endswith((NEW_SUFFIX, BACKUP_SUFFIX)):
                raise Pkcs11ConfigError(
                    f"PKCS#11 {what} label {label!r} must not end with {NEW_SUFFIX!r} or {BACKUP_SUFFIX!r} "
                    "(the store uses those suffixes during a rotation)"
                )

    @classmethod
    def from_uris(
        cls,
        *,
        library: str | Path,
        private_key_uri: str,
        certificate_uri: str,
        user_pin: str | None = None,
        token_label: str | None = None,
        slot_id: int | None = None,
    ) -> Pkcs11Config:
        """Build from Greengrass-style URIs; token, slot and PIN may come from the URIs or the arguments
        (the Pkcs11Provider configuration), and must agree where both give them."""
        key = parse_pkcs11_uri(private_key_uri, "private")
        cert = parse_pkcs11_uri(certificate_uri, "cert")

        token = _agreed("token label", token_label, key.token, cert.token)
        slot = _agreed("slot id", slot_id, key.slot_id, cert.slot_id)
        pin = _agreed("user PIN", user_pin, key.pin_value, cert.pin_value, secret=True)
        return cls(
            library=Path(library),
            key_label=key.object,
            certificate_label=cert.object,
            user_pin=pin or "",
            token_label=token,
            slot_id=slot,
        )

    def validate(self, key_algorithm: KeyAlgorithm) -> None:
        """Refuse a key algorithm the token key could not be used with; raises Pkcs11ConfigError."""
        if key_algorithm is KeyAlgorithm.ECDSA_P521:
            raise Pkcs11ConfigError(P521_REFUSAL)

    @property
    def private_key_uri(self) -> str:
        return f"pkcs11:object={quote(self.key_label, safe='')};type=private"

    @property
    def certificate_uri(self) -> str:
        return f"pkcs11:object={quote(self.certificate_label, safe='')};type=cert"


T = TypeVar("T")


def _agreed(what: str, *values: T | None, secret: bool = False) -> T | None:
    """The one value given (or None); different values in the URIs and the arguments are an error."""
    given = [v for v in values if v is not None]
    if any(v != given[0] for v in given[1:]):
        shown = "(values not shown)" if secret else ", ".join(sorted({str(v) for v in given}))
        raise Pkcs11ConfigError(f"PKCS#11 configuration names different {what}s: {shown}")
    return given[0] if given else None
