"""Every issuer the engine can rotate with, under every private CA it can make, rotates devices that
`certrotator local provision` provisioned from either issuer; and the whole path as a user runs it
(`local up` with an RSA private CA, `local provision` and the agents as processes of their own)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner

from certrotator import crypto
from certrotator.cli import app
from certrotator.device.standalone.config import load_device_config
from certrotator.local.ca import AWS_IOT_ISSUER, CaFiles, IssuerName
from certrotator.local.engine import EngineConfig
from certrotator.local.handles.base import EngineHandle
from certrotator.local.handles.process import EngineProcess, RemoteEngine
from certrotator.local.handles.thread import EngineThread
from certrotator.local.provision import CONFIG_FILE
from certrotator.sim.fleet import SimulatedDevice, SimulatedFleet

pytestmark = pytest.mark.timeout(180)

GROUP = "issuers"
H = TypeVar("H", bound=EngineHandle)


def provision_with_the_cli(
    fleet: SimulatedFleet[H], data_dir: Path, issuer: IssuerName, command: Sequence[str] = ()
) -> SimulatedDevice:
    """`certrotator local provision` (in this process, or as `command` when given), then the device
    joins the simulated fleet with the credentials directory it wrote."""
    thing = f"{GROUP}-{issuer.value}"
    out = fleet.root / "devices" / thing
    args = ["local", "provision", thing, "--out", str(out), "--data-dir", str(data_dir)]
    args += ["--group", GROUP, "--issuer", issuer.value, "--port", str(fleet.engine.port)]
    if command:
        done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    else:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    config = load_device_config(out / CONFIG_FILE)
    device = SimulatedDevice(thing, out, config, crypto.certificate_id(config.certificate.read_bytes()))
    fleet.devices.append(device)
    return device


def issued_by(cert: x509.Certificate, data_dir: Path, issuer: IssuerName) -> bool:
    ca = crypto.load_certificate(CaFiles.in_data_dir(data_dir).issuer_cert(issuer).read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def rotate(fleet: SimulatedFleet[H], job_id: str) -> None:
    report = fleet.run_job(job_id, GROUP, timeout_s=90, unlimited_rollout=True)
    fleet.verify(report)
    assert report.problems == [], report.problems
    assert report.verified == report.devices == len(fleet.devices)


@pytest.mark.parametrize("ca_signing", list(crypto.CaSigningAlgorithm))
@pytest.mark.parametrize("engine_issuer", list(IssuerName))
def test_every_issuer_and_private_ca_provisions_and_rotates(
    tmp_path: Path, engine_issuer: IssuerName, ca_signing: crypto.CaSigningAlgorithm
) -> None:
    data_dir = tmp_path / "engine"
    config = EngineConfig(data_dir, port=0, issuer=engine_issuer, private_ca_signing_algorithm=ca_signing)
    with EngineThread(config) as engine, SimulatedFleet(engine, tmp_path, threads=2) as fleet:
        devices = [provision_with_the_cli(fleet, data_dir, issuer) for issuer in IssuerName]
        for device, issuer in zip(devices, IssuerName, strict=True):
            assert issued_by(
                crypto.load_certificate(device.config.certificate.read_bytes()), data_dir, issuer
            )
        fleet.start_agents()
        rotate(fleet, "rotate")
        for device in devices:
            cert = crypto.load_certificate(device.config.certificate.read_bytes())
            assert issued_by(cert, data_dir, engine_issuer)
            expected = "sha256" if engine_issuer is IssuerName.IOT else ca_signing.hash().name
            assert cert.signature_hash_algorithm is not None
            assert cert.signature_hash_algorithm.name == expected


def test_rotation_under_an_rsa_private_ca_started_with_local_up(tmp_path: Path) -> None:
    """The issue's case, every piece a process of its own: `local up --issuer private-ca
    --ca-signing-algorithm SHA256WITHRSA`, `local provision` (which failed on the RSA CA), the agents."""
    data_dir = tmp_path / "engine"
    args = ["--issuer", "private-ca", "--ca-signing-algorithm", "SHA256WITHRSA", "--ca-validity-days", "30"]
    with EngineProcess(data_dir, args) as _process:
        remote = RemoteEngine(data_dir)
        with SimulatedFleet(remote, tmp_path, threads=1) as fleet:
            cli = [sys.executable, "-m", "certrotator.cli"]
            devices = [provision_with_the_cli(fleet, data_dir, issuer, cli) for issuer in IssuerName]
            fleet.start_agent_processes(devices)
            rotate(fleet, "rsa-private-ca")
            private_ca = crypto.load_certificate(
                CaFiles.in_data_dir(data_dir).issuer_cert(IssuerName.PRIVATE_CA).read_bytes()
            )
            assert isinstance(private_ca.public_key(), rsa.RSAPublicKey)
            for device in devices:
                cert = crypto.load_certificate(device.config.certificate.read_bytes())
                assert cert.issuer == private_ca.subject != AWS_IOT_ISSUER
                assert issued_by(cert, data_dir, IssuerName.PRIVATE_CA)
                assert cert.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.RSA_WITH_SHA256
                assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30
        remote.close()
