"""Provision a thing on the local IoT Core as an installer would: key pair, certificate from a local
issuer, registry entries, and a credentials directory the device agent can run from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from certrotator import crypto
from certrotator.fsutil import atomic_write
from certrotator.local.ca import IssuerName, LocalCa
from certrotator.local.registry import LocalRegistry

CERT_FILE = "device.pem.crt"
KEY_FILE = "private.pem.key"
ROOT_CA_FILE = "AmazonRootCA1.pem"
CONFIG_FILE = "device.toml"
DEVICE_POLICY = "CertificateRotatorDevicePolicy"


@dataclass(frozen=True, slots=True)
class Provisioned:
    thing: str
    certificate_id: str
    directory: Path


def device_config(
    thing: str,
    host: str,
    port: int,
    key_algorithm: crypto.KeyAlgorithm,
    signing_algorithm: crypto.SigningAlgorithm,
) -> str:
    return f"""# certrotator standalone agent configuration (paths relative to this file)
thing_name = "{thing}"
endpoint = "{host}"
port = {port}
root_ca = "{ROOT_CA_FILE}"

[credentials]
store = "file"
certificate = "{CERT_FILE}"
private_key = "{KEY_FILE}"

[rotation]
key_algorithm = "{key_algorithm.value}"
signing_algorithm = "{signing_algorithm.value}"
state_timeout_s = 30
"""


def default_signing_algorithm(key_algorithm: crypto.KeyAlgorithm) -> crypto.SigningAlgorithm:
    if key_algorithm.family is crypto.Family.RSA:
        return crypto.SigningAlgorithm.SHA256WITHRSA
    return crypto.SigningAlgorithm.ECDSA_WITH_SHA256


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
    host: str = "127.0.0.1",
    port: int = 8883,
) -> Provisioned:
    signing = signing_algorithm or default_signing_algorithm(key_algorithm)
    crypto.check_family(key_algorithm, signing)
    if registry.thing_exists(thing) and registry.thing_principals(thing):
        raise ValueError(f"thing {thing!r} is already provisioned with a certificate")
    key = crypto.generate_private_key(key_algorithm)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, thing)])
    cert = ca.issuer(issuer).issue(key.public_key(), subject)
    pem = crypto.certificate_pem(cert)

    registry.create_thing(thing)
    certificate_id = registry.add_certificate(pem, issuer.value)
    registry.attach_exclusive(thing, certificate_id)
    if registry.policy(DEVICE_POLICY) is None:
        registry.create_policy(DEVICE_POLICY, _device_policy())
    registry.attach_policy(DEVICE_POLICY, certificate_id)
    if group:
        registry.add_to_group(group, thing)

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / KEY_FILE, crypto.private_key_pem(key), 0o600)
    atomic_write(out_dir / CERT_FILE, pem.encode(), 0o644)
    atomic_write(out_dir / ROOT_CA_FILE, ca.files.root_ca.read_bytes(), 0o644)
    atomic_write(
        out_dir / CONFIG_FILE, device_config(thing, host, port, key_algorithm, signing).encode(), 0o644
    )
    return Provisioned(thing, certificate_id, out_dir)


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
