"""A fresh SoftHSM2 token per test, a test CA, provisioning of a device pair, and independent checks.

SoftHSM reads `SOFTHSM2_CONF` when the library is initialised, and python-pkcs11 keeps one library
instance per process, so `create_softhsm` re-initialises it after pointing the variable at the new
token directory (every open session of the previous token dies with that).

The checks here read the token with their own session and their own signing code, so that a store
bug cannot hide behind the store's own view.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, CertificateType, Mechanism, ObjectClass
from pkcs11.exceptions import UserAlreadyLoggedIn
from pkcs11.util.ec import decode_ec_private_key, decode_ec_public_key, encode_ecdsa_signature
from pkcs11.util.rsa import decode_rsa_private_key, decode_rsa_public_key

from certrotator import crypto
from certrotator.crypto import KeyAlgorithm
from certrotator.device.keystores.pkcs11.location import Pkcs11Config
from certrotator.sim import softhsm as sim_softhsm
from certrotator.sim.softhsm import CONF_ENV, SOFTHSM_MODULE, USER_PIN, softhsm_available

SKIP_REASON = (
    f"SoftHSM2 is not installed ({softhsm_available()}); `make test` installs it (apt-get install softhsm2)"
)

TOKEN_LABEL = "T"
KEY_LABEL = "device-key"
CERT_LABEL = "device-cert"
INITIAL_ID = b"\x00\x01"
DEVICE_SUBJECT = x509.Name(
    [
        x509.NameAttribute(NameOID.COMMON_NAME, "thing-1"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test"),
    ]
)


@dataclass(frozen=True)
class SoftHsm:
    directory: Path
    conf: Path
    token_label: str = TOKEN_LABEL
    user_pin: str = USER_PIN

    def config(self, key_label: str = KEY_LABEL, cert_label: str = CERT_LABEL) -> Pkcs11Config:
        return Pkcs11Config.from_uris(
            library=SOFTHSM_MODULE,
            private_key_uri=f"pkcs11:object={key_label};type=private",
            certificate_uri=f"pkcs11:object={cert_label};type=cert",
            user_pin=self.user_pin,
            token_label=self.token_label,
        )

    def token(self) -> Any:
        return pkcs11.lib(str(SOFTHSM_MODULE)).get_token(token_label=self.token_label)

    @contextmanager
    def session(self) -> Iterator[Any]:
        """A logged-in read/write session of our own (shares the login if a store holds it)."""
        token = self.token()
        try:
            session = token.open(rw=True, user_pin=self.user_pin)
        except UserAlreadyLoggedIn:
            session = token.open(rw=True)
        try:
            yield session
        finally:
            session.close()


def create_softhsm(directory: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsm:
    if softhsm_available() is not None:
        pytest.skip(SKIP_REASON)
    tokens = sim_softhsm.SoftHsm.create(directory)  # the simulated fleet's configuration: one token dir
    monkeypatch.setenv(CONF_ENV, str(tokens.conf))  # inherited by the crash subprocesses too
    tokens.init_token(TOKEN_LABEL)
    pkcs11.lib(str(SOFTHSM_MODULE)).reinitialize()
    return SoftHsm(directory=directory, conf=tokens.conf)


class TestCa:
    """A throwaway EC CA that issues device certificates for CSRs or bare public keys."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certrotator test CA")])
        now = dt.datetime.now(dt.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, public_key: crypto.PublicKey, subject: x509.Name = DEVICE_SUBJECT) -> x509.Certificate:
        now = dt.datetime.now(dt.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )

    def issue_for_csr(self, csr_pem: str) -> str:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        public = csr.public_key()
        assert isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        return crypto.certificate_pem(self.issue(public, csr.subject))


def provision(
    hsm: SoftHsm,
    ca: TestCa,
    key_algorithm: KeyAlgorithm,
    certificate_file: Path,
    *,
    with_public: bool = True,
    certificate_key: crypto.PrivateKey | None = None,
    key_label: str = KEY_LABEL,
    cert_label: str | None = CERT_LABEL,
) -> x509.Certificate:
    """Import an initial device pair the way provisioning tools do (softhsm2-util --import, p11tool):
    a software key, non-extractable and non-copyable in the token; the certificate as an object and a
    file. Importing is much cheaper than token key generation (RSA-3072: ~0.3 s vs ~0.9 s).
    `certificate_key` issues the certificate for another key (a broken pair); `cert_label` None keeps
    the certificate only as a file."""
    key = crypto.generate_private_key(key_algorithm)
    certificate = ca.issue((certificate_key or key).public_key())
    common = {Attribute.TOKEN: True, Attribute.LABEL: key_label, Attribute.ID: INITIAL_ID}
    if isinstance(key, rsa.RSAPrivateKey):
        private = decode_rsa_private_key(
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        public = decode_rsa_public_key(
            key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        )
    else:
        private = decode_ec_private_key(
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        public = decode_ec_public_key(
            key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        private[Attribute.SIGN] = True
    private.update(
        {
            **common,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.COPYABLE: False,  # as on real HSMs: the store must relabel, never copy
        }
    )
    public.update({**common, Attribute.PRIVATE: False})
    with hsm.session() as s:
        s.create_object(private)
        if with_public:
            s.create_object(public)
        if cert_label is not None:
            s.create_object(
                {
                    Attribute.CLASS: ObjectClass.CERTIFICATE,
                    Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.LABEL: cert_label,
                    Attribute.ID: INITIAL_ID,
                    Attribute.SUBJECT: certificate.subject.public_bytes(),
                    Attribute.VALUE: certificate.public_bytes(serialization.Encoding.DER),
                }
            )
    certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate


# ------------------------------------------------------------------------------ independent checks


@dataclass(frozen=True)
class TokenObject:
    kind: str  # "private", "public" or "cert"
    label: str
    id: bytes
    value: bytes | None  # certificate DER


_KINDS = {
    ObjectClass.PRIVATE_KEY: "private",
    ObjectClass.PUBLIC_KEY: "public",
    ObjectClass.CERTIFICATE: "cert",
}


def snapshot(hsm: SoftHsm) -> list[TokenObject]:
    """Every object in the token, sorted (to compare a token before and after an operation)."""
    result = []
    with hsm.session() as s:
        for obj in list(s.get_objects()):
            kind = _KINDS.get(obj.object_class, str(obj.object_class))
            value = bytes(obj[Attribute.VALUE]) if kind == "cert" else None
            result.append(TokenObject(kind, str(obj[Attribute.LABEL]), bytes(obj[Attribute.ID]), value))
    return sorted(result, key=lambda o: (o.kind, o.label, o.id, o.value or b""))


def _token_signature_verifies(private_key: Any, public: crypto.PublicKey) -> bool:
    challenge = os.urandom(48)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            signature = private_key.sign(challenge, mechanism=Mechanism.SHA256_RSA_PKCS)
            public.verify(signature, challenge, padding.PKCS1v15(), hashes.SHA256())
        else:
            digest = hashes.Hash(hashes.SHA256())
            digest.update(challenge)
            raw = private_key.sign(digest.finalize(), mechanism=Mechanism.ECDSA)
            public.verify(encode_ecdsa_signature(raw), challenge, ec.ECDSA(hashes.SHA256()))
    except Exception:
        return False
    return True


def live_pair(
    hsm: SoftHsm, certificate_file: Path, key_label: str = KEY_LABEL, cert_label: str = CERT_LABEL
) -> x509.Certificate:
    """Assert the configured labels name exactly one matching key + certificate, that no rotation
    leftover (`.new`) exists, and that the certificate file is the token's certificate; return it."""
    with hsm.session() as s:
        privates = list(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: key_label}))
        publics = list(s.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: key_label}))
        certs = list(s.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: cert_label}))
        assert (len(privates), len(certs)) == (1, 1), (privates, certs)
        assert len(publics) <= 1
        certificate = x509.load_der_x509_certificate(bytes(certs[0][Attribute.VALUE]))
        public_key = certificate.public_key()
        assert isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        assert _token_signature_verifies(privates[0], public_key), "key does not match certificate"
        assert bytes(privates[0][Attribute.ID]) == bytes(certs[0][Attribute.ID]), "key and cert CKA_ID differ"
        for public in publics:
            assert bytes(public[Attribute.ID]) == bytes(privates[0][Attribute.ID])
    labels = {o.label for o in snapshot(hsm)}
    assert not {label for label in labels if label.endswith(".new")}, labels
    assert certificate_file.read_bytes() == certificate.public_bytes(serialization.Encoding.PEM)
    return certificate


def backup_objects(hsm: SoftHsm) -> list[TokenObject]:
    return [o for o in snapshot(hsm) if o.label.endswith(".bak")]
