"""Child process of the file store's power-loss tests, plus the small CA both sides use.

    python crash_child.py ROOT install|rollback|commit

ROOT holds `device/` (the credentials and the journal, see `store_at`) and `ca/` (`make_ca`). The child
does what the agent does at boot (`recover()`), then one credential step:

- install: generate the new key (`prepare`), have the test CA sign its CSR, save the certificate as
  ROOT/issued.pem (so the test knows the new pair), install it;
- rollback / commit: of the installed state the test prepared.

With CERTROTATOR_CRASH_AT=<crash point> in its environment the child dies there with exit code 86 and no
cleanup, as a power cut would leave the disk. The extra point AFTER_INSTALL (in the child, not in the
store) kills it right after install() returned. A step that runs to its end exits with 0.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certrotator import crypto
from certrotator.device.journal import crash_point
from certrotator.device.keystores.files import FileKeyStore

JOB = "rotate-1"
KEY_ALGORITHM = crypto.KeyAlgorithm.ECDSA_P256
SIGNING_ALGORITHM = crypto.SigningAlgorithm.ECDSA_WITH_SHA256
AFTER_INSTALL = "child.install.returned"
STEPS = ("install", "rollback", "commit")


# ------------------------------------------------------------------------------------------ test CA


def make_ca(root: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed P-256 CA, saved as ROOT/ca/ca.key and ROOT/ca/ca.pem."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certrotator test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = root / "ca"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.key").write_bytes(crypto.private_key_pem(key))
    (directory / "ca.pem").write_text(crypto.certificate_pem(cert))
    return key, cert


def load_ca(root: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key((root / "ca" / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, crypto.load_certificate((root / "ca" / "ca.pem").read_bytes())


def issue(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    public_key: crypto.PublicKey,
    subject: x509.Name,
) -> str:
    """A device certificate (PEM) for `public_key`, signed by the CA."""
    ca_key, ca_cert = ca
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return crypto.certificate_pem(cert)


def issue_for_csr(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], csr_pem: str) -> str:
    """What the backend does with a create request: check the CSR, issue a certificate for its key."""
    info = crypto.inspect_csr(csr_pem)
    assert info.signature_valid, "the device's CSR signature does not verify"
    public = info.public_key
    assert isinstance(public, crypto.PublicKey)
    return issue(ca, public, info.subject)


# ------------------------------------------------------------------------------------------ device


def store_at(root: Path) -> FileKeyStore:
    device = root / "device"
    return FileKeyStore(device / "cert.pem", device / "key.pem", device / "journal.json")


def provision(root: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> FileKeyStore:
    """The device's first (old) pair: a P-256 key and its certificate, as a provisioning tool writes them."""
    store = store_at(root)
    store.cert.parent.mkdir(parents=True, exist_ok=True)
    key = crypto.generate_private_key(KEY_ALGORITHM)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "thing-1")])
    store.key.write_bytes(crypto.private_key_pem(key))
    store.key.chmod(0o600)
    store.cert.write_text(issue(ca, key.public_key(), subject))
    return store


def rotate(store: FileKeyStore, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> str:
    """prepare + sign + install; returns the new certificate (PEM)."""
    csr = store.prepare(JOB, KEY_ALGORITHM, SIGNING_ALGORITHM)
    certificate = issue_for_csr(ca, csr)
    store.install(JOB, certificate)
    return certificate


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in STEPS:
        print(f"usage: crash_child.py ROOT {'|'.join(STEPS)}", file=sys.stderr)
        return 2
    root, step = Path(argv[0]), argv[1]
    store = store_at(root)
    store.recover()
    if step == "install":
        csr = store.prepare(JOB, KEY_ALGORITHM, SIGNING_ALGORITHM)
        certificate = issue_for_csr(load_ca(root), csr)
        (root / "issued.pem").write_text(certificate)
        store.install(JOB, certificate)
        crash_point(AFTER_INSTALL)
    elif step == "rollback":
        store.rollback()
    else:
        store.commit()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
