"""certrotator.crypto: algorithm tables, CSRs from software and external (HSM-style) keys, certificate ids."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import re
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from certrotator import crypto
from certrotator.crypto import (
    CaSigningAlgorithm,
    CryptoError,
    ExternalECKey,
    ExternalRSAKey,
    Family,
    KeyAlgorithm,
    PrivateKey,
    SigningAlgorithm,
)
from tests.signature_oids import SIGNATURE_OIDS

SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")])

COMBOS = [(k, s) for k in KeyAlgorithm for s in SigningAlgorithm if k.family is s.family]
MISMATCHES = [(k, s) for k in KeyAlgorithm for s in SigningAlgorithm if k.family is not s.family]



def _combo_id(combo: tuple[KeyAlgorithm, SigningAlgorithm]) -> str:
    return f"{combo[0].value}+{combo[1].value}"


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def keys() -> dict[KeyAlgorithm, PrivateKey]:
    """One software key per algorithm for the whole module (RSA-3072 generation costs ~300 ms)."""
    return {algorithm: crypto.generate_private_key(algorithm) for algorithm in KeyAlgorithm}


@pytest.fixture(scope="module")
def other_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class RecordingSigner:
    """The HSM stand-in: a sign callable that delegates to a software key and records its calls."""

    def __init__(self, key: PrivateKey) -> None:
        self.key = key
        self.calls: list[tuple[padding.AsymmetricPadding | None, hashes.HashAlgorithm]] = []

    def __call__(
        self, data: bytes, pad: padding.AsymmetricPadding | None, algorithm: hashes.HashAlgorithm
    ) -> bytes:
        assert isinstance(data, bytes)
        self.calls.append((pad, algorithm))
        if isinstance(self.key, rsa.RSAPrivateKey):
            assert pad is not None
            return self.key.sign(data, pad, algorithm)
        assert pad is None
        return self.key.sign(data, ec.ECDSA(algorithm))


def _external(key: PrivateKey) -> tuple[PrivateKey, RecordingSigner]:
    signer = RecordingSigner(key)
    return crypto.external_key(key.public_key(), signer), signer


def _self_signed(key: PrivateKey, cn: str = "device-1") -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def _csr_der(pem: str) -> bytes:
    return x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)


def _csr_pem(der: bytes) -> str:
    body = base64.b64encode(der).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{lines}\n-----END CERTIFICATE REQUEST-----\n"


def _assert_csr(pem: str, key: PrivateKey, algorithm: SigningAlgorithm) -> None:
    """The CSR verifies, carries the key's public key, and is signed exactly as `algorithm` says."""
    info = crypto.inspect_csr(pem)
    csr = info.csr
    assert info.signature_valid is True
    assert csr.is_signature_valid
    assert info.subject == SUBJECT
    assert crypto.same_public_key(info.public_key, key)
    assert crypto.key_algorithm_of(info.public_key) is crypto.key_algorithm_of(key.public_key())

    digest = algorithm.hash()
    assert csr.signature_algorithm_oid == SIGNATURE_OIDS[algorithm]
    assert csr.signature_hash_algorithm is not None
    requested = re.search(r"SHA(256|384|512)", algorithm.value)
    assert requested is not None
    assert csr.signature_hash_algorithm.name == digest.name == f"sha{requested.group(1)}"

    params = csr.signature_algorithm_parameters
    public = info.public_key
    tbs = csr.tbs_certrequest_bytes
    if algorithm.family is Family.EC:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(params, ec.ECDSA)
        assert isinstance(params.algorithm, hashes.HashAlgorithm)
        assert params.algorithm.name == digest.name
        public.verify(csr.signature, tbs, ec.ECDSA(digest))
    elif algorithm.is_pss:
        assert isinstance(public, rsa.RSAPublicKey)
        assert isinstance(params, padding.PSS)
        assert crypto.pss_salt_length(params, digest) == digest.digest_size
        # An explicit salt length makes OpenSSL check it exactly; MGF1 must use the same hash.
        exact = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        public.verify(csr.signature, tbs, exact, digest)
        wrong_salt = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size + 1)
        with pytest.raises(InvalidSignature):
            public.verify(csr.signature, tbs, wrong_salt, digest)
        other = hashes.SHA512() if digest.name != "sha512" else hashes.SHA256()
        wrong_mgf = padding.PSS(mgf=padding.MGF1(other), salt_length=digest.digest_size)
        with pytest.raises(InvalidSignature):
            public.verify(csr.signature, tbs, wrong_mgf, digest)
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        assert isinstance(params, padding.PKCS1v15)
        public.verify(csr.signature, tbs, padding.PKCS1v15(), digest)


# ---------------------------------------------------------------------------------- algorithm tables


def test_there_are_exactly_21_same_family_combinations() -> None:
    assert len(COMBOS) == 21
    assert len(MISMATCHES) == 5 * 9 - 21


@pytest.mark.parametrize(
    ("algorithm", "family", "detail"),
    [
        (KeyAlgorithm.RSA_2048, Family.RSA, 2048),
        (KeyAlgorithm.RSA_3072, Family.RSA, 3072),
        (KeyAlgorithm.ECDSA_P256, Family.EC, "secp256r1"),
        (KeyAlgorithm.ECDSA_P384, Family.EC, "secp384r1"),
        (KeyAlgorithm.ECDSA_P521, Family.EC, "secp521r1"),
    ],
)
def test_key_algorithm_table(algorithm: KeyAlgorithm, family: Family, detail: int | str) -> None:
    assert algorithm.family is family
    if family is Family.RSA:
        assert algorithm.rsa_bits == detail
    else:
        assert algorithm.curve.name == detail


@pytest.mark.parametrize(
    ("algorithm", "family", "hash_name", "pss"),
    [
        (SigningAlgorithm.SHA256WITHRSA, Family.RSA, "sha256", False),
        (SigningAlgorithm.SHA384WITHRSA, Family.RSA, "sha384", False),
        (SigningAlgorithm.SHA512WITHRSA, Family.RSA, "sha512", False),
        (SigningAlgorithm.SHA256WITHRSAANDMGF1, Family.RSA, "sha256", True),
        (SigningAlgorithm.SHA384WITHRSAANDMGF1, Family.RSA, "sha384", True),
        (SigningAlgorithm.SHA512WITHRSAANDMGF1, Family.RSA, "sha512", True),
        (SigningAlgorithm.ECDSA_WITH_SHA256, Family.EC, "sha256", False),
        (SigningAlgorithm.ECDSA_WITH_SHA384, Family.EC, "sha384", False),
        (SigningAlgorithm.ECDSA_WITH_SHA512, Family.EC, "sha512", False),
    ],
)
def test_signing_algorithm_table(
    algorithm: SigningAlgorithm, family: Family, hash_name: str, pss: bool
) -> None:
    assert algorithm.family is family
    assert algorithm.is_pss is pss
    digest = algorithm.hash()
    assert digest.name == hash_name
    pad = algorithm.rsa_padding()
    if family is Family.EC:
        assert pad is None
    elif pss:
        assert isinstance(pad, padding.PSS)
        assert crypto.pss_salt_length(pad, digest) == digest.digest_size
    else:
        assert isinstance(pad, padding.PKCS1v15)


@pytest.mark.parametrize(
    ("algorithm", "family", "hash_name"),
    [
        (CaSigningAlgorithm.SHA256WITHRSA, Family.RSA, "sha256"),
        (CaSigningAlgorithm.SHA384WITHRSA, Family.RSA, "sha384"),
        (CaSigningAlgorithm.SHA512WITHRSA, Family.RSA, "sha512"),
        (CaSigningAlgorithm.SHA256WITHECDSA, Family.EC, "sha256"),
        (CaSigningAlgorithm.SHA384WITHECDSA, Family.EC, "sha384"),
        (CaSigningAlgorithm.SHA512WITHECDSA, Family.EC, "sha512"),
    ],
)
def test_ca_signing_algorithm_table(algorithm: CaSigningAlgorithm, family: Family, hash_name: str) -> None:
    assert algorithm.family is family
    assert algorithm.hash().name == hash_name


def test_generated_keys_match_their_algorithm(keys: dict[KeyAlgorithm, PrivateKey]) -> None:
    for algorithm, key in keys.items():
        assert crypto.key_algorithm_of(key.public_key()) is algorithm
        if isinstance(key, rsa.RSAPrivateKey):
            assert key.key_size == algorithm.rsa_bits
            assert key.public_key().public_numbers().e == 65537
        else:
            assert key.curve.name == algorithm.curve.name


# ----------------------------------------------------------------------------------- parse_* helpers


@pytest.mark.parametrize(
    ("parse", "enum", "label"),
    [
        (crypto.parse_key_algorithm, KeyAlgorithm, "key algorithm"),
        (crypto.parse_signing_algorithm, SigningAlgorithm, "signing algorithm"),
        (crypto.parse_ca_signing_algorithm, CaSigningAlgorithm, "CA signing algorithm"),
    ],
)
def test_parse_accepts_every_known_name(parse: Callable[[str], Any], enum: Any, label: str) -> None:
    for member in enum:
        assert parse(member.value) is member


@pytest.mark.parametrize(
    ("parse", "enum", "label"),
    [
        (crypto.parse_key_algorithm, KeyAlgorithm, "key algorithm"),
        (crypto.parse_signing_algorithm, SigningAlgorithm, "signing algorithm"),
        (crypto.parse_ca_signing_algorithm, CaSigningAlgorithm, "CA signing algorithm"),
    ],
)
@pytest.mark.parametrize(
    "value", ["", "RSA-4096", "rsa-2048", "SHA1WITHRSA", "ECDSA-WITH-SHA1", "Ed25519", " "]
)
def test_parse_unknown_name_lists_allowed_values(
    parse: Callable[[str], Any], enum: Any, label: str, value: str
) -> None:
    allowed = ", ".join(member.value for member in enum)
    with pytest.raises(CryptoError, match=f"^{re.escape(f'unknown {label} {value!r}; allowed: {allowed}')}$"):
        parse(value)


def test_parse_messages_name_the_tables_literally() -> None:
    with pytest.raises(CryptoError) as info:
        crypto.parse_key_algorithm("DSA")
    assert str(info.value) == (
        "unknown key algorithm 'DSA'; allowed: RSA-2048, RSA-3072, ECDSA-P256, ECDSA-P384, ECDSA-P521"
    )


# ------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("combo", COMBOS, ids=_combo_id)
def test_check_family_accepts_same_family(combo: tuple[KeyAlgorithm, SigningAlgorithm]) -> None:
    crypto.check_family(*combo)


@pytest.mark.parametrize("combo", MISMATCHES, ids=_combo_id)
def test_check_family_rejects_mismatch(combo: tuple[KeyAlgorithm, SigningAlgorithm]) -> None:
    key_algorithm, signing_algorithm = combo
    message = (
        f"signing algorithm {signing_algorithm.value} ({signing_algorithm.family.value}) does not "
        f"match key algorithm {key_algorithm.value} ({key_algorithm.family.value})"
    )
    with pytest.raises(CryptoError, match=f"^{re.escape(message)}$"):
        crypto.check_family(key_algorithm, signing_algorithm)


@pytest.mark.parametrize("external", [False, True], ids=["software", "external"])
@pytest.mark.parametrize("combo", MISMATCHES, ids=_combo_id)
def test_build_csr_rejects_family_mismatch(
    keys: dict[KeyAlgorithm, PrivateKey], combo: tuple[KeyAlgorithm, SigningAlgorithm], external: bool
) -> None:
    key_algorithm, signing_algorithm = combo
    key = keys[key_algorithm]
    signer = None
    if external:
        key, signer = _external(key)
    message = f"cannot sign a CSR for an {key_algorithm.family.value} key with {signing_algorithm.value}"
    with pytest.raises(CryptoError, match=f"^{re.escape(message)}$"):
        crypto.build_csr(key, signing_algorithm, SUBJECT)
    if signer is not None:
        assert signer.calls == []  # nothing reached the token


# ------------------------------------------------------------------------------------------ CSR build


@pytest.mark.parametrize("combo", COMBOS, ids=_combo_id)
def test_build_csr_with_software_key(
    keys: dict[KeyAlgorithm, PrivateKey], combo: tuple[KeyAlgorithm, SigningAlgorithm]
) -> None:
    key_algorithm, signing_algorithm = combo
    key = keys[key_algorithm]
    pem = crypto.build_csr(key, signing_algorithm, SUBJECT)
    assert pem.startswith("-----BEGIN CERTIFICATE REQUEST-----\n")
    _assert_csr(pem, key, signing_algorithm)


@pytest.mark.parametrize("combo", COMBOS, ids=_combo_id)
def test_build_csr_with_external_key(
    keys: dict[KeyAlgorithm, PrivateKey], combo: tuple[KeyAlgorithm, SigningAlgorithm]
) -> None:
    """The HSM path: cryptography's builder signs through a key whose sign() delegates."""
    key_algorithm, signing_algorithm = combo
    software = keys[key_algorithm]
    external, signer = _external(software)
    assert isinstance(external, ExternalRSAKey if key_algorithm.family is Family.RSA else ExternalECKey)

    pem = crypto.build_csr(external, signing_algorithm, SUBJECT)
    _assert_csr(pem, software, signing_algorithm)

    # exactly one signature was asked of the token, with the padding and hash the algorithm prescribes
    assert len(signer.calls) == 1
    pad, digest = signer.calls[0]
    assert digest.name == signing_algorithm.hash().name
    if signing_algorithm.family is Family.EC:
        assert pad is None
    elif signing_algorithm.is_pss:
        assert isinstance(pad, padding.PSS)
        assert crypto.pss_salt_length(pad, digest) == digest.digest_size
    else:
        assert isinstance(pad, padding.PKCS1v15)


@pytest.mark.parametrize("combo", COMBOS, ids=_combo_id)
def test_tampered_csr_signature_is_reported_invalid(
    keys: dict[KeyAlgorithm, PrivateKey], combo: tuple[KeyAlgorithm, SigningAlgorithm]
) -> None:
    key_algorithm, signing_algorithm = combo
    der = _csr_der(crypto.build_csr(keys[key_algorithm], signing_algorithm, SUBJECT))
    # The signature BIT STRING is the last element of the DER: flip its last byte.
    tampered = der[:-1] + bytes([der[-1] ^ 0x01])
    info = crypto.inspect_csr(_csr_pem(tampered))
    assert info.signature_valid is False
    assert crypto.same_public_key(info.public_key, keys[key_algorithm])


@pytest.mark.parametrize("key_algorithm", list(KeyAlgorithm))
def test_tampered_csr_subject_is_reported_invalid(
    keys: dict[KeyAlgorithm, PrivateKey], key_algorithm: KeyAlgorithm
) -> None:
    signing = (
        SigningAlgorithm.SHA256WITHRSA
        if key_algorithm.family is Family.RSA
        else SigningAlgorithm.ECDSA_WITH_SHA256
    )
    der = _csr_der(crypto.build_csr(keys[key_algorithm], signing, SUBJECT))
    assert der.count(b"device-1") == 1
    info = crypto.inspect_csr(_csr_pem(der.replace(b"device-1", b"device-2")).encode())
    assert info.signature_valid is False
    assert info.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device-2"


def test_inspect_csr_accepts_str_and_bytes(keys: dict[KeyAlgorithm, PrivateKey]) -> None:
    pem = crypto.build_csr(keys[KeyAlgorithm.ECDSA_P256], SigningAlgorithm.ECDSA_WITH_SHA256, SUBJECT)
    from_str, from_bytes = crypto.inspect_csr(pem), crypto.inspect_csr(pem.encode())
    assert from_str.signature_valid and from_bytes.signature_valid
    assert from_str.csr == from_bytes.csr


# ------------------------------------------------------------------------------------- inspect: errors

_NOT_A_CSR = "CSR is not a well-formed PEM certificate signing request ("


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        b"",
        "hello",
        b"\x00\xff" * 10,
        "-----BEGIN CERTIFICATE REQUEST-----\nnot base64!\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "\ud800",  # a lone surrogate cannot even be encoded
    ],
)
def test_inspect_csr_rejects_garbage(garbage: str | bytes) -> None:
    with pytest.raises(CryptoError, match=f"^{re.escape(_NOT_A_CSR)}"):
        crypto.inspect_csr(garbage)


def test_inspect_csr_rejects_a_certificate(keys: dict[KeyAlgorithm, PrivateKey]) -> None:
    certificate = crypto.certificate_pem(_self_signed(keys[KeyAlgorithm.ECDSA_P256]))
    with pytest.raises(CryptoError, match=f"^{re.escape(_NOT_A_CSR)}"):
        crypto.inspect_csr(certificate)


def test_inspect_csr_rejects_der(keys: dict[KeyAlgorithm, PrivateKey]) -> None:
    pem = crypto.build_csr(keys[KeyAlgorithm.ECDSA_P256], SigningAlgorithm.ECDSA_WITH_SHA256, SUBJECT)
    with pytest.raises(CryptoError, match=f"^{re.escape(_NOT_A_CSR)}"):
        crypto.inspect_csr(_csr_der(pem))


def test_inspect_csr_rejects_an_unknown_key_type(keys: dict[KeyAlgorithm, PrivateKey]) -> None:
    pem = crypto.build_csr(keys[KeyAlgorithm.ECDSA_P256], SigningAlgorithm.ECDSA_WITH_SHA256, SUBJECT)
    der = _csr_der(pem)
    id_ec_public_key = bytes.fromhex("06072a8648ce3d0201")  # OID 1.2.840.10045.2.1
    assert der.count(id_ec_public_key) == 1
    unknown = der.replace(id_ec_public_key, bytes.fromhex("06072a8648ce3d0209"))
    with pytest.raises(CryptoError, match=f"^{re.escape(_NOT_A_CSR)}"):
        crypto.inspect_csr(_csr_pem(unknown))


def test_inspect_csr_reports_an_unknown_signature_algorithm_as_invalid(
    keys: dict[KeyAlgorithm, PrivateKey],
) -> None:
    pem = crypto.build_csr(keys[KeyAlgorithm.ECDSA_P256], SigningAlgorithm.ECDSA_WITH_SHA256, SUBJECT)
    der = _csr_der(pem)
    ecdsa_with_sha256 = bytes.fromhex("06082a8648ce3d040302")  # OID 1.2.840.10045.4.3.2
    assert der.count(ecdsa_with_sha256) == 1
    info = crypto.inspect_csr(_csr_pem(der.replace(ecdsa_with_sha256, bytes.fromhex("06082a8648ce3d040309"))))
    assert info.signature_valid is False


# ------------------------------------------------------------------------------------ CSR key policy


def _rsa_public(bits: int) -> rsa.RSAPublicKey:
    """A public key of exactly `bits` bits without generating primes (the policy only reads the size)."""
    modulus = (1 << (bits - 1)) | 1
    return rsa.RSAPublicNumbers(65537, modulus).public_key()


@pytest.mark.parametrize("key_algorithm", list(KeyAlgorithm))
def test_key_policy_accepts_the_table(
    keys: dict[KeyAlgorithm, PrivateKey], key_algorithm: KeyAlgorithm
) -> None:
    assert crypto.csr_key_policy_violation(keys[key_algorithm].public_key()) is None


def test_key_policy_rejects_a_real_rsa_1024_key() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert crypto.csr_key_policy_violation(small.public_key()) == (
        "RSA key of 1024 bits is too small (minimum 2048)"
    )
    assert crypto.key_algorithm_of(small.public_key()) is None


@pytest.mark.parametrize(
    ("bits", "violation"),
    [
        (2047, "RSA key of 2047 bits is too small (minimum 2048)"),
        (2048, None),
        (4096, None),
        (4097, "RSA key of 4097 bits is too large (maximum 4096)"),
        (8192, "RSA key of 8192 bits is too large (maximum 4096)"),
    ],
)
def test_key_policy_rsa_bounds(bits: int, violation: str | None) -> None:
    public = _rsa_public(bits)
    assert public.key_size == bits
    assert crypto.csr_key_policy_violation(public) == violation


@pytest.mark.parametrize(
    ("curve", "name"),
    [(ec.SECP224R1(), "secp224r1"), (ec.SECP256K1(), "secp256k1"), (ec.SECP192R1(), "secp192r1")],
)
def test_key_policy_rejects_other_curves(curve: ec.EllipticCurve, name: str) -> None:
    public = ec.generate_private_key(curve).public_key()
    assert crypto.csr_key_policy_violation(public) == f"EC curve {name} is not allowed (P-256, P-384, P-521)"
    assert crypto.key_algorithm_of(public) is None


@pytest.mark.parametrize(
    ("public", "type_name"),
    [
        (ed25519.Ed25519PrivateKey.generate().public_key(), "Ed25519PublicKey"),
        (ed448.Ed448PrivateKey.generate().public_key(), "Ed448PublicKey"),
    ],
)
def test_key_policy_rejects_edwards_keys(public: Any, type_name: str) -> None:
    assert crypto.csr_key_policy_violation(public) == f"key type {type_name} is not allowed (RSA or EC)"
    assert crypto.key_algorithm_of(public) is None


def test_key_policy_of_an_ed25519_csr() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = x509.CertificateSigningRequestBuilder().subject_name(SUBJECT).sign(key, None)
    info = crypto.inspect_csr(csr.public_bytes(serialization.Encoding.PEM))
    assert info.signature_valid is True
    assert (
        crypto.csr_key_policy_violation(info.public_key)
        == "key type Ed25519PublicKey is not allowed (RSA or EC)"
    )


def test_key_algorithm_of_rsa_4096_is_not_in_the_table() -> None:
    assert crypto.key_algorithm_of(_rsa_public(4096)) is None


# ------------------------------------------------------------------------------------- certificates


@pytest.fixture(scope="module")
def certificate(keys: dict[KeyAlgorithm, PrivateKey]) -> x509.Certificate:
    return _self_signed(keys[KeyAlgorithm.ECDSA_P256])


def test_certificate_id_is_sha256_of_der(certificate: x509.Certificate) -> None:
    der = certificate.public_bytes(serialization.Encoding.DER)
    pem = crypto.certificate_pem(certificate)
    expected = hashlib.sha256(der).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", expected)
    assert crypto.certificate_id(certificate) == expected
    assert crypto.certificate_id(pem) == expected
    assert crypto.certificate_id(pem.encode()) == expected
    assert crypto.certificate_id_from_der(der) == expected
    # not the hash of the PEM text (what moto computes without use_valid_cert)
    assert expected != hashlib.sha256(pem.encode()).hexdigest()


def test_certificate_ids_differ_between_certificates(
    keys: dict[KeyAlgorithm, PrivateKey], certificate: x509.Certificate
) -> None:
    other = _self_signed(keys[KeyAlgorithm.ECDSA_P256])  # same key and subject, new serial
    assert crypto.certificate_id(other) != crypto.certificate_id(certificate)


def test_certificate_pem_round_trip(certificate: x509.Certificate) -> None:
    pem = crypto.certificate_pem(certificate)
    assert pem.startswith("-----BEGIN CERTIFICATE-----\n")
    assert crypto.load_certificate(pem) == certificate
    assert crypto.load_certificate(pem.encode()) == certificate


_NOT_A_CERT = "not a PEM X.509 certificate ("


@pytest.mark.parametrize("garbage", ["", b"", "nope", b"\x00\x01", "\ud800"])
def test_certificate_id_of_garbage(garbage: str | bytes) -> None:
    with pytest.raises(CryptoError, match=f"^{re.escape(_NOT_A_CERT)}"):
        crypto.certificate_id(garbage)


def test_certificate_id_of_a_csr(keys: dict[KeyAlgorithm, PrivateKey]) -> None:
    pem = crypto.build_csr(keys[KeyAlgorithm.ECDSA_P256], SigningAlgorithm.ECDSA_WITH_SHA256, SUBJECT)
    with pytest.raises(CryptoError, match=f"^{re.escape(_NOT_A_CERT)}"):
        crypto.certificate_id(pem)


def test_certificate_matches_key(
    keys: dict[KeyAlgorithm, PrivateKey],
    certificate: x509.Certificate,
    other_ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    key = keys[KeyAlgorithm.ECDSA_P256]
    pem = crypto.certificate_pem(certificate)
    assert crypto.certificate_matches_key(certificate, key)
    assert crypto.certificate_matches_key(pem, key)
    assert crypto.certificate_matches_key(pem, _external(key)[0])
    assert not crypto.certificate_matches_key(certificate, other_ec_key)
    assert not crypto.certificate_matches_key(pem, keys[KeyAlgorithm.RSA_2048])


def test_same_public_key_accepts_private_and_public_keys(
    keys: dict[KeyAlgorithm, PrivateKey], other_ec_key: ec.EllipticCurvePrivateKey
) -> None:
    key = keys[KeyAlgorithm.ECDSA_P256]
    assert crypto.same_public_key(key, key.public_key())
    assert crypto.same_public_key(_external(key)[0], key)
    assert not crypto.same_public_key(key, other_ec_key)
    assert crypto.public_key_der(key) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ------------------------------------------------------------------------------------- external keys

_REFUSED = "an external (token) private key cannot be exported or used for this operation"


@pytest.mark.parametrize(
    ("key_algorithm", "operation"),
    [
        (
            KeyAlgorithm.RSA_2048,
            lambda k: k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        ),
        (KeyAlgorithm.RSA_2048, lambda k: k.private_numbers()),
        (KeyAlgorithm.RSA_2048, lambda k: k.decrypt(b"x" * 256, padding.PKCS1v15())),
        (
            KeyAlgorithm.ECDSA_P256,
            lambda k: k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        ),
        (KeyAlgorithm.ECDSA_P256, lambda k: k.private_numbers()),
        (KeyAlgorithm.ECDSA_P256, lambda k: k.exchange(ec.ECDH(), k.public_key())),
    ],
    ids=[
        "rsa-private_bytes",
        "rsa-private_numbers",
        "rsa-decrypt",
        "ec-private_bytes",
        "ec-private_numbers",
        "ec-exchange",
    ],
)
def test_external_keys_refuse_export_and_other_operations(
    keys: dict[KeyAlgorithm, PrivateKey], key_algorithm: KeyAlgorithm, operation: Callable[[Any], Any]
) -> None:
    external, signer = _external(keys[key_algorithm])
    with pytest.raises(CryptoError, match=f"^{re.escape(_REFUSED)}$"):
        operation(external)
    assert signer.calls == []


def test_external_rsa_key_properties(keys: dict[KeyAlgorithm, PrivateKey]) -> None:
    software = keys[KeyAlgorithm.RSA_3072]
    external, _ = _external(software)
    assert isinstance(external, ExternalRSAKey)
    assert isinstance(external, rsa.RSAPrivateKey)
    assert external.key_size == 3072
    assert crypto.same_public_key(external, software)
    assert copy.copy(external) is external
    assert copy.deepcopy(external) is external


def test_external_ec_key_properties(keys: dict[KeyAlgorithm, PrivateKey]) -> None:
    software = keys[KeyAlgorithm.ECDSA_P384]
    external, _ = _external(software)
    assert isinstance(external, ExternalECKey)
    assert isinstance(external, ec.EllipticCurvePrivateKey)
    assert external.curve.name == "secp384r1"
    assert external.key_size == 384
    assert crypto.same_public_key(external, software)
    assert copy.copy(external) is external
    assert copy.deepcopy(external) is external


def test_external_keys_sign_directly(keys: dict[KeyAlgorithm, PrivateKey]) -> None:
    rsa_key, rsa_signer = _external(keys[KeyAlgorithm.RSA_2048])
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    signature = rsa_key.sign(b"data", padding.PKCS1v15(), hashes.SHA256())
    rsa_key.public_key().verify(signature, b"data", padding.PKCS1v15(), hashes.SHA256())
    assert len(rsa_signer.calls) == 1

    ec_key, ec_signer = _external(keys[KeyAlgorithm.ECDSA_P521])
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    signature = ec_key.sign(bytearray(b"data"), ec.ECDSA(hashes.SHA384()))
    ec_key.public_key().verify(signature, b"data", ec.ECDSA(hashes.SHA384()))
    assert ec_signer.calls[0][0] is None and ec_signer.calls[0][1].name == "sha384"


# ------------------------------------------------------------------------------------------ PSS salt


@pytest.mark.parametrize("digest", [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()], ids=lambda d: d.name)
def test_pss_salt_length(digest: hashes.HashAlgorithm) -> None:
    mgf = padding.MGF1(digest)
    assert crypto.pss_salt_length(padding.PSS(mgf=mgf, salt_length=20), digest) == 20
    assert crypto.pss_salt_length(padding.PSS(mgf=mgf, salt_length=0), digest) == 0
    assert crypto.pss_salt_length(padding.PSS(mgf=mgf, salt_length=padding.PSS.DIGEST_LENGTH), digest) == (
        digest.digest_size
    )


@pytest.mark.parametrize("salt", [padding.PSS.MAX_LENGTH, padding.PSS.AUTO], ids=["MAX_LENGTH", "AUTO"])
def test_pss_salt_length_rejects_variable_lengths(salt: Any) -> None:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt)
    with pytest.raises(CryptoError, match=r"^unsupported PSS salt length .*; use the digest length$"):
        crypto.pss_salt_length(pss, hashes.SHA256())
