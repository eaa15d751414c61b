"""Every key algorithm × CSR signing algorithm of its family, and every private-CA signing algorithm,
rotate end to end; plus a check that the invariant verifier itself catches a broken device."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certrotator import crypto
from certrotator.local.ca import IssuerName

from .harness import rotate_verified, running_fleet

pytestmark = pytest.mark.timeout(180)

COMBINATIONS = [(k, s) for k in crypto.KeyAlgorithm for s in crypto.SigningAlgorithm if k.family is s.family]


def test_every_key_and_signing_algorithm_rotates(tmp_path: Path) -> None:
    assert len(COMBINATIONS) == 21
    with running_fleet(tmp_path) as fleet:
        for i, (key, signing) in enumerate(COMBINATIONS):
            fleet.provision(
                1, group="matrix", key_algorithm=key, signing_algorithm=signing, state_timeout_s=20
            )
            device = fleet.devices[i]
            assert (device.config.key_algorithm, device.config.signing_algorithm) == (key, signing)
        fleet.start_agents()
        report = rotate_verified(fleet, "matrix", group="matrix", timeout_s=150)
        assert report.verified == 21
        for device, (key, _) in zip(fleet.devices, COMBINATIONS, strict=True):
            new_key = crypto.load_certificate(device.config.certificate.read_bytes()).public_key()
            assert crypto.key_algorithm_of(new_key) is key


@pytest.mark.parametrize("ca_signing", list(crypto.CaSigningAlgorithm))
def test_private_ca_issuer_for_each_signing_algorithm(
    tmp_path: Path, ca_signing: crypto.CaSigningAlgorithm
) -> None:
    with running_fleet(
        tmp_path,
        issuer=IssuerName.PRIVATE_CA,
        private_ca_signing_algorithm=ca_signing,
        private_ca_validity_days=7,
    ) as fleet:
        (device,) = fleet.provision(1, state_timeout_s=10)
        fleet.start_agents()
        rotate_verified(fleet, "pca")
        cert = crypto.load_certificate(device.config.certificate.read_bytes())
        ca = fleet.engine.call(lambda e: e.ca.private_ca.certificate)
        assert cert.issuer == ca.subject
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=7)
        assert cert.signature_hash_algorithm is not None
        assert cert.signature_hash_algorithm.name == ca_signing.hash().name
        family_key = rsa.RSAPublicKey if ca_signing.family is crypto.Family.RSA else ec.EllipticCurvePublicKey
        assert isinstance(ca.public_key(), family_key)


def test_the_verifier_catches_a_device_with_a_mismatched_pair(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        (device,) = fleet.provision(1, state_timeout_s=10)
        fleet.start_agents()
        report = fleet.run_job("tampered", timeout_s=60, unlimited_rollout=True)
        assert device.config.private_key is not None
        other = crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P256)
        device.config.private_key.write_bytes(crypto.private_key_pem(other))
        fleet.verify(report)
        assert [p.what for p in report.problems] == ["certificate and key on the device do not match"]
        assert report.verified == 0
