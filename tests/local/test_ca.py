"""The local IoT Core's certificate authorities: generated once, loaded after, issuing like AWS does."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from certrotator.compat import UTC
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
from certrotator.local.ca import (
    AWS_IOT_ISSUER,
    AWS_IOT_NOT_AFTER,
    DEFAULT_PRIVATE_CA_SIGNING_ALGORITHM,
    CaFiles,
    IssuerName,
    ensure_local_ca,
    load_local_ca,
)
from certrotator.local.ca_material import ca_signing_algorithm_of

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
    before = dt.datetime.now(UTC).replace(microsecond=0)
    cert = ca.iot.sign_csr(build_csr(key, SigningAlgorithm.ECDSA_WITH_SHA256, SUBJECT))
    assert cert.subject == SUBJECT
    assert certificate_matches_key(cert, key)
    _verify(cert, ca.iot.certificate)
    assert before <= cert.not_valid_before_utc <= dt.datetime.now(UTC)
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
    ensure_local_ca(tmp_path, now=dt.datetime.now(UTC) + dt.timedelta(days=800))
    renewed = load_certificate(files.server_cert.read_bytes())
    assert files.server_cert.read_bytes() != old
    _verify(renewed, load_certificate(files.root_ca.read_bytes()))


# ------------------------------------------------------------------------- like AWS IoT, and loading


def test_iot_issuer_signs_as_aws_iot_does(tmp_path: Path) -> None:
    """RSA-2048 CA, sha256WithRSAEncryption, AWS IoT's issuer name (one OU attribute), and what openssl
    prints for it is what it prints for a certificate from CreateCertificateFromCsr."""
    ca = ensure_local_ca(tmp_path)
    ca_key = ca.iot.certificate.public_key()
    assert isinstance(ca_key, rsa.RSAPublicKey) and ca_key.key_size == 2048
    assert ca.iot.signing_algorithm is CaSigningAlgorithm.SHA256WITHRSA
    key = generate_private_key(KeyAlgorithm.ECDSA_P256)
    cert = ca.iot.sign_csr(build_csr(key, SigningAlgorithm.ECDSA_WITH_SHA256, SUBJECT))
    _verify(cert, ca.iot.certificate)
    assert cert.issuer == AWS_IOT_ISSUER == ca.iot.certificate.subject
    assert [a.oid for a in cert.issuer] == [NameOID.ORGANIZATIONAL_UNIT_NAME]
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.RSA_WITH_SHA256
    assert isinstance(cert.signature_algorithm_parameters, padding.PKCS1v15)
    assert cert.not_valid_after_utc == dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)
    pem = tmp_path / "device.pem.crt"
    pem.write_bytes(cert.public_bytes(Encoding.PEM))
    shown = subprocess.run(
        ["openssl", "x509", "-noout", "-issuer", "-enddate", "-text", "-in", str(pem)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert "issuer=OU = Amazon Web Services O=Amazon.com Inc. L=Seattle ST=Washington C=US\n" in shown
    assert "notAfter=Dec 31 23:59:59 2049 GMT\n" in shown
    assert "Signature Algorithm: sha256WithRSAEncryption" in shown


def _legacy_iot_ca(tmp_path: Path) -> x509.Certificate:
    """What a data directory made before the "AWS IoT" issuer became RSA holds: an EC P-256 CA."""
    directory = CaFiles.in_data_dir(tmp_path).directory
    directory.mkdir(mode=0o700, parents=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "certrotator local IoT Core"),
            x509.NameAttribute(NameOID.COMMON_NAME, "certrotator local AWS IoT issuer"),
        ]
    )
    now = dt.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=50 * 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    files = CaFiles(directory)
    files.issuer_key(IssuerName.IOT).write_bytes(
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    files.issuer_key(IssuerName.IOT).chmod(0o600)
    files.issuer_cert(IssuerName.IOT).write_bytes(cert.public_bytes(Encoding.PEM))
    return cert


@pytest.mark.parametrize("load", [ensure_local_ca, load_local_ca])
def test_a_data_directory_with_an_ec_aws_iot_ca_keeps_it(tmp_path: Path, load: Any) -> None:
    """Devices hold certificates the old CA issued: it is neither replaced nor refused; it goes on
    signing with its own algorithm, and the broker goes on trusting it."""
    legacy = _legacy_iot_ca(tmp_path)
    ca = load(tmp_path)
    assert ca.iot.certificate == legacy
    assert ca.iot.signing_algorithm is CaSigningAlgorithm.SHA256WITHECDSA
    cert = ca.iot.issue(generate_private_key(KeyAlgorithm.RSA_2048).public_key(), SUBJECT)
    _verify(cert, legacy)
    assert cert.not_valid_after_utc == AWS_IOT_NOT_AFTER
    assert x509.load_pem_x509_certificates(ca.files.client_ca_bundle.read_bytes())[0] == legacy


@pytest.mark.parametrize("algorithm", list(CaSigningAlgorithm))
def test_load_local_ca_signs_with_the_algorithm_the_engine_chose(
    tmp_path: Path, algorithm: CaSigningAlgorithm
) -> None:
    """`local up --ca-signing-algorithm X` makes the private CA; whoever opens the data directory
    later (local provision, the process handle) must sign as it does, RSA or EC."""
    made = ensure_local_ca(tmp_path, private_ca_signing_algorithm=algorithm)
    loaded = load_local_ca(tmp_path, private_ca_validity_days=9)
    assert loaded.private_ca.certificate == made.private_ca.certificate
    assert loaded.private_ca.signing_algorithm is algorithm
    assert ca_signing_algorithm_of(loaded.private_ca.certificate) is algorithm
    assert loaded.iot.signing_algorithm is CaSigningAlgorithm.SHA256WITHRSA
    cert = loaded.private_ca.issue(generate_private_key(KeyAlgorithm.ECDSA_P256).public_key(), SUBJECT)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == algorithm.hash().name
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=9)


def test_load_local_ca_of_a_new_data_directory_makes_the_defaults(tmp_path: Path) -> None:
    ca = load_local_ca(tmp_path)
    assert ca.private_ca.signing_algorithm is DEFAULT_PRIVATE_CA_SIGNING_ALGORITHM
    assert ca.iot.signing_algorithm is CaSigningAlgorithm.SHA256WITHRSA
    assert load_local_ca(tmp_path).private_ca.certificate == ca.private_ca.certificate
