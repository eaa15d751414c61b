"""Fixtures for the AWS adapters and Lambda entry points: moto where it is faithful, Stubber elsewhere.

moto is imported before anything can create a boto3 client (a client created earlier is not
intercepted), and every test runs with fake credentials and proxies pointing at a dead local port,
so a call that escapes the mocks fails at once instead of reaching AWS.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import moto  # noqa: F401 -- must precede every boto3 client
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from certrotator.backend.aws import lambdas
from certrotator.backend.aws.clients import Clients, get_clients, reset_clients
from tests.aws_isolation import isolate_from_aws

from .support import REGION, TestCa


@pytest.fixture(autouse=True)
def aws_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    isolate_from_aws(monkeypatch, tmp_path_factory, REGION)
    monkeypatch.setenv("IOT_JOBS_ENDPOINT", f"data.jobs.iot.{REGION}.amazonaws.com")
    # The entry points copy the powertools handler onto the "certrotator" logger; undo that so
    # tests elsewhere see the standard logging setup again.
    package_logger = logging.getLogger("certrotator")
    saved = (package_logger.handlers[:], package_logger.propagate, package_logger.level)
    reset_clients()
    lambdas.reset_container()
    yield
    reset_clients()
    lambdas.reset_container()
    package_logger.handlers[:], package_logger.propagate = saved[0], saved[1]
    package_logger.setLevel(saved[2])


@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws(config={"iot": {"use_valid_cert": True}}):
        yield


@pytest.fixture
def clients(aws: None) -> Clients:
    return get_clients(REGION)


@pytest.fixture
def jobs_stub(clients: Clients) -> Iterator[Stubber]:
    """moto has no iot-jobs-data at all: stub the container's client."""
    with Stubber(clients.iot_jobs_data) as stub:
        yield stub


@pytest.fixture
def test_ca() -> TestCa:
    return TestCa()


@pytest.fixture
def private_ca(clients: Clients) -> str:
    """An ACTIVE root CA in moto's AWS Private CA."""
    pca = clients.acm_pca
    ca_arn = pca.create_certificate_authority(
        CertificateAuthorityConfiguration={
            "KeyAlgorithm": "EC_prime256v1",
            "SigningAlgorithm": "SHA256WITHECDSA",
            "Subject": {"CommonName": "fleet CA"},
        },
        CertificateAuthorityType="ROOT",
    )["CertificateAuthorityArn"]
    csr = pca.get_certificate_authority_csr(CertificateAuthorityArn=ca_arn)["Csr"]
    root = pca.issue_certificate(
        CertificateAuthorityArn=ca_arn,
        Csr=csr.encode(),
        SigningAlgorithm="SHA256WITHECDSA",
        TemplateArn="arn:aws:acm-pca:::template/RootCACertificate/V1",
        Validity={"Value": 10, "Type": "YEARS"},
    )["CertificateArn"]
    pem = pca.get_certificate(CertificateAuthorityArn=ca_arn, CertificateArn=root)["Certificate"]
    pca.import_certificate_authority_certificate(CertificateAuthorityArn=ca_arn, Certificate=pem.encode())
    return ca_arn
