"""Certificate issuers behind `ports.Issuer`: AWS IoT's own CA, or an AWS Private CA."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from botocore.exceptions import ClientError

from certrotator import crypto
from certrotator.backend.aws.clients import error_code
from certrotator.backend.ports import IssuedCertificate

if TYPE_CHECKING:
    from certrotator.backend.aws.clients import Clients


class IotIssuer:
    """AWS IoT signs the CSR and registers the certificate ACTIVE in one call."""

    def __init__(self, clients: Clients) -> None:
        self._clients = clients

    def issue(self, thing: str, csr_pem: str) -> IssuedCertificate:
        response = self._clients.iot.create_certificate_from_csr(
            certificateSigningRequest=csr_pem, setAsActive=True
        )
        return IssuedCertificate(certificate_id=response["certificateId"], pem=response["certificatePem"])


# AWS Private CA's IssueCertificate waiter polls GetCertificate every second, up to 60 times.
PCA_POLL_DELAY: Final = 1.0
PCA_POLL_ATTEMPTS: Final = 60


class PrivateCaIssuer:
    """AWS Private CA signs; the certificate is then registered in AWS IoT without its CA.

    Registered without a CA, AWS IoT authenticates the device by the exact certificate, so the device
    needs the leaf only: the reply carries no chain, which also keeps "the certificate file" and "the
    certificate whose id the registry knows" the same thing on the device.
    """

    def __init__(
        self,
        clients: Clients,
        *,
        ca_arn: str,
        signing_algorithm: crypto.CaSigningAlgorithm,
        validity_days: int,
        poll_delay: float = PCA_POLL_DELAY,
        poll_attempts: int = PCA_POLL_ATTEMPTS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if validity_days < 1:
            raise ValueError(f"validity_days must be positive, got {validity_days}")
        if poll_attempts < 1:
            raise ValueError(f"poll_attempts must be positive, got {poll_attempts}")
        self._clients = clients
        self._ca_arn = ca_arn
        self._signing_algorithm = signing_algorithm
        self._validity_days = validity_days
        self._poll_delay, self._poll_attempts, self._sleep = poll_delay, poll_attempts, sleep

    def issue(self, thing: str, csr_pem: str) -> IssuedCertificate:
        # Same thing + same CSR within the token's lifetime = the same certificate: a retried Lambda
        # invocation does not issue twice. (PCA tokens are at most 36 characters.)
        token = hashlib.sha256(f"{thing}\n{csr_pem}".encode()).hexdigest()[:36]
        issued = self._clients.acm_pca.issue_certificate(
            CertificateAuthorityArn=self._ca_arn,
            Csr=csr_pem.encode(),
            SigningAlgorithm=self._signing_algorithm.value,
            Validity={"Value": self._validity_days, "Type": "DAYS"},
            IdempotencyToken=token,
        )
        pem = self._fetch(issued["CertificateArn"])
        try:
            response = self._clients.iot.register_certificate_without_ca(certificatePem=pem, status="ACTIVE")
        except ClientError as exc:
            # A retried invocation registered it already; the id is the SHA-256 of the DER anyway.
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise
            return IssuedCertificate(certificate_id=crypto.certificate_id(pem), pem=pem)
        return IssuedCertificate(certificate_id=response["certificateId"], pem=pem)

    def _fetch(self, certificate_arn: str) -> str:
        # What the `certificate_issued` waiter does, but keeping the certificate from the successful
        # poll: the waiter discards it, which costs one more GetCertificate per rotation.
        for attempt in range(self._poll_attempts):
            try:
                response = self._clients.acm_pca.get_certificate(
                    CertificateAuthorityArn=self._ca_arn, CertificateArn=certificate_arn
                )
                return response["Certificate"]
            except ClientError as exc:
                if error_code(exc) != "RequestInProgressException" or attempt + 1 == self._poll_attempts:
                    raise
            self._sleep(self._poll_delay)
        raise AssertionError("unreachable")  # the loop returns or raises
