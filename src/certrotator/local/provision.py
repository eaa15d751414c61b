"""Provision a thing on the local IoT Core as an installer would: key pair, certificate from a local
issuer, registry entries, and a credentials directory the device agent can run from.

`device.toml` is written whole from a `ProvisionRequest`: every setting a caller needs (state timeout,
a PKCS#11 token instead of a key file, the first certificate's validity) is a field, so nobody edits
the generated file afterwards.

The PKCS#11 section is the standalone agent's own record (`Pkcs11Settings`), not a shape of ours: one
description of "where the key is" for the reader and the writer of device.toml.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from certrotator import crypto
from certrotator.device.standalone.config import Pkcs11Settings
from certrotator.fsutil import atomic_write
from certrotator.local.ca import IssuerName, LocalCa
from certrotator.local.registry import LocalRegistry

CERT_FILE = "device.pem.crt"
KEY_FILE = "private.pem.key"
ROOT_CA_FILE = "AmazonRootCA1.pem"
CONFIG_FILE = "device.toml"
DEVICE_POLICY = "CertificateRotatorDevicePolicy"
DEFAULT_STATE_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ProvisionRequest:
    """One thing to provision, and everything its device.toml says besides the broker's address."""

    thing: str
    directory: Path  # the credentials directory to write
    group: str | None = None
    key_algorithm: crypto.KeyAlgorithm = crypto.KeyAlgorithm.ECDSA_P256
    signing_algorithm: crypto.SigningAlgorithm | None = None  # None: the key family's SHA-256 default
    issuer: IssuerName = IssuerName.IOT
    validity_days: int | None = None  # of the first certificate; None: the issuer's own
    state_timeout_s: float = DEFAULT_STATE_TIMEOUT_S
    # The key lives in this PKCS#11 token (no key file is written): give its public half, from which
    # the first certificate is issued.
    pkcs11: Pkcs11Settings | None = None
    public_key: crypto.PublicKey | None = None

    @property
    def signing(self) -> crypto.SigningAlgorithm:
        return self.signing_algorithm or default_signing_algorithm(self.key_algorithm)


@dataclass(frozen=True, slots=True)
class Provisioned:
    thing: str
    certificate_id: str
    directory: Path


def default_signing_algorithm(key_algorithm: crypto.KeyAlgorithm) -> crypto.SigningAlgorithm:
    if key_algorithm.family is crypto.Family.RSA:
        return crypto.SigningAlgorithm.SHA256WITHRSA
    return crypto.SigningAlgorithm.ECDSA_WITH_SHA256


def _s(value: str | Path) -> str:
    """A TOML basic string (JSON's escapes are a subset of TOML's)."""
    return json.dumps(str(value))


def device_config(request: ProvisionRequest, host: str, port: int) -> str:
    """The whole device.toml of a provisioned thing (paths relative to the file)."""
    if request.pkcs11 is None:
        credentials = ['store = "file"', f"certificate = {_s(CERT_FILE)}", f"private_key = {_s(KEY_FILE)}"]
    else:
        p = request.pkcs11
        credentials = ['store = "pkcs11"', f"library = {_s(p.library)}"]
        if p.token_label is not None:
            credentials.append(f"token_label = {_s(p.token_label)}")
        if p.slot_id is not None:
            credentials.append(f"slot_id = {p.slot_id}")
        credentials += [f"user_pin = {_s(p.user_pin)}", f"key_label = {_s(p.key_label)}"]
        credentials.append(f"certificate = {_s(CERT_FILE)}")
    lines = [
        "# certrotator standalone agent configuration (paths relative to this file)",
        f"thing_name = {_s(request.thing)}",
        f"endpoint = {_s(host)}",
        f"port = {port}",
        f"root_ca = {_s(ROOT_CA_FILE)}",
        "",
        "[credentials]",
        *credentials,
        "",
        "[rotation]",
        f"key_algorithm = {_s(request.key_algorithm.value)}",
        f"signing_algorithm = {_s(request.signing.value)}",
        f"state_timeout_s = {request.state_timeout_s!r}",
    ]
    return "\n".join(lines) + "\n"


def _check(request: ProvisionRequest) -> None:
    crypto.check_family(request.key_algorithm, request.signing)
    if not (math.isfinite(request.state_timeout_s) and request.state_timeout_s > 0):
        raise ValueError(f"state timeout must be positive, got {request.state_timeout_s:g} s")
    if request.validity_days is not None and request.validity_days < 1:
        raise ValueError(f"validity must be at least 1 day, got {request.validity_days}")
    if request.pkcs11 is None and request.public_key is not None:
        raise ValueError("a public key is given only for a key kept in a PKCS#11 token")
    if request.pkcs11 is not None:
        if request.public_key is None:
            raise ValueError("a PKCS#11 device needs the public key of the key in its token")
        found = crypto.key_algorithm_of(request.public_key)
        if found is not request.key_algorithm:
            raise ValueError(
                f"the token's key is {found.value if found else 'of no supported kind'}, "
                f"not {request.key_algorithm.value}"
            )


def provision(
    registry: LocalRegistry, ca: LocalCa, request: ProvisionRequest, host: str = "127.0.0.1", port: int = 8883
) -> Provisioned:
    """Register the thing with its first certificate and write its credentials directory."""
    _check(request)
    thing = request.thing
    if registry.thing_exists(thing) and registry.thing_principals(thing):
        raise ValueError(f"thing {thing!r} is already provisioned with a certificate")
    key = None
    if request.public_key is not None:
        public_key: crypto.PublicKey = request.public_key
    else:
        key = crypto.generate_private_key(request.key_algorithm)
        public_key = key.public_key()
    issuer = ca.issuer(request.issuer)
    if request.validity_days is not None:
        issuer = replace(issuer, validity_days=request.validity_days)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, thing)])
    pem = crypto.certificate_pem(issuer.issue(public_key, subject))

    registry.create_thing(thing)
    certificate_id = registry.add_certificate(pem, request.issuer.value)
    registry.attach_exclusive(thing, certificate_id)
    if registry.policy(DEVICE_POLICY) is None:
        registry.create_policy(DEVICE_POLICY, _device_policy())
    registry.attach_policy(DEVICE_POLICY, certificate_id)
    if request.group:
        registry.add_to_group(request.group, thing)

    out = request.directory
    out.mkdir(parents=True, exist_ok=True)
    if key is not None:
        atomic_write(out / KEY_FILE, crypto.private_key_pem(key), 0o600)
    atomic_write(out / CERT_FILE, pem.encode(), 0o644)
    atomic_write(out / ROOT_CA_FILE, ca.files.root_ca.read_bytes(), 0o644)
    atomic_write(out / CONFIG_FILE, device_config(request, host, port).encode(), 0o644)
    return Provisioned(thing, certificate_id, out)


def provision_thing(
    registry: LocalRegistry,
    ca: LocalCa,
    thing: str,
    out_dir: Path,
    *,
    group: str | None = None,
    key_algorithm: crypto.KeyAlgorithm = crypto.KeyAlgorithm.ECDSA_P256,
    signing_algorithm: crypto.SigningAlgorithm | None = None,
    issuer: IssuerName = IssuerName.IOT,
    validity_days: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8883,
) -> Provisioned:
    """`provision` with a key file, for `certrotator local provision` (its options, one by one)."""
    request = ProvisionRequest(
        thing, out_dir, group, key_algorithm, signing_algorithm, issuer, validity_days=validity_days
    )
    return provision(registry, ca, request, host, port)


def _device_policy() -> dict[str, object]:
    """The IoT policy a rotating device needs (what the Greengrass recipe grants), AWS-shaped."""
    thing = "${iot:Connection.Thing.ThingName}"
    topic = "arn:aws:iot:*:*:topic"
    topicfilter = "arn:aws:iot:*:*:topicfilter"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"arn:aws:iot:*:*:client/{thing}"},
            {
                "Effect": "Allow",
                "Action": ["iot:Publish", "iot:Receive"],
                "Resource": [
                    f"{topic}/$aws/things/{thing}/jobs/*",
                    f"{topic}/awslabs/things/{thing}/certificate/*",
                ],
            },
            {
                "Effect": "Allow",
                "Action": "iot:Subscribe",
                "Resource": [
                    f"{topicfilter}/$aws/things/{thing}/jobs/*",
                    f"{topicfilter}/awslabs/things/{thing}/certificate/*",
                ],
            },
        ],
    }
