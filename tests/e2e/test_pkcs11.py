"""Standalone agents with keys in a PKCS#11 token (SoftHSM2) rotate end to end over real mTLS: the
new key is generated in the token, the CSR signed by it, the TLS connection made with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from certrotator import crypto
from certrotator.sim.softhsm import CONF_ENV, softhsm_available, softhsm_config

from .harness import running_fleet

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(softhsm_available() is not None, reason=str(softhsm_available())),
]


@pytest.mark.parametrize(
    ("key", "signing"),
    [
        (crypto.KeyAlgorithm.RSA_2048, crypto.SigningAlgorithm.SHA256WITHRSAANDMGF1),
        (crypto.KeyAlgorithm.ECDSA_P256, crypto.SigningAlgorithm.ECDSA_WITH_SHA256),
    ],
)
def test_pkcs11_devices_rotate(
    tmp_path: Path, key: crypto.KeyAlgorithm, signing: crypto.SigningAlgorithm
) -> None:
    conf = softhsm_config(tmp_path)
    with running_fleet(tmp_path) as fleet:
        devices = fleet.provision(2, key_algorithm=key, signing_algorithm=signing, state_timeout_s=20)
        fleet.move_keys_into_tokens(conf, devices)
        assert all(
            d.config.store == "pkcs11" and not (d.directory / "private.pem.key").exists() for d in devices
        )
        processes = fleet.start_agent_processes(devices, env={CONF_ENV: str(conf)})
        try:
            report = fleet.run_job("hsm", timeout_s=120, unlimited_rollout=True)
            fleet.verify(report)
        finally:
            for p in processes:
                p.terminate()
            for p in processes:
                p.wait(timeout=30)
        assert report.problems == [], report.problems
        assert report.verified == 2
        for device in devices:
            cert = crypto.load_certificate(device.config.certificate.read_bytes())
            assert crypto.key_algorithm_of(cert.public_key()) is key

            assert not (device.directory / "private.pem.key").exists()  # the key never left the token
            assert "pkcs11" in (device.directory / "device.toml").read_text()
