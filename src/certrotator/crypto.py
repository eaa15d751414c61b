"""Algorithm tables, CSR building and inspection, certificate ids: the crypto both sides share.

Keys are generated and CSRs signed here for software keys; external keys (an HSM) plug in through
`ExternalRSAKey` / `ExternalECKey`, whose `sign` delegates to a callable, because `cryptography`'s
CSR builder only needs `sign()` and `public_key()` from the private key it is given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class CryptoError(ValueError):
    """Bad key material, CSR or configuration; the text says what is wrong."""


class Family(StrEnum):
    RSA = "RSA"
    EC = "EC"


Digest = hashes.SHA256 | hashes.SHA384 | hashes.SHA512

_HASHES: dict[str, type[Digest]] = {
    "SHA256": hashes.SHA256,
    "SHA384": hashes.SHA384,
    "SHA512": hashes.SHA512,
}

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P256": ec.SECP256R1,
    "P384": ec.SECP384R1,
    "P521": ec.SECP521R1,
}


class KeyAlgorithm(StrEnum):
    """Key algorithms AWS IoT's CreateCertificateFromCsr accepts (the component's keyAlgorithm)."""

    RSA_2048 = "RSA-2048"
    RSA_3072 = "RSA-3072"
    ECDSA_P256 = "ECDSA-P256"
    ECDSA_P384 = "ECDSA-P384"
    ECDSA_P521 = "ECDSA-P521"

    @property
    def family(self) -> Family:
        return Family.RSA if self.value.startswith("RSA") else Family.EC

    @property
    def rsa_bits(self) -> int:
        return int(self.value.split("-")[1])

    @property
    def curve(self) -> ec.EllipticCurve:
        return _CURVES[self.value.split("-")[1]]()


class SigningAlgorithm(StrEnum):
    """CSR signing algorithms (AWS IoT's certificate signing algorithms less DSA)."""

    SHA256WITHRSA = "SHA256WITHRSA"
    SHA384WITHRSA = "SHA384WITHRSA"
    SHA512WITHRSA = "SHA512WITHRSA"
    SHA256WITHRSAANDMGF1 = "SHA256WITHRSAANDMGF1"
    SHA384WITHRSAANDMGF1 = "SHA384WITHRSAANDMGF1"
    SHA512WITHRSAANDMGF1 = "SHA512WITHRSAANDMGF1"
    ECDSA_WITH_SHA256 = "ECDSA-WITH-SHA256"
    ECDSA_WITH_SHA384 = "ECDSA-WITH-SHA384"
    ECDSA_WITH_SHA512 = "ECDSA-WITH-SHA512"

    @property
    def family(self) -> Family:
        return Family.EC if self.value.startswith("ECDSA") else Family.RSA

    @property
    def is_pss(self) -> bool:
        return self.value.endswith("ANDMGF1")

    def hash(self) -> Digest:
        name = self.value[:6] if self.family is Family.RSA else self.value[-6:]
        return _HASHES[name]()

    def rsa_padding(self) -> padding.AsymmetricPadding | None:
        """The RSA padding for this algorithm (PSS salt = hash length, as AWS IoT expects)."""
        if self.family is Family.EC:
            return None
        if self.is_pss:
            digest = self.hash()
            return padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        return padding.PKCS1v15()


class CaSigningAlgorithm(StrEnum):
    """Signing algorithms of a private CA (AWS Private CA's names)."""

    SHA256WITHRSA = "SHA256WITHRSA"
    SHA384WITHRSA = "SHA384WITHRSA"
    SHA512WITHRSA = "SHA512WITHRSA"
    SHA256WITHECDSA = "SHA256WITHECDSA"
    SHA384WITHECDSA = "SHA384WITHECDSA"
    SHA512WITHECDSA = "SHA512WITHECDSA"

    @property
    def family(self) -> Family:
        return Family.EC if self.value.endswith("ECDSA") else Family.RSA

    def hash(self) -> Digest:
        return _HASHES[self.value[:6]]()


_E = TypeVar("_E", bound=StrEnum)


def _parse(kind: type[_E], value: str, what: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(a.value for a in kind)
        raise CryptoError(f"unknown {what} {value!r}; allowed: {allowed}") from None


def parse_key_algorithm(value: str) -> KeyAlgorithm:
    return _parse(KeyAlgorithm, value, "key algorithm")


def parse_signing_algorithm(value: str) -> SigningAlgorithm:
    return _parse(SigningAlgorithm, value, "signing algorithm")


def parse_ca_signing_algorithm(value: str) -> CaSigningAlgorithm:
    return _parse(CaSigningAlgorithm, value, "CA signing algorithm")


def check_family(key_algorithm: KeyAlgorithm, signing_algorithm: SigningAlgorithm) -> None:
    """Raise CryptoError unless the key and signing algorithms are of one family (RSA or EC)."""
    if key_algorithm.family is not signing_algorithm.family:
        raise CryptoError(
            f"signing algorithm {signing_algorithm.value} ({signing_algorithm.family.value}) does not "
            f"match key algorithm {key_algorithm.value} ({key_algorithm.family.value})"
        )


def generate_private_key(algorithm: KeyAlgorithm) -> PrivateKey:
    if algorithm.family is Family.RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=algorithm.rsa_bits)
    return ec.generate_private_key(algorithm.curve)


def key_algorithm_of(public_key: CertificatePublicKeyTypes) -> KeyAlgorithm | None:
    """The table entry for a public key, or None if the key is of no algorithm in the table."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return {2048: KeyAlgorithm.RSA_2048, 3072: KeyAlgorithm.RSA_3072}.get(public_key.key_size)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        for algorithm in (KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ECDSA_P384, KeyAlgorithm.ECDSA_P521):
            if public_key.curve.name == algorithm.curve.name:
                return algorithm
    return None


def csr_key_policy_violation(public_key: CertificatePublicKeyTypes) -> str | None:
    """Why a CSR's key is not acceptable for a device certificate, or None if it is."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            return f"RSA key of {public_key.key_size} bits is too small (minimum 2048)"
        if public_key.key_size > 4096:
            return f"RSA key of {public_key.key_size} bits is too large (maximum 4096)"
        return None
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if key_algorithm_of(public_key) is None:
            return f"EC curve {public_key.curve.name} is not allowed (P-256, P-384, P-521)"
        return None
    return f"key type {type(public_key).__name__} is not allowed (RSA or EC)"


def public_key_der(key: CertificatePublicKeyTypes | PrivateKey) -> bytes:
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def same_public_key(
    a: CertificatePublicKeyTypes | PrivateKey, b: CertificatePublicKeyTypes | PrivateKey
) -> bool:
    return public_key_der(a) == public_key_der(b)


# ----------------------------------------------------------------------------------------------- CSRs


def build_csr(key: PrivateKey, signing_algorithm: SigningAlgorithm, subject: x509.Name) -> str:
    """A PEM CSR for `key` (software or external) signed with `signing_algorithm`."""
    key_family = Family.RSA if isinstance(key, rsa.RSAPrivateKey) else Family.EC
    if key_family is not signing_algorithm.family:
        raise CryptoError(f"cannot sign a CSR for an {key_family.value} key with {signing_algorithm.value}")
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    rsa_padding = signing_algorithm.rsa_padding()
    if isinstance(rsa_padding, padding.PSS):
        csr = builder.sign(key, signing_algorithm.hash(), rsa_padding=rsa_padding)
    else:
        csr = builder.sign(key, signing_algorithm.hash())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True, slots=True)
class CsrInfo:
    csr: x509.CertificateSigningRequest
    public_key: CertificatePublicKeyTypes
    subject: x509.Name
    signature_valid: bool


def inspect_csr(pem: str | bytes) -> CsrInfo:
    """Parse a PEM CSR; raises CryptoError if it is not one. Signature validity is reported, not raised."""
    try:
        data = pem.encode() if isinstance(pem, str) else pem
        csr = x509.load_pem_x509_csr(data)
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"CSR is not a well-formed PEM certificate signing request ({exc})") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature, TypeError, UnsupportedAlgorithm):
        valid = False
    return CsrInfo(csr=csr, public_key=public_key, subject=csr.subject, signature_valid=valid)


# --------------------------------------------------------------------------------------- certificates


def load_certificate(pem: str | bytes) -> x509.Certificate:
    try:
        data = pem.encode() if isinstance(pem, str) else pem
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CryptoError(f"not a PEM X.509 certificate ({exc})") from None


def certificate_id(certificate: x509.Certificate | str | bytes) -> str:
    """AWS IoT's certificate id: lowercase hex SHA-256 of the DER certificate."""
    cert = certificate if isinstance(certificate, x509.Certificate) else load_certificate(certificate)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def certificate_id_from_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def certificate_pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def certificate_matches_key(certificate: x509.Certificate | str, key: PrivateKey) -> bool:
    cert = certificate if isinstance(certificate, x509.Certificate) else load_certificate(certificate)
    return same_public_key(cert.public_key(), key)


# ------------------------------------------------------------------------------------ external keys

# sign(data, padding or None for EC, hash) -> signature (DER for ECDSA, as cryptography expects)
ExternalSign = Callable[[bytes, padding.AsymmetricPadding | None, hashes.HashAlgorithm], bytes]


def _not_exportable(*_args: Any, **_kwargs: Any) -> Any:
    raise CryptoError("an external (token) private key cannot be exported or used for this operation")


class ExternalRSAKey(rsa.RSAPrivateKey):
    """An RSA private key living elsewhere (an HSM); only sign() and public_key() work."""

    def __init__(self, public: rsa.RSAPublicKey, sign: ExternalSign) -> None:
        self._public, self._sign = public, sign

    def sign(
        self, data: bytes | bytearray | memoryview, padding: padding.AsymmetricPadding, algorithm: Any
    ) -> bytes:
        return self._sign(bytes(data), padding, algorithm)

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    decrypt = private_numbers = private_bytes = _not_exportable

    def __copy__(self) -> ExternalRSAKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ExternalRSAKey:
        return self


class ExternalECKey(ec.EllipticCurvePrivateKey):
    """An EC private key living elsewhere (an HSM); only sign() and public_key() work."""

    def __init__(self, public: ec.EllipticCurvePublicKey, sign: ExternalSign) -> None:
        self._public, self._sign = public, sign

    def sign(
        self, data: bytes | bytearray | memoryview, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
    ) -> bytes:
        assert isinstance(signature_algorithm, ec.ECDSA)
        algorithm = signature_algorithm.algorithm
        assert isinstance(algorithm, hashes.HashAlgorithm)
        return self._sign(bytes(data), None, algorithm)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    exchange = private_numbers = private_bytes = _not_exportable

    def __copy__(self) -> ExternalECKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ExternalECKey:
        return self


def external_key(public: PublicKey, sign: ExternalSign) -> PrivateKey:
    if isinstance(public, rsa.RSAPublicKey):
        return ExternalRSAKey(public, sign)
    return ExternalECKey(public, sign)


def pss_salt_length(pss: padding.PSS, digest: hashes.HashAlgorithm) -> int:
    """The concrete salt length of a PSS padding (cryptography keeps it in a private attribute)."""
    salt: Any = getattr(pss, "_salt_length", None)
    if isinstance(salt, int):
        return salt
    if salt is padding.PSS.DIGEST_LENGTH:
        return digest.digest_size
    raise CryptoError(f"unsupported PSS salt length {salt!r}; use the digest length")


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PEM as AWS tooling writes it: RSA as PKCS#1, EC as PKCS#8."""
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if isinstance(key, rsa.RSAPrivateKey)
        else serialization.PrivateFormat.PKCS8
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def load_private_key(pem: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CryptoError(f"private key type {type(key).__name__} is not supported (RSA or EC)")
    return key
