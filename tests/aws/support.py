"""Helpers for the AWS tests: things with real keys and certificates, a small CA, jobs answers."""

from __future__ import annotations

import contextlib
import datetime
import json
from dataclasses import dataclass
from typing import Any

from botocore.awsrequest import AWSResponse
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from moto.iot.models import iot_backends

from certrotator import crypto
from certrotator.backend.aws.clients import Clients

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
DEAD_PROXY = "http://127.0.0.1:9"
# moto's iot-data routes only the default host, not DescribeEndpoint's account-specific one.
MOTO_DATA_ENDPOINT = f"data-ats.iot.{REGION}.amazonaws.com"
EMPTY_POLICY = '{"Version":"2012-10-17","Statement":[]}'
ROTATION_DOCUMENT = '{"operation":"ROTATE_CERTIFICATE"}'


def moto_iot() -> Any:
    return iot_backends[ACCOUNT][REGION]


def execution_response(
    thing: str, job_id: str, status: str = "IN_PROGRESS", document: str | None = None
) -> dict[str, Any]:
    return {
        "execution": {
            "jobId": job_id,
            "thingName": thing,
            "status": status,
            "versionNumber": 2,
            "executionNumber": 1,
            "jobDocument": document if document is not None else ROTATION_DOCUMENT,
        }
    }


# ---------------------------------------------------------------------------------- devices and CAs


@dataclass
class Device:
    """A thing with a real key pair and its current certificate, as the device agent holds them."""

    thing: str
    key: crypto.PrivateKey
    certificate_pem: str

    @property
    def certificate_id(self) -> str:
        return crypto.certificate_id(self.certificate_pem)

    def new_csr(
        self, algorithm: crypto.KeyAlgorithm = crypto.KeyAlgorithm.ECDSA_P256
    ) -> tuple[crypto.PrivateKey, str]:
        key = crypto.generate_private_key(algorithm)
        signing = (
            crypto.SigningAlgorithm.SHA256WITHRSA
            if algorithm.family is crypto.Family.RSA
            else crypto.SigningAlgorithm.ECDSA_WITH_SHA256
        )
        subject = crypto.load_certificate(self.certificate_pem).subject
        return key, crypto.build_csr(key, signing, subject)


def provision(clients: Clients, thing: str, policy: str | None = "DevicePolicy") -> Device:
    """Create the thing and a certificate exclusively attached to it, with one policy."""
    iot = clients.iot
    iot.create_thing(thingName=thing)
    created = iot.create_keys_and_certificate(setAsActive=True)
    iot.attach_thing_principal(
        thingName=thing, principal=created["certificateArn"], thingPrincipalType="EXCLUSIVE_THING"
    )
    if policy is not None:
        with contextlib.suppress(iot.exceptions.ResourceAlreadyExistsException):
            iot.create_policy(policyName=policy, policyDocument=EMPTY_POLICY)
        iot.attach_policy(policyName=policy, target=created["certificateArn"])
    key = load_pem_private_key(created["keyPair"]["PrivateKey"].encode(), None)
    assert isinstance(key, crypto.PrivateKey)
    return Device(thing, key, created["certificatePem"])


class TestCa:
    """A small CA that signs a CSR's own key, as AWS IoT does (moto signs a random key instead)."""

    __test__ = False  # not a test class

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "certrotator test CA")])

    def sign(self, csr_pem: str) -> str:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.name)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .sign(self.key, crypto.CaSigningAlgorithm.SHA256WITHECDSA.hash())
        )
        return crypto.certificate_pem(certificate)


def sign_csrs_for_real(clients: Clients, ca: TestCa) -> None:
    """Answer iot CreateCertificateFromCsr with a certificate for the CSR's key, registered in moto.

    A `before-call` handler that returns a response short-circuits the HTTP request, the way
    botocore's Stubber does; the certificate goes into moto's registry directly.
    """

    def create_from_csr(params: dict[str, Any], model: Any, **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        body = json.loads(params["body"])
        pem = ca.sign(body["certificateSigningRequest"])
        status = "ACTIVE" if params["query_string"].get("setAsActive") == "true" else "INACTIVE"
        registered = moto_iot().register_certificate_without_ca(pem, status)
        parsed = {
            "certificateArn": registered.arn,
            "certificateId": registered.certificate_id,
            "certificatePem": pem,
            "ResponseMetadata": {"HTTPStatusCode": 200},
        }
        return AWSResponse(None, 200, {}, None), parsed  # type: ignore[arg-type]

    # botocore-stubs types handlers as returning None; before-call handlers may return a response
    clients.iot.meta.events.register(
        "before-call.iot.CreateCertificateFromCsr",
        create_from_csr,  # type: ignore[arg-type]
    )


def calls(client: Any, event: str) -> list[dict[str, Any]]:
    """Record the parameters of every call matching `event` (e.g. 'iot.DescribeEndpoint')."""
    seen: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        seen.append(dict(params))

    client.meta.events.register(f"provide-client-params.{event}", record)
    return seen
