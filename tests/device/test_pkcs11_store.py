"""The PKCS#11 key store against a real SoftHSM2 token: configuration, rotation with every key and
signing algorithm the AWS CRT can use from a token, failure handling, locking, and power loss at every
crash point (a real process killed there, then recovery in this one)."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import DeviceError

from certrotator import crypto
from certrotator.crypto import KeyAlgorithm, SigningAlgorithm
from certrotator.device import journal
from certrotator.device.keystores.base import NOT_BEFORE_ALLOWANCE, KeyStoreError, TransientKeyStoreError
from certrotator.device.keystores.pkcs11 import store as store_module
from certrotator.device.keystores.pkcs11.from_settings import store_from_greengrass, store_from_settings
from certrotator.device.keystores.pkcs11.location import (
    P521_REFUSAL,
    Pkcs11Config,
    Pkcs11ConfigError,
    parse_pkcs11_uri,
)
from certrotator.device.keystores.pkcs11.signing import token_signer
from certrotator.device.keystores.pkcs11.store import CRASH_POINTS, Pkcs11KeyStore
from certrotator.device.keystores.pkcs11.token import token_error
from tests.signature_oids import SIGNATURE_OIDS

from .softhsm import (
    CERT_LABEL,
    DEVICE_SUBJECT,
    INITIAL_ID,
    KEY_LABEL,
    SOFTHSM_MODULE,
    SoftHsm,
    TestCa,
    TokenObject,
    backup_objects,
    create_softhsm,
    live_pair,
    provision,
    snapshot,
)

HELPER = Path(__file__).with_name("pkcs11_crash_helper.py")
TOKEN_KEY_ALGORITHMS = [a for a in KeyAlgorithm if a is not KeyAlgorithm.ECDSA_P521]


def signing_algorithms(key_algorithm: KeyAlgorithm) -> list[SigningAlgorithm]:
    return [s for s in SigningAlgorithm if s.family is key_algorithm.family]


# -------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ca() -> TestCa:
    return TestCa()


@pytest.fixture
def hsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsm:
    return create_softhsm(tmp_path / "hsm", monkeypatch)


class Device:
    """One device: a token with a provisioned pair, the journal and certificate file paths."""

    initial: x509.Certificate  # the provisioned certificate

    def __init__(self, hsm: SoftHsm, directory: Path) -> None:
        self.hsm = hsm
        self.journal = directory / "rotation.journal"
        self.cert_file = directory / "device.pem.crt"
        self.stores: list[Pkcs11KeyStore] = []

    def store(self) -> Pkcs11KeyStore:
        """A new store, as after a restart (the previous ones are closed)."""
        self.close()
        store = Pkcs11KeyStore(self.hsm.config(), self.journal, self.cert_file)
        self.stores.append(store)
        return store

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def live(self) -> x509.Certificate:
        self.close()  # the checks use their own login
        return live_pair(self.hsm, self.cert_file)


def make_device(
    hsm: SoftHsm, tmp_path: Path, ca: TestCa, key_algorithm: KeyAlgorithm, **kwargs: Any
) -> Device:
    device = Device(hsm, tmp_path)
    device.initial = provision(hsm, ca, key_algorithm, device.cert_file, **kwargs)
    return device


@pytest.fixture
def ec_device(hsm: SoftHsm, tmp_path: Path, ca: TestCa) -> Iterator[Device]:
    device = make_device(hsm, tmp_path, ca, KeyAlgorithm.ECDSA_P256)
    yield device
    device.close()


def check_csr(
    csr_pem: str, key_algorithm: KeyAlgorithm, signing_algorithm: SigningAlgorithm
) -> x509.CertificateSigningRequest:
    """Verify the CSR's signature ourselves, with exactly the parameters AWS IoT expects."""
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert csr.subject == DEVICE_SUBJECT
    assert csr.signature_algorithm_oid == SIGNATURE_OIDS[signing_algorithm]
    assert crypto.key_algorithm_of(csr.public_key()) is key_algorithm
    public = csr.public_key()
    digest = signing_algorithm.hash()
    if isinstance(public, rsa.RSAPublicKey):
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            if signing_algorithm.is_pss
            else padding.PKCS1v15()
        )
        public.verify(csr.signature, csr.tbs_certrequest_bytes, pad, digest)
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(digest))
    assert crypto.inspect_csr(csr_pem).signature_valid
    return csr


def objects_with_id(hsm: SoftHsm, key_id: bytes) -> list[TokenObject]:
    return [o for o in snapshot(hsm) if o.id == key_id]


# ---------------------------------------------------------------------------------- configuration


def test_config_from_greengrass_uris() -> None:
    config = Pkcs11Config.from_uris(
        library="/usr/lib/softhsm/libsofthsm2.so",
        private_key_uri="pkcs11:object=greengrass_privatekey;type=private",
        certificate_uri="pkcs11:token=gg;object=greengrass%20cert;type=cert?pin-value=1234",
    )
    assert (config.key_label, config.certificate_label) == ("greengrass_privatekey", "greengrass cert")
    assert (config.token_label, config.slot_id, config.user_pin) == ("gg", None, "1234")
    assert config.library == Path("/usr/lib/softhsm/libsofthsm2.so")
    assert config.certificate_uri == "pkcs11:object=greengrass%20cert;type=cert"
    assert (
        Pkcs11Config.from_uris(
            library="x.so",
            private_key_uri=config.private_key_uri,
            certificate_uri="pkcs11:object=c",
            user_pin="1",
            slot_id=3,
        ).slot_id
        == 3
    )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("file:///key.pem", "is not a PKCS#11 URI"),
        ("pkcs11:type=private", "has no object=LABEL"),
        ("pkcs11:object=k;type=cert", "has type=cert; expected type=private"),
        ("pkcs11:object=k;colour=blue", "unknown attribute 'colour'"),
        ("pkcs11:object=k;object=j", "given twice"),
        ("pkcs11:object", "has no value"),
        ("pkcs11:object=k;slot-id=one", "slot-id is not a number"),
    ],
)
def test_bad_uris_are_refused(uri: str, message: str) -> None:
    with pytest.raises(Pkcs11ConfigError, match=message):
        parse_pkcs11_uri(uri, "private")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_label": "a", "private_key_uri": "pkcs11:token=b;object=k"}, "different token labels: a, b"),
        ({"token_label": None}, "needs a token label"),
        ({"user_pin": ""}, "needs the token's user PIN"),
        (
            {"user_pin": "1", "certificate_uri": "pkcs11:object=c?pin-value=2"},
            r"different user PINs: \(values not shown\)",
        ),
        ({"private_key_uri": "pkcs11:object=k.bak"}, "must not end with '.new' or '.bak'"),
    ],
)
def test_bad_configurations_are_refused(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "library": "x.so",
        "private_key_uri": "pkcs11:object=k;type=private",
        "certificate_uri": "pkcs11:object=c;type=cert",
        "user_pin": "1234",
        "token_label": "T",
        **kwargs,
    }
    with pytest.raises(Pkcs11ConfigError, match=message):
        Pkcs11Config.from_uris(**arguments)


def test_p521_is_refused_at_configuration_time() -> None:
    config = Pkcs11Config(
        library=SOFTHSM_MODULE, key_label="k", certificate_label="c", user_pin="1", token_label="T"
    )
    with pytest.raises(Pkcs11ConfigError) as refused:
        config.validate(KeyAlgorithm.ECDSA_P521)
    assert str(refused.value) == P521_REFUSAL
    assert (
        "aws-c-io" in P521_REFUSAL and "#591" in P521_REFUSAL and "ECDSA-P256 or ECDSA-P384" in P521_REFUSAL
    )
    assert isinstance(refused.value, crypto.CryptoError)  # what the agent's config validation catches
    for algorithm in TOKEN_KEY_ALGORITHMS:
        config.validate(algorithm)


def test_p521_prepare_is_refused_without_touching_the_token(ec_device: Device) -> None:
    before = snapshot(ec_device.hsm)
    with pytest.raises(KeyStoreError, match="aws-c-io issue #591"):
        ec_device.store().prepare("job", KeyAlgorithm.ECDSA_P521, SigningAlgorithm.ECDSA_WITH_SHA512)
    assert snapshot(ec_device.hsm) == before
    assert not ec_device.journal.exists()


# -------------------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("key_algorithm", TOKEN_KEY_ALGORITHMS, ids=lambda a: a.value)
def test_rotation_rollback_then_commit(
    hsm: SoftHsm, tmp_path: Path, ca: TestCa, key_algorithm: KeyAlgorithm
) -> None:
    device = make_device(hsm, tmp_path, ca, key_algorithm)
    assert device.live() == device.initial
    first, second = signing_algorithms(key_algorithm)[:2]

    # Rotation 1: prepare, install, roll back.
    store = device.store()
    csr = check_csr(store.prepare("job-1", key_algorithm, first), key_algorithm, first)
    (new_id,) = {o.id for o in snapshot(hsm) if o.label == f"{KEY_LABEL}.new"}
    assert {(o.kind, o.label) for o in objects_with_id(hsm, new_id)} == {
        ("private", f"{KEY_LABEL}.new"),
        ("public", f"{KEY_LABEL}.new"),
    }
    rejected = ca.issue_for_csr(csr.public_bytes(serialization.Encoding.PEM).decode())
    store = device.store()
    store.install("job-1", rejected)
    assert device.live() == x509.load_pem_x509_certificate(rejected.encode())
    assert {(o.kind, o.label) for o in backup_objects(hsm)} == {
        ("private", f"{KEY_LABEL}.bak"),
        ("public", f"{KEY_LABEL}.bak"),
        ("cert", f"{CERT_LABEL}.bak"),
    }
    store = device.store()
    assert store.has_backup()
    assert store.current_certificate() == x509.load_pem_x509_certificate(rejected.encode())
    store.rollback()
    assert not store.has_backup()
    assert device.live() == device.initial
    assert not backup_objects(hsm) and not objects_with_id(hsm, new_id)

    # Rotation 2: prepare, install, commit.
    store = device.store()
    csr_pem = store.prepare("job-2", key_algorithm, second)
    check_csr(csr_pem, key_algorithm, second)
    accepted = ca.issue_for_csr(csr_pem)
    store.install("job-2", accepted)
    store.commit()
    assert not store.has_backup()
    assert store.verify() == x509.load_pem_x509_certificate(accepted.encode())
    assert device.live() == x509.load_pem_x509_certificate(accepted.encode())
    assert not backup_objects(hsm)
    assert not [o for o in snapshot(hsm) if o.id == INITIAL_ID]
    assert not device.journal.exists()

    # The new private key is a proper token key, and key + certificate share one CKA_ID.
    with hsm.session() as s:
        (private,) = s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: KEY_LABEL})
        (cert_object,) = s.get_objects(
            {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: CERT_LABEL}
        )
        assert private[Attribute.TOKEN] and private[Attribute.SENSITIVE] and private[Attribute.PRIVATE]
        assert not private[Attribute.EXTRACTABLE] and not private[Attribute.COPYABLE]
        assert len(private[Attribute.ID]) == 16 and private[Attribute.ID] == cert_object[Attribute.ID]
        certificate = x509.load_pem_x509_certificate(accepted.encode())
        assert cert_object[Attribute.SUBJECT] == certificate.subject.public_bytes()
        assert cert_object[Attribute.ISSUER] == certificate.issuer.public_bytes()
        serial = x509.load_der_x509_certificate(cert_object[Attribute.VALUE]).serial_number
        assert serial == certificate.serial_number
        assert cert_object[Attribute.SERIAL_NUMBER] == _der_integer(serial)

        # Every applicable signing algorithm, through the same signer prepare() uses, reusing this
        # key (token RSA key generation is slow): with the token's hash-and-sign mechanisms, and
        # with hashing on the host (tokens that only offer raw CKM_RSA_PKCS / CKM_RSA_PKCS_PSS).
        public = certificate.public_key()
        assert isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        mechanisms = frozenset(hsm.token().slot.get_mechanisms())
        for mechanism_set in (mechanisms, frozenset()):
            key = crypto.external_key(public, token_signer(private, mechanism_set))
            for signing_algorithm in signing_algorithms(key_algorithm):
                check_csr(
                    crypto.build_csr(key, signing_algorithm, DEVICE_SUBJECT), key_algorithm, signing_algorithm
                )


def _der_integer(value: int) -> bytes:
    content = value.to_bytes(value.bit_length() // 8 + 1, "big")
    assert len(content) < 128
    return bytes([0x02, len(content)]) + content


def test_signer_rejects_what_the_token_cannot_do(ec_device: Device) -> None:
    with ec_device.hsm.session() as s:
        (private,) = s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: KEY_LABEL})
        sign = token_signer(private, frozenset())
        with pytest.raises(crypto.CryptoError, match="hash sha1 is not supported"):
            sign(b"data", None, hashes.SHA1())
        with pytest.raises(KeyStoreError, match="refused to sign"):  # an EC key asked for RSA
            sign(b"data", padding.PKCS1v15(), hashes.SHA256())


def test_rotation_without_a_public_key_object(hsm: SoftHsm, tmp_path: Path, ca: TestCa) -> None:
    """Provisioning tools often import only the private key; backup and restore must cope."""
    device = make_device(hsm, tmp_path, ca, KeyAlgorithm.ECDSA_P384, with_public=False)
    store = device.store()
    pem = ca.issue_for_csr(store.prepare("j", KeyAlgorithm.ECDSA_P384, SigningAlgorithm.ECDSA_WITH_SHA384))
    store.install("j", pem)
    assert {o.kind for o in backup_objects(hsm)} == {"private", "cert"}
    store.rollback()
    assert device.live() == device.initial
    assert not [o for o in snapshot(hsm) if o.kind == "public"]
    store = device.store()
    pem = ca.issue_for_csr(store.prepare("k", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256))
    store.install("k", pem)
    store.commit()
    assert crypto.key_algorithm_of(device.live().public_key()) is KeyAlgorithm.ECDSA_P256


# ------------------------------------------------------------------------------- refusals, no-ops


def test_install_of_a_certificate_for_another_key_changes_nothing(ec_device: Device, ca: TestCa) -> None:
    store = ec_device.store()
    store.prepare("job", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
    before = (snapshot(ec_device.hsm), ec_device.journal.read_bytes(), ec_device.cert_file.read_bytes())
    foreign = crypto.certificate_pem(ca.issue(ec.generate_private_key(ec.SECP256R1()).public_key()))
    with pytest.raises(KeyStoreError, match="not for the key this device generated; nothing changed"):
        store.install("job", foreign)
    with pytest.raises(KeyStoreError, match="unusable"):
        store.install("job", "not a certificate")
    assert (
        snapshot(ec_device.hsm),
        ec_device.journal.read_bytes(),
        ec_device.cert_file.read_bytes(),
    ) == before
    assert not store.has_backup()
    store.discard_prepared()
    assert ec_device.live() == ec_device.initial


def token_files(hsm: SoftHsm) -> dict[str, bytes]:
    """SoftHSM's object store, file by file: what the token holds, byte for byte."""
    return {
        str(path.relative_to(hsm.directory)): path.read_bytes()
        for path in sorted(hsm.directory.rglob("*"))
        if path.is_file()
    }


def dated_for_csr(ca: TestCa, csr_pem: str, not_before: dt.datetime, not_after: dt.datetime) -> str:
    """Everything right (the CSR's key and subject, the device's CA) but the dates."""
    info = crypto.inspect_csr(csr_pem)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(info.subject)
        .issuer_name(ca.name)
        .public_key(info.public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(ca.key, hashes.SHA256())
    )
    return crypto.certificate_pem(certificate)


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (-dt.timedelta(days=30), -dt.timedelta(seconds=30), "no longer valid: its notAfter"),
        (
            NOT_BEFORE_ALLOWANCE + dt.timedelta(minutes=2),
            dt.timedelta(days=30),
            "not valid yet: its notBefore",
        ),
    ],
    ids=["expired", "not yet valid"],
)
def test_install_of_a_certificate_outside_its_validity_changes_nothing(
    ec_device: Device, ca: TestCa, start: dt.timedelta, end: dt.timedelta, message: str
) -> None:
    store = ec_device.store()
    csr = store.prepare("job", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
    now = dt.datetime.now(dt.timezone.utc)
    pem = dated_for_csr(ca, csr, now + start, now + end)
    before = (token_files(ec_device.hsm), ec_device.journal.read_bytes(), ec_device.cert_file.read_bytes())
    objects = snapshot(ec_device.hsm)
    assert any(name.endswith(".object") for name in before[0]), "not SoftHSM's file object store?"

    with pytest.raises(KeyStoreError, match=message) as refused:
        store.install("job", pem)
    assert str(refused.value).endswith("; nothing changed")
    # Byte for byte: the token's object files, the journal (still "prepared") and the certificate file.
    assert (
        token_files(ec_device.hsm),
        ec_device.journal.read_bytes(),
        ec_device.cert_file.read_bytes(),
    ) == before
    assert snapshot(ec_device.hsm) == objects
    assert not store.has_backup()

    # The prepared key is still there: a certificate within its validity for it installs.
    good = ca.issue_for_csr(csr)
    store.install("job", good)
    assert store.has_backup()
    store.commit()
    assert crypto.certificate_pem(ec_device.live()) == good


def test_install_needs_the_prepared_key_of_that_job(ec_device: Device, ca: TestCa) -> None:
    store = ec_device.store()
    with pytest.raises(KeyStoreError, match="no key was prepared for job 'job'"):
        store.install("job", crypto.certificate_pem(ec_device.initial))
    pem = ca.issue_for_csr(store.prepare("job", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256))
    with pytest.raises(KeyStoreError, match="no key was prepared for job 'other'"):
        store.install("other", pem)
    # A restart between prepare and install drops the prepared key: it can never be installed now.
    store = ec_device.store()
    store.recover()
    assert not ec_device.journal.exists()
    assert not [o for o in snapshot(ec_device.hsm) if o.label.endswith(".new")]
    with pytest.raises(KeyStoreError, match="no key was prepared"):
        store.install("job", pem)
    assert ec_device.live() == ec_device.initial


def test_no_backup_means_rollback_and_commit_are_no_ops(ec_device: Device) -> None:
    before = snapshot(ec_device.hsm)
    store = ec_device.store()
    assert not store.has_backup()
    store.rollback()
    store.commit()
    store.recover()
    assert snapshot(ec_device.hsm) == before
    assert ec_device.live() == ec_device.initial


def test_prepare_twice_and_discard_leave_no_orphans(ec_device: Device, ca: TestCa) -> None:
    store = ec_device.store()
    store.prepare("a", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
    csr = store.prepare("b", KeyAlgorithm.ECDSA_P384, SigningAlgorithm.ECDSA_WITH_SHA384)
    new = [o for o in snapshot(ec_device.hsm) if o.label == f"{KEY_LABEL}.new"]
    assert len(new) == 2 and len({o.id for o in new}) == 1  # only b's pair is left
    store.discard_prepared()
    assert not [o for o in snapshot(ec_device.hsm) if o.label.endswith(".new")]
    assert not ec_device.journal.exists()
    with pytest.raises(KeyStoreError, match="no key was prepared for job 'b'"):
        store.install("b", ca.issue_for_csr(csr))


def test_prepare_refused_while_a_backup_is_kept(ec_device: Device, ca: TestCa) -> None:
    store = ec_device.store()
    store.install(
        "a", ca.issue_for_csr(store.prepare("a", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256))
    )
    with pytest.raises(KeyStoreError, match="installed but not committed; commit or roll back"):
        store.prepare("b", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
    assert store.has_backup()


def test_recover_refuses_a_mismatched_pair(hsm: SoftHsm, tmp_path: Path, ca: TestCa) -> None:
    other = crypto.generate_private_key(KeyAlgorithm.ECDSA_P256)
    device = make_device(hsm, tmp_path, ca, KeyAlgorithm.ECDSA_P256, certificate_key=other)
    with pytest.raises(KeyStoreError, match="does not belong to certificate"):
        device.store().recover()


def test_recover_rewrites_a_stale_certificate_file(ec_device: Device) -> None:
    ec_device.cert_file.write_text("stale")
    store = ec_device.store()
    with pytest.raises(KeyStoreError, match="differs from the token's certificate"):
        store.verify()
    store.recover()
    assert store.verify() == ec_device.initial


def test_recover_destroys_stray_new_objects_without_a_journal(ec_device: Device) -> None:
    """Objects under LABEL.new with no journal (a tool, an older agent) would break later lookups."""
    with ec_device.hsm.session() as s:
        s.generate_keypair(
            pkcs11.KeyType.EC,
            label=f"{KEY_LABEL}.new",
            id=b"stray",
            store=True,
            public_template={Attribute.EC_PARAMS: pkcs11.util.ec.encode_named_curve_parameters("secp256r1")},
        )
    assert len([o for o in snapshot(ec_device.hsm) if o.label.endswith(".new")]) == 2
    ec_device.store().recover()
    assert ec_device.live() == ec_device.initial
    assert not [o for o in snapshot(ec_device.hsm) if o.id == b"stray"]


def test_recover_adopts_a_certificate_kept_only_as_a_file(ec_device: Device, ca: TestCa) -> None:
    """Greengrass allows certificateFilePath to be a file with the key in the token."""
    with ec_device.hsm.session() as s:
        for obj in list(s.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE})):
            obj.destroy()
    store = ec_device.store()
    with pytest.raises(KeyStoreError, match="0 certificate objects labelled 'device-cert'"):
        store.current_certificate()
    store.recover()
    assert ec_device.live() == ec_device.initial  # same CKA_ID as the key, file unchanged
    pem = ca.issue_for_csr(store.prepare("j", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256))
    store.install("j", pem)
    store.rollback()
    assert ec_device.live() == ec_device.initial


def test_recover_does_not_adopt_a_certificate_file_for_another_key(ec_device: Device, ca: TestCa) -> None:
    with ec_device.hsm.session() as s:
        for obj in list(s.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE})):
            obj.destroy()
    ec_device.cert_file.write_text(
        crypto.certificate_pem(ca.issue(ec.generate_private_key(ec.SECP256R1()).public_key()))
    )
    before = snapshot(ec_device.hsm)
    with pytest.raises(KeyStoreError, match="does not belong to private key 'device-key'"):
        ec_device.store().recover()
    assert snapshot(ec_device.hsm) == before


def test_keys_are_backed_up_by_relabelling_not_copying(ec_device: Device, ca: TestCa) -> None:
    """The provisioned key is CKA_COPYABLE=false, as on real HSMs: C_CopyObject is refused, and the
    rotation still works."""
    with ec_device.hsm.session() as s:
        (private,) = s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: KEY_LABEL})
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            private.copy({Attribute.LABEL: "copy"})
    store = ec_device.store()
    store.install(
        "j", ca.issue_for_csr(store.prepare("j", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256))
    )
    assert {o.id for o in backup_objects(ec_device.hsm)} == {INITIAL_ID}
    store.commit()
    assert not [o for o in snapshot(ec_device.hsm) if o.id == INITIAL_ID]


def test_greengrass_store_with_the_certificate_as_a_file(hsm: SoftHsm, tmp_path: Path, ca: TestCa) -> None:
    """Nucleus privateKeyPath = pkcs11 URI, certificateFilePath = a file, Pkcs11Provider selects the
    slot: recover() adopts the file's certificate under the key label, and rotation keeps both in step."""
    cert_file = tmp_path / "thingCert.crt"
    initial = provision(hsm, ca, KeyAlgorithm.RSA_2048, cert_file, key_label="gg-key", cert_label=None)
    provider = {
        "name": "softhsm",
        "library": str(SOFTHSM_MODULE),
        "slot": hsm.token().slot.slot_id,
        "userPin": "1234",
    }
    store = store_from_greengrass(
        provider, str(cert_file), "pkcs11:object=gg-key;type=private", cert_file, tmp_path / "j"
    )
    assert (store.config.key_label, store.config.certificate_label, store.config.token_label) == (
        "gg-key",
        "gg-key",
        None,
    )
    store.recover()
    csr = store.prepare("job", KeyAlgorithm.RSA_2048, SigningAlgorithm.SHA256WITHRSA)
    store.install("job", ca.issue_for_csr(csr))
    store.commit()
    store.close()
    new = live_pair(hsm, cert_file, "gg-key", "gg-key")
    assert new != initial and crypto.key_algorithm_of(new.public_key()) is KeyAlgorithm.RSA_2048


def test_store_factories(hsm: SoftHsm, tmp_path: Path) -> None:
    uri = "pkcs11:token=T;object=key;type=private"
    store = store_from_greengrass(
        {"library": str(SOFTHSM_MODULE), "userPin": "1"},
        "pkcs11:object=cert;type=cert",
        uri,
        tmp_path / "c",
        tmp_path / "j",
    )
    assert (store.config.token_label, store.config.certificate_label, store.config.slot_id) == (
        "T",
        "cert",
        None,
    )
    with pytest.raises(Pkcs11ConfigError, match="slot 'zero' is not a number"):
        store_from_greengrass(
            {"library": "x.so", "slot": "zero", "userPin": "1"}, "c.pem", uri, tmp_path / "c", tmp_path / "j"
        )
    with pytest.raises(Pkcs11ConfigError, match="needs the path of the token's library"):
        store_from_greengrass({"userPin": "1"}, "c.pem", uri, tmp_path / "c", tmp_path / "j")
    with pytest.raises(Pkcs11ConfigError, match="needs the token's user PIN"):
        store_from_greengrass({"library": "x.so"}, "c.pem", uri, tmp_path / "c", tmp_path / "j")
    settings = SimpleNamespace(
        library=SOFTHSM_MODULE, user_pin="1", key_label="k", token_label="T", slot_id=None
    )
    store = store_from_settings(settings, tmp_path / "c", tmp_path / "j")
    assert (store.config.key_label, store.config.certificate_label, store.certificate_file) == (
        "k",
        "k",
        tmp_path / "c",
    )


def test_a_library_initialised_by_someone_else_is_explained(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def already(_path: str) -> None:
        raise pkcs11.exceptions.PKCS11Error(
            "Initialisation error (already initialized). Should never see this."
        )

    monkeypatch.setattr(pkcs11, "lib", already)
    config = Pkcs11Config(
        library=SOFTHSM_MODULE, key_label="k", certificate_label="c", user_pin="1", token_label="T"
    )
    with pytest.raises(KeyStoreError, match=r"create the key store first.*DEFAULT or OMIT"):
        Pkcs11KeyStore(config, tmp_path / "j", tmp_path / "c")


def test_token_selection_by_slot_and_errors(ec_device: Device) -> None:
    hsm = ec_device.hsm
    slot = hsm.token().slot.slot_id
    by_slot = Pkcs11Config(
        library=SOFTHSM_MODULE,
        key_label=KEY_LABEL,
        certificate_label=CERT_LABEL,
        user_pin=hsm.user_pin,
        slot_id=slot,
    )
    store = Pkcs11KeyStore(by_slot, ec_device.journal, ec_device.cert_file)
    assert store.current_certificate() == ec_device.initial
    store.close()
    missing = Pkcs11Config(
        library=SOFTHSM_MODULE,
        key_label=KEY_LABEL,
        certificate_label=CERT_LABEL,
        user_pin="1",
        token_label="nope",
    )
    with pytest.raises(TransientKeyStoreError, match="has no token labelled 'nope'"):  # may be plugged in
        Pkcs11KeyStore(missing, ec_device.journal, ec_device.cert_file).current_certificate()
    wrong_label = Pkcs11Config(
        library=SOFTHSM_MODULE,
        key_label="k",
        certificate_label="c",
        user_pin=hsm.user_pin,
        token_label=hsm.token_label,
    )
    with pytest.raises(KeyStoreError, match="0 certificate objects labelled 'c'"):
        Pkcs11KeyStore(wrong_label, ec_device.journal, ec_device.cert_file).current_certificate()


def test_a_token_hidden_at_start_up_is_found_by_a_later_recover(ec_device: Device) -> None:
    """SoftHSM keeps the view of its token directory it took at C_Initialize: a token another process
    hid from it then (or one plugged in later) stays invisible until the library is re-initialised.
    recover() is retried by the agent at start-up; after a transient failure it starts afresh."""
    tokens = ec_device.hsm.directory / "tokens"
    hidden = tokens.with_name("tokens-hidden")
    tokens.rename(hidden)
    tokens.mkdir(mode=0o700)
    pkcs11.lib(str(SOFTHSM_MODULE)).reinitialize()  # this process now sees an empty store
    store = ec_device.store()
    with pytest.raises(TransientKeyStoreError, match="has no token labelled"):
        store.recover()
    tokens.rmdir()
    hidden.rename(tokens)
    store.recover()  # would still see no token without the re-initialisation
    assert store.current_certificate() == ec_device.initial
    assert not store.has_backup()


def test_a_wrong_pin_is_not_transient(ec_device: Device) -> None:
    wrong = Pkcs11Config(
        library=SOFTHSM_MODULE,
        key_label=KEY_LABEL,
        certificate_label=CERT_LABEL,
        user_pin="0000",
        token_label=ec_device.hsm.token_label,
    )
    ec_device.close()  # a login held by another store of this process would hide the wrong PIN
    store = Pkcs11KeyStore(wrong, ec_device.journal, ec_device.cert_file)
    with pytest.raises(KeyStoreError, match="PinIncorrect") as raised:
        store.recover()
    assert not isinstance(raised.value, TransientKeyStoreError)
    store.close()


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (pkcs11.exceptions.GeneralError(), True),
        (pkcs11.exceptions.DeviceRemoved(), True),
        (pkcs11.exceptions.TokenNotPresent(), True),
        (pkcs11.exceptions.SessionHandleInvalid(), True),
        (pkcs11.exceptions.UserPinNotInitialized(), True),  # seen from a busy SoftHSM store
        (pkcs11.exceptions.PinIncorrect(), False),
        (pkcs11.exceptions.MechanismInvalid(), False),
        (pkcs11.exceptions.TemplateIncomplete(), False),
    ],
)
def test_token_errors_that_may_pass_are_transient(error: Exception, transient: bool) -> None:
    assert isinstance(error, pkcs11.exceptions.PKCS11Error)
    assert isinstance(token_error("x", error), TransientKeyStoreError) is transient


def test_store_survives_a_library_reinitialisation(ec_device: Device) -> None:
    store = ec_device.store()
    assert store.current_certificate() == ec_device.initial
    pkcs11.lib(str(SOFTHSM_MODULE)).reinitialize()  # kills every session, as a CRT finalize would
    assert store.current_certificate() == ec_device.initial


# ---------------------------------------------------------------------- failures inside the process


def _fail_at(point: str) -> Any:
    def hook(name: str) -> None:
        if name == point:
            raise DeviceError(f"injected at {name}")

    return hook


def test_a_token_error_during_install_is_undone(
    ec_device: Device, ca: TestCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ec_device.store()
    pem = ca.issue_for_csr(store.prepare("j", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256))
    monkeypatch.setattr(journal, "crash_hook", _fail_at("pkcs11.install.store_cert"))
    with pytest.raises(KeyStoreError, match="failed and was undone"):
        store.install("j", pem)
    monkeypatch.setattr(journal, "crash_hook", None)
    assert not store.has_backup()
    assert ec_device.live() == ec_device.initial
    assert not backup_objects(ec_device.hsm)
    assert not ec_device.journal.exists()


def test_a_token_error_during_rollback_is_finished(
    ec_device: Device, ca: TestCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ec_device.store()
    store.install(
        "j", ca.issue_for_csr(store.prepare("j", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256))
    )
    monkeypatch.setattr(journal, "crash_hook", _fail_at("pkcs11.rollback.drop_private"))
    with pytest.raises(KeyStoreError, match="token step failed"):
        store.rollback()
    monkeypatch.setattr(journal, "crash_hook", None)
    assert not store.has_backup()
    assert ec_device.live() == ec_device.initial
    assert not backup_objects(ec_device.hsm)


# ------------------------------------------------------------------------------------------- lock


def test_a_second_process_holding_the_lock_blocks_token_changes(ec_device: Device) -> None:
    store = ec_device.store()
    lock_path = ec_device.journal.with_name(ec_device.journal.name + ".lock")
    # flock locks belong to the open file description: our own fd stands in for another process.
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()

    def work() -> None:
        store.has_backup()
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    try:
        assert not done.wait(0.3), "the store did not wait for the lock"
    finally:
        os.close(fd)
    worker.join(5)
    assert done.is_set()


# ------------------------------------------------------------------------------------- power loss

# Every crash point of the store with the state recovery must produce: the old pair, the new pair with
# the old one kept as backup, or the new pair alone. Must list exactly the store's CRASH_POINTS.
OLD, NEW_WITH_BACKUP, NEW = "old", "new+backup", "new"
CRASH_MATRIX = {
    "pkcs11.prepare.begin": OLD,
    "pkcs11.prepare.journaled": OLD,
    "pkcs11.prepare.generated": OLD,
    "pkcs11.install.begin": OLD,
    "pkcs11.install.journaled": NEW_WITH_BACKUP,
    "pkcs11.install.backup_private": NEW_WITH_BACKUP,
    "pkcs11.install.backup_public": NEW_WITH_BACKUP,
    "pkcs11.install.backup_cert": NEW_WITH_BACKUP,
    "pkcs11.install.promote_private": NEW_WITH_BACKUP,
    "pkcs11.install.promote_public": NEW_WITH_BACKUP,
    "pkcs11.install.store_cert": NEW_WITH_BACKUP,
    "pkcs11.install.cert_file": NEW_WITH_BACKUP,
    "pkcs11.install.done": NEW_WITH_BACKUP,
    "pkcs11.rollback.begin": NEW_WITH_BACKUP,
    "pkcs11.rollback.journaled": OLD,
    "pkcs11.rollback.drop_cert": OLD,
    "pkcs11.rollback.drop_private": OLD,
    "pkcs11.rollback.drop_public": OLD,
    "pkcs11.rollback.restore_private": OLD,
    "pkcs11.rollback.restore_public": OLD,
    "pkcs11.rollback.restore_cert": OLD,
    "pkcs11.rollback.cert_file": OLD,
    "pkcs11.rollback.done": OLD,
    "pkcs11.commit.begin": NEW_WITH_BACKUP,
    "pkcs11.commit.journaled": NEW,
    "pkcs11.commit.drop_cert": NEW,
    "pkcs11.commit.drop_private": NEW,
    "pkcs11.commit.drop_public": NEW,
    "pkcs11.commit.done": NEW,
}


def test_every_crash_point_has_a_crash_test() -> None:
    assert list(CRASH_MATRIX) == list(CRASH_POINTS)
    # ...and the store passes no crash point it does not declare.
    source = Path(store_module.__file__).read_text()
    used = set(re.findall(r'crash_point\("([^"]+)"\)', source))
    assert used == set(CRASH_POINTS)


def _crash_in_subprocess(device: Device, point: str, step: str, **spec: str) -> None:
    device.close()  # the dying process must be the only one writing
    spec_file = device.journal.with_name("crash-spec.json")
    config = device.hsm.config()
    spec_file.write_text(
        json.dumps(
            {
                "library": str(config.library),
                "privateKeyUri": config.private_key_uri,
                "certificateUri": config.certificate_uri,
                "userPin": config.user_pin,
                "tokenLabel": config.token_label,
                "journal": str(device.journal),
                "certificateFile": str(device.cert_file),
                "step": step,
                **spec,
            }
        )
    )
    env = {**os.environ, journal.CRASH_ENV: point}
    result = subprocess.run(
        [sys.executable, str(HELPER), str(spec_file)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 86, f"{step} did not die at {point}: rc={result.returncode} {result.stderr}"


@pytest.mark.parametrize("point", list(CRASH_MATRIX))
def test_power_loss_at(point: str, hsm: SoftHsm, tmp_path: Path, ca: TestCa) -> None:
    device = make_device(hsm, tmp_path, ca, KeyAlgorithm.ECDSA_P256)
    step = point.split(".")[1]
    algorithms = {"keyAlgorithm": KeyAlgorithm.ECDSA_P256.value, "signingAlgorithm": "ECDSA-WITH-SHA256"}
    new_pem = ""
    if step == "prepare":
        _crash_in_subprocess(device, point, "prepare", jobId="job", **algorithms)
    else:
        store = device.store()
        new_pem = ca.issue_for_csr(
            store.prepare("job", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
        )
        if step == "install":
            _crash_in_subprocess(device, point, "install", jobId="job", certificate=new_pem)
        else:
            store.install("job", new_pem)
            _crash_in_subprocess(device, point, step)

    # Restart: a new store recovers, then the pair under the labels must be whole.
    store = device.store()
    store.recover()
    store.recover()  # idempotent
    expected = CRASH_MATRIX[point]
    new = x509.load_pem_x509_certificate(new_pem.encode()) if new_pem else None
    store = device.store()
    assert store.has_backup() is (expected == NEW_WITH_BACKUP)
    assert device.live() == (device.initial if expected == OLD else new)
    assert bool(backup_objects(hsm)) is (expected == NEW_WITH_BACKUP)
    live_ids = {o.id for o in snapshot(hsm) if o.label in (KEY_LABEL, CERT_LABEL)}
    assert len(live_ids) == 1

    # The journal leads to the right next step, which ends consistent too.
    store = device.store()
    if expected == NEW_WITH_BACKUP:
        finish_with_commit = step == "commit" or CRASH_POINTS.index(point) % 2 == 1
        if finish_with_commit:
            store.commit()
        else:
            store.rollback()
        assert device.live() == (new if finish_with_commit else device.initial)
        assert not backup_objects(hsm)
    else:
        before = snapshot(hsm)
        store.rollback()
        store.commit()
        assert snapshot(hsm) == before
    if step == "prepare":  # leftovers of a dead prepare must not confuse a full rotation
        store = device.store()
        pem = ca.issue_for_csr(
            store.prepare("next", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
        )
        store.install("next", pem)
        store.commit()
        assert device.live() == x509.load_pem_x509_certificate(pem.encode())
    assert not device.journal.exists() or store.has_backup()
    device.close()


def test_crash_points_fire_in_declared_order(
    ec_device: Device, ca: TestCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full prepare/install/rollback/prepare/install/commit passes every crash point in order."""
    seen: list[str] = []
    monkeypatch.setattr(journal, "crash_hook", seen.append)
    store = ec_device.store()
    for job, finish in (("a", store.rollback), ("b", store.commit)):
        store.install(
            job,
            ca.issue_for_csr(store.prepare(job, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)),
        )
        finish()
    prepare, install, rollback, commit = (
        [p for p in CRASH_POINTS if p.split(".")[1] == step]
        for step in ("prepare", "install", "rollback", "commit")
    )
    assert seen == prepare + install + rollback + prepare + install + commit
