"""The local CAs' key pairs and certificates in their files (see `local.ca`): loaded and checked when
they exist, created when they are missing, always written atomically (key files owner-only), under a
file lock so that two processes starting at once generate one set."""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certrotator.crypto import (
    CaSigningAlgorithm,
    CryptoError,
    Family,
    KeyAlgorithm,
    PrivateKey,
    certificate_matches_key,
    certificate_pem,
    generate_private_key,
    load_certificate,
)
from certrotator.fsutil import atomic_write

# Long enough to cover AWS_IOT_NOT_AFTER, which the "AWS IoT" issuer puts in every certificate.
CA_VALIDITY: Final = dt.timedelta(days=50 * 365)
SERVER_CERT_VALIDITY: Final = dt.timedelta(days=825)
# Reissue the server certificate at start-up when it has less than this left.
SERVER_CERT_RENEW_BEFORE: Final = dt.timedelta(days=30)
# CA and server certificates start in the past so that a device whose clock is behind still accepts
# them (AWS IoT's own server certificates are months old when a device first sees them); a day covers a
# device clock that has not synchronised yet (the fault matrix runs one 2 minutes, an RTC-less board may
# be hours behind).
_BACKDATE: Final = dt.timedelta(days=1)
_ORGANIZATION: Final = "certrotator local IoT Core"
SERVER_NAMES: Final = ("localhost", "127.0.0.1", "::1")


def ca_signing_algorithm_of(certificate: x509.Certificate) -> CaSigningAlgorithm | None:
    """The algorithm a self-signed CA certificate was signed with (its key's family and the signature's
    hash), which is the algorithm its issuer signs with; None if it is none of the table's."""
    public = certificate.public_key()
    digest = certificate.signature_hash_algorithm
    if digest is None or not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return None
    family = Family.RSA if isinstance(public, rsa.RSAPublicKey) else Family.EC
    return next((a for a in CaSigningAlgorithm if a.family is family and a.hash().name == digest.name), None)


def key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_family(key: PrivateKey) -> Family:
    return Family.RSA if isinstance(key, rsa.RSAPrivateKey) else Family.EC


def local_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _default_algorithm(family: Family) -> CaSigningAlgorithm:
    return CaSigningAlgorithm.SHA256WITHRSA if family is Family.RSA else CaSigningAlgorithm.SHA256WITHECDSA


def existing_algorithm(cert_path: Path, key_path: Path) -> CaSigningAlgorithm | None:
    """What an existing CA signs with: its certificate's algorithm, or (a key whose certificate a crash
    kept from being written) the key family's SHA-256 one; None when there is no CA yet."""
    if cert_path.exists():
        algorithm = ca_signing_algorithm_of(load_certificate(cert_path.read_bytes()))
        if algorithm is not None:
            return algorithm
    if key_path.exists():
        return _default_algorithm(_key_family(_load_key(key_path)))
    return None


def ensure_ca_pair(
    cert_path: Path,
    key_path: Path,
    name: x509.Name,
    signing_algorithm: CaSigningAlgorithm,
    now: dt.datetime,
) -> tuple[x509.Certificate, PrivateKey]:
    """Load a self-signed CA, or create it (RSA-2048 or P-256, after the algorithm's family). The key is
    written before the certificate, so a crash in between leaves a key whose certificate is simply
    created on the next start."""
    cert = load_certificate(cert_path.read_bytes()) if cert_path.exists() else None
    key = _load_key(key_path) if key_path.exists() else None
    if key is None:
        if cert is not None:
            raise CryptoError(f"{cert_path} exists but its private key {key_path} is missing")
        key_algorithm = (
            KeyAlgorithm.RSA_2048 if signing_algorithm.family is Family.RSA else KeyAlgorithm.ECDSA_P256
        )
        key = generate_private_key(key_algorithm)
        atomic_write(key_path, _key_pem(key), 0o600)
    if _key_family(key) is not signing_algorithm.family:
        raise CryptoError(
            f"CA key {key_path} is {_key_family(key).value}, signing algorithm {signing_algorithm.value} "
            f"needs {signing_algorithm.family.value}"
        )
    if cert is None:
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, signing_algorithm.hash())
        )
        atomic_write(cert_path, certificate_pem(cert).encode(), 0o644)
    elif not certificate_matches_key(cert, key):
        raise CryptoError(f"CA certificate {cert_path} does not match its key {key_path}")
    return cert, key


def ensure_server_cert(
    cert_path: Path, key_path: Path, ca_cert: x509.Certificate, ca_key: PrivateKey, now: dt.datetime
) -> None:
    """The broker's TLS certificate for SERVER_NAMES, issued by the server CA; reissued when it is close
    to its end, not issued by `ca_cert` or not matching its key."""
    if cert_path.exists() and key_path.exists():
        cert = load_certificate(cert_path.read_bytes())
        fresh = cert.not_valid_after_utc - now > SERVER_CERT_RENEW_BEFORE
        if fresh and _issued_by(cert, ca_cert) and certificate_matches_key(cert, _load_key(key_path)):
            return
    key = generate_private_key(KeyAlgorithm.ECDSA_P256)
    public = key.public_key()
    names: list[x509.GeneralName] = []
    for name in SERVER_NAMES:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + SERVER_CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, CaSigningAlgorithm.SHA256WITHECDSA.hash())
    )
    # Key first: a crash before the certificate is replaced leaves a mismatch that the check above repairs.
    atomic_write(key_path, _key_pem(key), 0o600)
    atomic_write(cert_path, certificate_pem(cert).encode(), 0o644)


def _issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(path: Path) -> PrivateKey:
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)  # tighten a key someone loosened; never serve from a world-readable key
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CryptoError(f"{path}: CA keys must be RSA or EC, got {type(key).__name__}")
    return key


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes starting at once generate one set of CAs."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
