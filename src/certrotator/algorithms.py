"""The algorithm tables (key, CSR signing and CA signing algorithms) and their parsing, without loading
`cryptography`.

`certrotator.crypto` re-exports everything here. The device agent imports this module instead: an
idle agent (connected, waiting for a job) then never loads `cryptography` and its X.509 modules,
~18 MB of its RSS and a fifth of its start-up; the key store loads them when a rotation needs them.
The methods that return `cryptography` objects (`curve`, `hash()`, `rsa_padding()`) import it then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from certrotator.compat import StrEnum

if TYPE_CHECKING:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    Digest = hashes.SHA256 | hashes.SHA384 | hashes.SHA512


class CryptoError(ValueError):
    """Bad key material, CSR or configuration; the text says what is wrong."""


class Family(StrEnum):
    RSA = "RSA"
    EC = "EC"


def _digest(name: str) -> Digest:
    from cryptography.hazmat.primitives import hashes

    digests: dict[str, type[Digest]] = {
        "SHA256": hashes.SHA256,
        "SHA384": hashes.SHA384,
        "SHA512": hashes.SHA512,
    }
    return digests[name]()


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
        from cryptography.hazmat.primitives.asymmetric import ec

        curves: dict[str, type[ec.EllipticCurve]] = {
            "P256": ec.SECP256R1,
            "P384": ec.SECP384R1,
            "P521": ec.SECP521R1,
        }
        return curves[self.value.split("-")[1]]()


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
        return _digest(self.value[:6] if self.family is Family.RSA else self.value[-6:])

    def rsa_padding(self) -> padding.AsymmetricPadding | None:
        """The RSA padding for this algorithm (PSS salt = hash length, as AWS IoT expects)."""
        if self.family is Family.EC:
            return None
        from cryptography.hazmat.primitives.asymmetric import padding

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
        return _digest(self.value[:6])


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
