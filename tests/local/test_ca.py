"""The local IoT Core's certificate authorities: generated once, loaded after, issuing like AWS does."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certrotator.crypto import (
    CaSigningAlgorithm,
    CryptoError,
    KeyAlgorithm,
    SigningAlgorithm,
    build_csr,
    certificate_matches_key,
    generate_private_key,
    load_certificate,
)
from certrotator.local.ca import AWS_IOT_NOT_AFTER, CaFiles, IssuerName, ensure_local_ca

SUBJECT = x509.Name(
    [x509.NameAttribute(NameOID.COMMON_NAME, "thing-1"), x509.NameAttribute(NameOID.SERIAL_NUMBER, "42")]
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _key_files(files: CaFiles) -> list[Path]:
    return [
        files.server_ca_key,
        files.server_key,
        files.issuer_key(IssuerName.IOT),
        files.issuer_key(IssuerName.PRIVATE_CA),
    ]


def _verify(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Raises unless `issuer` signed `cert` (names, AKI/SKI and the signature itself)."""
    cert.verify_directly_issued_by(issuer)


def test_first_start_generates_everything_with_owner_only_keys(tmp_path: Path) -> None:
    ca = ensure_local_ca(tmp_path)
    files = ca.files
    assert files.directory == tmp_path / "ca"
    assert _mode(files.directory) == 0o700
    for key in _key_files(files):
        assert _mode(key) == 0o600, key
    for cert in (files.root_ca, files.server_cert, files.client_ca_bundle):
        assert cert.is_file()
    assert not list(files.directory.glob("*.tmp")), "no temp files left behind"


def test_second_start_loads_the_same_cas(tmp_path: Path) -> None:
    first = ensure_local_ca(tmp_path)
    contents = {p.name: p.read_bytes() for p in first.files.directory.iterdir() if p.is_file()}
    second = ensure_local_ca(tmp_path)
    assert {p.name: p.read_bytes() for p in second.files.directory.iterdir() if p.is_file()} == contents
    assert second.iot.certificate == first.iot.certificate
    assert second.private_ca.certificate == first.private_ca.certificate


def test_server_certificate_is_for_loopback_and_signed_by_the_devices_root(tmp_path: Path) -> None:
    files = ensure_local_ca(tmp_path).files
    root = load_certificate(files.root_ca.read_bytes())
    server = load_certificate(files.server_cert.read_bytes())
    _verify(server, root)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_client_bundle_holds_both_issuers_and_not_the_server_ca(tmp_path: Path) -> None:
    ca = ensure_local_ca(tmp_path)
    bundle = x509.load_pem_x509_certificates(ca.files.client_ca_bundle.read_bytes())
    assert bundle == [ca.iot.certificate, ca.private_ca.certificate]
    assert load_certificate(ca.files.root_ca.read_bytes()) not in bundle


def test_iot_issuer_signs_a_csr_like_create_certificate_from_csr(tmp_path: Path) -> None:
    ca = ensure_local_ca(tmp_path)
    key = generate_private_key(KeyAlgorithm.ECDSA_P256)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert = ca.iot.sign_csr(build_csr(key, SigningAlgorithm.ECDSA_WITH_SHA256, SUBJECT))
    assert cert.subject == SUBJECT
    assert certificate_matches_key(cert, key)
    _verify(cert, ca.iot.certificate)
    assert before <= cert.not_valid_before_utc <= dt.datetime.now(dt.UTC)
    assert cert.not_valid_after_utc == AWS_IOT_NOT_AFTER
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (
        ExtendedKeyUsageOID.CLIENT_AUTH
        in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    again = ca.iot.sign_csr(build_csr(key, SigningAlgorithm.ECDSA_WITH_SHA256, SUBJECT))
    assert again.serial_number != cert.serial_number  # random serials


def test_iot_issuer_signs_rsa_csrs_too(tmp_path: Path) -> None:
    ca = ensure_local_ca(tmp_path)
    key = generate_private_key(KeyAlgorithm.RSA_2048)
    cert = ca.iot.sign_csr(build_csr(key, SigningAlgorithm.SHA256WITHRSAANDMGF1, SUBJECT))
    assert certificate_matches_key(cert, key)
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)


def test_csr_with_a_bad_signature_is_refused(tmp_path: Path) -> None:
    ca = ensure_local_ca(tmp_path)
    pem = build_csr(
        generate_private_key(KeyAlgorithm.ECDSA_P256), SigningAlgorithm.ECDSA_WITH_SHA256, SUBJECT
    )
    csr = x509.load_pem_x509_csr(pem.encode())
    der = bytearray(csr.public_bytes(Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(CryptoError, match="signature"):
        ca.iot.sign_csr(tampered)
    with pytest.raises(CryptoError):
        ca.iot.sign_csr("not a csr")


@pytest.mark.parametrize("algorithm", list(CaSigningAlgorithm))
def test_private_ca_signs_with_its_configured_algorithm_and_validity(
    tmp_path: Path, algorithm: CaSigningAlgorithm
) -> None:
    ca = ensure_local_ca(tmp_path, private_ca_signing_algorithm=algorithm, private_ca_validity_days=30)
    ca_key = ca.private_ca.key
    expected_key_type = rsa.RSAPrivateKey if algorithm.name.endswith("RSA") else ec.EllipticCurvePrivateKey
    assert isinstance(ca_key, expected_key_type)
    key = generate_private_key(KeyAlgorithm.ECDSA_P384)
    cert = ca.issuer(IssuerName.PRIVATE_CA).sign_csr(
        build_csr(key, SigningAlgorithm.ECDSA_WITH_SHA384, SUBJECT)
    )
    _verify(cert, ca.private_ca.certificate)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == algorithm.hash().name
    if isinstance(ca_key, rsa.RSAPrivateKey):  # AWS Private CA's *WITHRSA is PKCS#1 v1.5
        assert isinstance(cert.signature_algorithm_parameters, padding.PKCS1v15)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30)


def test_private_ca_key_family_must_match_the_algorithm(tmp_path: Path) -> None:
    ensure_local_ca(tmp_path, private_ca_signing_algorithm=CaSigningAlgorithm.SHA256WITHECDSA)
    with pytest.raises(CryptoError, match="EC"):
        ensure_local_ca(tmp_path, private_ca_signing_algorithm=CaSigningAlgorithm.SHA384WITHRSA)
    # Another hash of the same family is fine: it only changes how the existing key signs.
    ca = ensure_local_ca(tmp_path, private_ca_signing_algorithm=CaSigningAlgorithm.SHA512WITHECDSA)
    cert = ca.private_ca.issue(generate_private_key(KeyAlgorithm.ECDSA_P256).public_key(), SUBJECT)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA512)


def test_validity_must_be_positive_and_within_the_ca(tmp_path: Path) -> None:
    with pytest.raises(CryptoError):
        ensure_local_ca(tmp_path, private_ca_validity_days=0)
    ca = ensure_local_ca(tmp_path, private_ca_validity_days=100 * 365)
    with pytest.raises(CryptoError, match="exceeds"):
        ca.private_ca.issue(generate_private_key(KeyAlgorithm.ECDSA_P256).public_key(), SUBJECT)


def test_a_key_written_before_a_crash_gets_its_certificate_on_next_start(tmp_path: Path) -> None:
    files = ensure_local_ca(tmp_path).files
    key_bytes = files.issuer_key(IssuerName.IOT).read_bytes()
    files.issuer_cert(IssuerName.IOT).unlink()
    ca = ensure_local_ca(tmp_path)
    assert files.issuer_key(IssuerName.IOT).read_bytes() == key_bytes
    assert certificate_matches_key(ca.iot.certificate, ca.iot.key)


def test_a_certificate_without_its_key_is_an_error_not_a_silent_new_ca(tmp_path: Path) -> None:
    files = ensure_local_ca(tmp_path).files
    files.issuer_key(IssuerName.PRIVATE_CA).unlink()
    with pytest.raises(CryptoError, match="missing"):
        ensure_local_ca(tmp_path)


def test_loosened_key_permissions_are_tightened(tmp_path: Path) -> None:
    files = ensure_local_ca(tmp_path).files
    files.server_ca_key.chmod(0o644)
    ensure_local_ca(tmp_path)
    assert _mode(files.server_ca_key) == 0o600


def test_server_certificate_is_renewed_before_it_expires(tmp_path: Path) -> None:
    files = ensure_local_ca(tmp_path).files
    old = files.server_cert.read_bytes()
    ensure_local_ca(tmp_path, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=800))
    renewed = load_certificate(files.server_cert.read_bytes())
    assert files.server_cert.read_bytes() != old
    _verify(renewed, load_certificate(files.root_ca.read_bytes()))
