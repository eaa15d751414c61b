"""Standalone agents with keys in a PKCS#11 token (SoftHSM2) rotate end to end over real mTLS: the
new key is generated in the token, the CSR signed by it, the TLS connection made with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from certrotator import crypto
from certrotator.local.provision import KEY_FILE
from certrotator.sim.softhsm import SoftHsm, softhsm_available

from .harness import rotate_verified, running_fleet

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
    with running_fleet(tmp_path) as fleet:
        devices = fleet.provision(
            2, key_algorithm=key, signing_algorithm=signing, state_timeout_s=20, keystore="pkcs11"
        )
        assert all(d.config.store == "pkcs11" and not (d.directory / KEY_FILE).exists() for d in devices)
        # each device has a token directory of its own, as each real device has its own HSM
        confs = {d.softhsm.conf for d in devices if d.softhsm is not None}
        assert len(confs) == 2 and all(c.is_relative_to(tmp_path / "devices") for c in confs)
        with pytest.raises(ValueError, match="agent processes"):
            fleet.start_agents(devices)  # one process, one SOFTHSM2_CONF: refused, not half-working

        fleet.start_agent_processes(devices)
        rotate_verified(fleet, "hsm", timeout_s=120)
        fleet.stop_agents()
        for device in devices:
            cert = crypto.load_certificate(device.config.certificate.read_bytes())
            assert crypto.key_algorithm_of(cert.public_key()) is key
            assert not (device.directory / KEY_FILE).exists()  # the key never left the token


def test_two_agents_sharing_one_token_directory_start_together_and_rotate(tmp_path: Path) -> None:
    """Like the Greengrass nucleus and the component on one device: two processes open one SoftHSM2
    token directory at the same moment (SoftHSM's file store can answer one of them with
    CKR_GENERAL_ERROR; the agent must ride that out at start-up)."""
    shared = SoftHsm.create(tmp_path / "shared-softhsm")
    with running_fleet(tmp_path) as fleet:
        devices = fleet.provision(2, state_timeout_s=20, keystore="pkcs11", softhsm=shared)
        assert {d.softhsm for d in devices} == {shared}
        for _ in range(3):  # the race is on opening the token: start them together a few times
            fleet.start_agent_processes(devices, timeout_s=30)
            fleet.stop_agents()
        fleet.start_agent_processes(devices, timeout_s=30)
        rotate_verified(fleet, "shared-token", timeout_s=120)
