"""Certificate authorities of the local IoT Core, kept as files in `<data dir>/ca/`.

Generated on first use, loaded afterwards (`ensure_local_ca` is idempotent and safe to call from two
processes at once: generation runs under a file lock):

- the server CA signs the broker's TLS certificate; devices trust it as their root CA, so its
  certificate is written as `AmazonRootCA1.pem`, the file name devices already use;
- the "AWS IoT" issuer signs CSRs the way CreateCertificateFromCsr does: subject and public key come
  from the CSR, the serial is random, validity runs from now to 2049-12-31T23:59:59Z, and the signature
  is sha256WithRSAEncryption by an RSA-2048 CA named as AWS IoT's (`OU=Amazon Web Services
  O=Amazon.com Inc. L=Seattle ST=Washington C=US`, one OU attribute, as in AWS's certificates), so tools
  that inspect a certificate see here what they will see on AWS;
- the "private CA" issuer stands in for AWS Private CA: its signing algorithm (and so its key family)
  and the validity of what it issues are configurable.

A data directory keeps its CAs: devices hold certificates they issued. Each issuer signs with the
algorithm of its own CA certificate when the CA exists (`load_local_ca`), so a data directory made
before the "AWS IoT" issuer became RSA keeps its EC issuer and keeps working; a new data directory gets
the RSA one.

The broker trusts both issuers, and nothing else, for client authentication (`client-ca-bundle.pem`).
The server CA is EC P-256. Key files are owner-only (0600) and, like every file here, written
atomically (temp file, fsync, rename, fsync directory).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certrotator.compat import UTC, StrEnum
from certrotator.crypto import (
    CaSigningAlgorithm,
    CryptoError,
    PrivateKey,
    certificate_pem,
    inspect_csr,
)
from certrotator.fsutil import atomic_write
from certrotator.local.ca_material import (
    ensure_ca_pair,
    ensure_server_cert,
    existing_algorithm,
    file_lock,
    key_usage,
    local_name,
)

# AWS IoT's CreateCertificateFromCsr certificates are valid until this instant.
AWS_IOT_NOT_AFTER: Final = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)
# The issuer of every certificate CreateCertificateFromCsr returns: one OU attribute whose value carries
# the rest (openssl shows `OU = Amazon Web Services O=Amazon.com Inc. L=Seattle ST=Washington C=US`).
AWS_IOT_ISSUER: Final = x509.Name(
    [
        x509.NameAttribute(
            NameOID.ORGANIZATIONAL_UNIT_NAME,
            "Amazon Web Services O=Amazon.com Inc. L=Seattle ST=Washington C=US",
        )
    ]
)
AWS_IOT_SIGNING_ALGORITHM: Final = CaSigningAlgorithm.SHA256WITHRSA
DEFAULT_PRIVATE_CA_SIGNING_ALGORITHM: Final = CaSigningAlgorithm.SHA256WITHECDSA


class IssuerName(StrEnum):
    IOT = "iot"
    PRIVATE_CA = "private-ca"


@dataclass(frozen=True, slots=True)
class CaFiles:
    """Where the CA material lives; all paths derive from one directory."""

    directory: Path

    @classmethod
    def in_data_dir(cls, data_dir: str | os.PathLike[str]) -> CaFiles:
        return cls(Path(data_dir) / "ca")

    @property
    def root_ca(self) -> Path:
        """The server CA certificate: what devices trust (and install as AmazonRootCA1.pem)."""
        return self.directory / "AmazonRootCA1.pem"

    @property
    def server_ca_key(self) -> Path:
        return self.directory / "server-ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def client_ca_bundle(self) -> Path:
        """Both issuers' CA certificates: the broker's trust store for client certificates."""
        return self.directory / "client-ca-bundle.pem"

    def issuer_cert(self, issuer: IssuerName) -> Path:
        return self.directory / f"{issuer.value}-ca.crt"

    def issuer_key(self, issuer: IssuerName) -> Path:
        return self.directory / f"{issuer.value}-ca.key"


@dataclass(frozen=True, slots=True)
class Issuer:
    """A CA that issues device (client) certificates.

    `validity_days` None means AWS IoT's fixed end date (AWS_IOT_NOT_AFTER).
    """

    name: IssuerName
    certificate: x509.Certificate
    key: PrivateKey
    signing_algorithm: CaSigningAlgorithm
    validity_days: int | None

    def issue(
        self, public_key: CertificatePublicKeyTypes, subject: x509.Name, *, now: dt.datetime | None = None
    ) -> x509.Certificate:
        """A client certificate for `public_key` and `subject`, with a random serial."""
        start = (now or dt.datetime.now(UTC)).replace(microsecond=0)
        if self.validity_days is None:
            end = AWS_IOT_NOT_AFTER
        else:
            end = start + dt.timedelta(days=self.validity_days)
        if end > self.certificate.not_valid_after_utc:
            # AWS Private CA refuses a validity beyond the CA's own; so do we.
            raise CryptoError(
                f"{self.name.value}: validity until {end:%Y-%m-%d} exceeds the CA's "
                f"({self.certificate.not_valid_after_utc:%Y-%m-%d})"
            )
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
            )
        )
        return builder.sign(self.key, self.signing_algorithm.hash())

    def sign_csr(
        self, csr: str | bytes | x509.CertificateSigningRequest, *, now: dt.datetime | None = None
    ) -> x509.Certificate:
        """Issue as CreateCertificateFromCsr does: the CSR's subject and key; its signature must verify."""
        if isinstance(csr, x509.CertificateSigningRequest):
            csr = csr.public_bytes(serialization.Encoding.PEM)
        request = inspect_csr(csr)
        if not request.signature_valid:
            raise CryptoError("CSR signature does not verify")
        return self.issue(request.public_key, request.subject, now=now)


@dataclass(frozen=True, slots=True)
class LocalCa:
    files: CaFiles
    iot: Issuer
    private_ca: Issuer

    def issuer(self, name: IssuerName | str) -> Issuer:
        return self.iot if IssuerName(name) is IssuerName.IOT else self.private_ca


def ensure_local_ca(
    data_dir: str | os.PathLike[str],
    *,
    private_ca_signing_algorithm: CaSigningAlgorithm = DEFAULT_PRIVATE_CA_SIGNING_ALGORITHM,
    private_ca_validity_days: int = 365,
    now: dt.datetime | None = None,
) -> LocalCa:
    """Load the CAs from `<data_dir>/ca/`, generating whatever is missing (what `local up` does, with
    its options; elsewhere use `load_local_ca`).

    Raises CryptoError if existing material is inconsistent (a certificate without its key, a key that
    does not match its certificate) or if the private CA's key family does not match
    `private_ca_signing_algorithm` (a data directory keeps its private CA; it is not regenerated).
    """
    if private_ca_validity_days < 1:
        raise CryptoError(f"private CA validity must be at least 1 day, got {private_ca_validity_days}")
    files = CaFiles.in_data_dir(data_dir)
    files.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    when = now or dt.datetime.now(UTC)
    with file_lock(files.directory / ".lock"):
        server_ca_cert, server_ca_key = ensure_ca_pair(
            files.root_ca,
            files.server_ca_key,
            local_name("certrotator local server CA"),
            CaSigningAlgorithm.SHA256WITHECDSA,
            when,
        )
        ensure_server_cert(files.server_cert, files.server_key, server_ca_cert, server_ca_key, when)
        # An "AWS IoT" CA made before it became RSA stays as it is: see the module docstring.
        iot_algorithm = existing_algorithm(
            files.issuer_cert(IssuerName.IOT), files.issuer_key(IssuerName.IOT)
        )
        iot_cert, iot_key = ensure_ca_pair(
            files.issuer_cert(IssuerName.IOT),
            files.issuer_key(IssuerName.IOT),
            AWS_IOT_ISSUER,
            iot_algorithm or AWS_IOT_SIGNING_ALGORITHM,
            when,
        )
        private_cert, private_key = ensure_ca_pair(
            files.issuer_cert(IssuerName.PRIVATE_CA),
            files.issuer_key(IssuerName.PRIVATE_CA),
            local_name("certrotator local private CA"),
            private_ca_signing_algorithm,
            when,
        )
        bundle = (certificate_pem(iot_cert) + certificate_pem(private_cert)).encode()
        if not files.client_ca_bundle.exists() or files.client_ca_bundle.read_bytes() != bundle:
            atomic_write(files.client_ca_bundle, bundle, 0o644)
    return LocalCa(
        files=files,
        iot=Issuer(IssuerName.IOT, iot_cert, iot_key, iot_algorithm or AWS_IOT_SIGNING_ALGORITHM, None),
        private_ca=Issuer(
            IssuerName.PRIVATE_CA,
            private_cert,
            private_key,
            private_ca_signing_algorithm,
            private_ca_validity_days,
        ),
    )


def load_local_ca(
    data_dir: str | os.PathLike[str],
    *,
    private_ca_validity_days: int = 365,
    now: dt.datetime | None = None,
) -> LocalCa:
    """The CAs of `data_dir` as the engine made them, each issuer signing with its CA certificate's own
    algorithm (the private CA's is `local up --ca-signing-algorithm`, which the data directory does not
    record elsewhere); generated with the defaults when there are none yet. The one way to open the CAs
    of an existing data directory: `local provision`, the process handle. The validity of what the
    private CA issues is an engine option, not kept in the data directory: pass it."""
    files = CaFiles.in_data_dir(data_dir)
    algorithm = existing_algorithm(
        files.issuer_cert(IssuerName.PRIVATE_CA), files.issuer_key(IssuerName.PRIVATE_CA)
    )
    return ensure_local_ca(
        data_dir,
        private_ca_signing_algorithm=algorithm or DEFAULT_PRIVATE_CA_SIGNING_ALGORITHM,
        private_ca_validity_days=private_ca_validity_days,
        now=now,
    )
