"""Algorithm tables, CSR building and inspection, certificate ids: the crypto both sides share.

Keys are generated and CSRs signed here for software keys; external keys (an HSM) plug in through
`ExternalRSAKey` / `ExternalECKey`, whose `sign` delegates to a callable, because `cryptography`'s
CSR builder only needs `sign()` and `public_key()` from the private key it is given.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

# The tables live where the device agent can use them without loading `cryptography`; same objects,
# re-exported (`X as X`) for everything that imports them from here.
from certrotator.algorithms import CaSigningAlgorithm as CaSigningAlgorithm  # noqa: PLC0414
from certrotator.algorithms import CryptoError as CryptoError  # noqa: PLC0414
from certrotator.algorithms import Family as Family  # noqa: PLC0414
from certrotator.algorithms import KeyAlgorithm as KeyAlgorithm  # noqa: PLC0414
from certrotator.algorithms import SigningAlgorithm as SigningAlgorithm  # noqa: PLC0414
from certrotator.algorithms import check_family as check_family  # noqa: PLC0414
from certrotator.algorithms import parse_ca_signing_algorithm as parse_ca_signing_algorithm  # noqa: PLC0414
from certrotator.algorithms import parse_key_algorithm as parse_key_algorithm  # noqa: PLC0414
from certrotator.algorithms import parse_signing_algorithm as parse_signing_algorithm  # noqa: PLC0414

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
Digest = hashes.SHA256 | hashes.SHA384 | hashes.SHA512


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
        data = pem.encode() if isinstance(pem, str) else bytes(pem)
    except (ValueError, TypeError) as exc:  # e.g. a lone surrogate in the text
        raise CryptoError(f"CSR is not a well-formed PEM certificate signing request ({exc})") from None
    return _inspect_csr(data)


# PERF: a create request's CSR is inspected twice, by the handler's CSR policy and again by the issuer
# (as CreateCertificateFromCsr verifies it again); the result depends on the bytes alone.
@functools.lru_cache(maxsize=64)
def _inspect_csr(data: bytes) -> CsrInfo:
    try:
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


_Key = TypeVar("_Key", bound="_ExternalKey")


class _ExternalKey:
    """What both external keys share: the public half's size, and no copies (the key is in the token:
    a copy would be the same key, so copy and deepcopy give the object itself)."""

    _public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def __copy__(self: _Key) -> _Key:
        return self

    def __deepcopy__(self: _Key, memo: dict[int, Any]) -> _Key:
        return self


class ExternalRSAKey(_ExternalKey, rsa.RSAPrivateKey):
    """An RSA private key living elsewhere (an HSM); only sign() and public_key() work."""

    _public: rsa.RSAPublicKey

    def __init__(self, public: rsa.RSAPublicKey, sign: ExternalSign) -> None:
        self._public, self._sign = public, sign

    def sign(
        self, data: bytes | bytearray | memoryview, padding: padding.AsymmetricPadding, algorithm: Any
    ) -> bytes:
        return self._sign(bytes(data), padding, algorithm)

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    decrypt = private_numbers = private_bytes = _not_exportable


class ExternalECKey(_ExternalKey, ec.EllipticCurvePrivateKey):
    """An EC private key living elsewhere (an HSM); only sign() and public_key() work."""

    _public: ec.EllipticCurvePublicKey

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

    exchange = private_numbers = private_bytes = _not_exportable


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
