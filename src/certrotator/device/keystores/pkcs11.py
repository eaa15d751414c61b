"""Device credentials in a PKCS#11 token (an HSM; SoftHSM2 in tests), crash-safe.

The configured labels name the live pair: the private key (and its public key object, when there is
one) carry the key label, the certificate object the certificate label. A rotation uses two derived
labels, so that a label never names two objects of one class (python-pkcs11 and the AWS CRT both fail
on that):

    LABEL.new   the prepared key pair (generated in the token, never leaves it)
    LABEL.bak   the previous pair while new credentials are on probation

Backups are made by relabelling, not copying: real HSMs commonly refuse C_CopyObject for private keys
(CKA_COPYABLE false). The new pair's key and certificate objects share a fresh CKA_ID, and the
certificate is also written to `certificate_file`, because the AWS CRT reads it from a file.

Every token or file write is preceded by a journal entry and surrounded by crash points:

    phase         token                                         recover()
    ------------  --------------------------------------------  --------------------------------------
    prepared      LABEL live, LABEL.new being generated         destroy the prepared key
    installing    LABEL -> LABEL.bak, LABEL.new -> LABEL, cert  finish: new pair live, old one backed up
    installed     new pair live, old pair in LABEL.bak          nothing: the agent tries the new pair
    rolling_back  new pair being destroyed, .bak -> LABEL       finish: old pair live, no backup
    committing    LABEL.bak being destroyed                     finish: new pair live, no backup

An interrupted install is finished rather than undone: the journal holds the certificate, and the
outcome is the state a successful install leads to (new pair live, old pair kept for rollback). Objects
are recognised by their role, not by their step: keys by the prepared CKA_ID, certificates by value,
so recovery converges from any point in between and is idempotent.

With no journal, `recover()` destroys stray LABEL.new objects, adopts a certificate kept only as a
file (Greengrass allows that) into the token, rewrites the file if it differs from the token's
certificate, and in every case proves by a signature that the live key belongs to the certificate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import pkcs11
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import MGF, Attribute, CertificateType, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import FunctionNotSupported, PKCS11Error, RandomNoRNG, UserAlreadyLoggedIn
from pkcs11.util.ec import encode_ec_public_key, encode_ecdsa_signature, encode_named_curve_parameters

from certrotator import crypto
from certrotator.device.journal import Entry, Journal, atomic_write, crash_point
from certrotator.device.keystores.base import KeyStoreError
from certrotator.device.keystores.pkcs11_config import (
    BACKUP_SUFFIX,
    NEW_SUFFIX,
    PKCS11_PROVIDER,
    Pkcs11Config,
    Pkcs11ConfigError,
    parse_pkcs11_uri,
)

if sys.platform == "win32":
    import msvcrt

    def _lock_file(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)

else:
    import fcntl

    def _lock_file(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)


log = logging.getLogger(__name__)

PREPARED = "prepared"
INSTALLING = "installing"
INSTALLED = "installed"
ROLLING_BACK = "rolling_back"
COMMITTING = "committing"

# Every crash point this store passes, in order; the crash tests enumerate them.
CRASH_POINTS = (
    "pkcs11.prepare.begin",
    "pkcs11.prepare.journaled",
    "pkcs11.prepare.generated",
    "pkcs11.install.begin",
    "pkcs11.install.journaled",
    "pkcs11.install.backup_private",
    "pkcs11.install.backup_public",
    "pkcs11.install.backup_cert",
    "pkcs11.install.promote_private",
    "pkcs11.install.promote_public",
    "pkcs11.install.store_cert",
    "pkcs11.install.cert_file",
    "pkcs11.install.done",
    "pkcs11.rollback.begin",
    "pkcs11.rollback.journaled",
    "pkcs11.rollback.drop_cert",
    "pkcs11.rollback.drop_private",
    "pkcs11.rollback.drop_public",
    "pkcs11.rollback.restore_private",
    "pkcs11.rollback.restore_public",
    "pkcs11.rollback.restore_cert",
    "pkcs11.rollback.cert_file",
    "pkcs11.rollback.done",
    "pkcs11.commit.begin",
    "pkcs11.commit.journaled",
    "pkcs11.commit.drop_cert",
    "pkcs11.commit.drop_private",
    "pkcs11.commit.drop_public",
    "pkcs11.commit.done",
)

_KEY_CLASSES = (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)

# ------------------------------------------------------------------------------------------ signing

_PKCS1_MECHANISMS = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
_PSS_MECHANISMS = {
    "sha256": Mechanism.SHA256_RSA_PKCS_PSS,
    "sha384": Mechanism.SHA384_RSA_PKCS_PSS,
    "sha512": Mechanism.SHA512_RSA_PKCS_PSS,
}
_HASH_MECHANISMS = {"sha256": Mechanism.SHA256, "sha384": Mechanism.SHA384, "sha512": Mechanism.SHA512}
_MGFS = {"sha256": MGF.SHA256, "sha384": MGF.SHA384, "sha512": MGF.SHA512}
# DER DigestInfo prefixes (RFC 8017 §9.2, note 1), for tokens that only offer raw CKM_RSA_PKCS.
_DIGEST_INFO_PREFIXES = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def _digest(data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def _pss_mgf_hash(pss: padding.PSS, digest: hashes.HashAlgorithm) -> hashes.HashAlgorithm:
    # Like the salt length, cryptography keeps the MGF1 hash in private attributes.
    mgf: Any = getattr(pss, "_mgf", None)
    algorithm: Any = getattr(mgf, "_algorithm", None)
    return algorithm if isinstance(algorithm, hashes.HashAlgorithm) else digest


def token_signer(private_key: Any, mechanisms: frozenset[Any]) -> crypto.ExternalSign:
    """An `ExternalSign` that signs with a token private key.

    RSA uses the token's combined hash-and-sign mechanisms when `mechanisms` lists them, otherwise
    hashes on the host (CKM_RSA_PKCS with a DigestInfo, CKM_RSA_PKCS_PSS). ECDSA always hashes on the
    host and signs with plain CKM_ECDSA, which every EC token has (Debian's SoftHSM lacks
    CKM_ECDSA_SHA*), and turns the raw r‖s into the DER that X.509 wants.
    """

    def sign(data: bytes, pad: padding.AsymmetricPadding | None, algorithm: hashes.HashAlgorithm) -> bytes:
        name = algorithm.name
        if name not in _HASH_MECHANISMS:
            raise crypto.CryptoError(f"hash {name} is not supported for token signatures")
        try:
            if pad is None:
                raw = private_key.sign(_digest(data, algorithm), mechanism=Mechanism.ECDSA)
                return bytes(encode_ecdsa_signature(raw))
            if isinstance(pad, padding.PSS):
                mgf_hash = _pss_mgf_hash(pad, algorithm).name
                if mgf_hash not in _MGFS:
                    raise crypto.CryptoError(f"MGF1 hash {mgf_hash} is not supported for token signatures")
                params = (_HASH_MECHANISMS[name], _MGFS[mgf_hash], crypto.pss_salt_length(pad, algorithm))
                if _PSS_MECHANISMS[name] in mechanisms:
                    return bytes(
                        private_key.sign(data, mechanism=_PSS_MECHANISMS[name], mechanism_param=params)
                    )
                return bytes(
                    private_key.sign(
                        _digest(data, algorithm), mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=params
                    )
                )
            if isinstance(pad, padding.PKCS1v15):
                if _PKCS1_MECHANISMS[name] in mechanisms:
                    return bytes(private_key.sign(data, mechanism=_PKCS1_MECHANISMS[name]))
                digest_info = _DIGEST_INFO_PREFIXES[name] + _digest(data, algorithm)
                return bytes(private_key.sign(digest_info, mechanism=Mechanism.RSA_PKCS))
        except PKCS11Error as exc:
            raise KeyStoreError(f"the PKCS#11 token refused to sign ({exc!r})") from exc
        raise crypto.CryptoError(f"padding {pad.name} is not supported for token signatures")

    return sign


def _public_key_of(public_object: Any) -> crypto.PublicKey:
    """The cryptography public key for a token public key object."""
    if public_object.key_type == KeyType.RSA:
        modulus = int.from_bytes(public_object[Attribute.MODULUS], "big")
        exponent = int.from_bytes(public_object[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    if public_object.key_type == KeyType.EC:
        key = serialization.load_der_public_key(encode_ec_public_key(public_object))
        if isinstance(key, ec.EllipticCurvePublicKey):
            return key
    raise KeyStoreError(f"token public key {public_object!r} is neither RSA nor EC")


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


class _Target(Enum):
    """Where recovery converges to."""

    NEW_WITH_BACKUP = "new pair live, old pair backed up"
    NEW = "new pair live, old pair destroyed"
    OLD = "old pair live, new pair destroyed"


# -------------------------------------------------------------------------------------------- store


class Pkcs11KeyStore:
    """The KeyStore for a private key that lives in a PKCS#11 token (see the module docstring).

    Holds one logged-in session for its lifetime: PKCS#11 login state is per process, and closing a
    logged-in session logs out every session of the process, the AWS CRT's TLS sessions included.
    Call `close()` when done.
    """

    def __init__(self, config: Pkcs11Config, journal_path: Path, certificate_file: Path) -> None:
        self.config = config
        self.journal = Journal(journal_path)
        self.certificate_file = certificate_file
        self._lock_path = journal_path.with_name(journal_path.name + ".lock")
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        self._session: Any = None
        self._mechanisms: frozenset[Any] = frozenset()
        kl, cl = config.key_label, config.certificate_label
        self._key_label, self._key_new, self._key_bak = kl, kl + NEW_SUFFIX, kl + BACKUP_SUFFIX
        self._cert_label, self._cert_new, self._cert_bak = cl, cl + NEW_SUFFIX, cl + BACKUP_SUFFIX
        # Initialise the library now, before an AWS CRT Pkcs11Lib of this process does: python-pkcs11
        # refuses a library that is already initialised, while the CRT's DEFAULT behaviour accepts it.
        self._library()

    def _library(self) -> Any:
        try:
            return pkcs11.lib(str(self.config.library))
        except PKCS11Error as exc:
            if "already initialized" in str(exc):
                raise KeyStoreError(
                    f"{self.config.library} was initialised by another component of this process (an AWS "
                    "CRT Pkcs11Lib?) before the key store: create the key store first, and the CRT's "
                    "Pkcs11Lib with InitializeFinalizeBehavior.DEFAULT or OMIT"
                ) from exc
            raise KeyStoreError(f"cannot load the PKCS#11 library {self.config.library}: {exc}") from exc

    # ------------------------------------------------------------------------- session and lock

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._thread_lock:
            session, self._session = self._session, None
            if session is not None:
                with contextlib.suppress(PKCS11Error):  # already gone (library re-initialised, logged out)
                    session.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Thread lock plus an exclusive lock file next to the journal, so that neither two threads
        nor two processes (agent and an operator's CLI) interleave token changes. Re-entrant."""
        with self._thread_lock:
            if self._lock_depth:
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                _lock_file(fd)
                self._lock_depth = 1
                try:
                    yield
                finally:
                    self._lock_depth = 0
            finally:
                os.close(fd)  # releases the lock

    def _open_session(self) -> Any:
        token = self._find_token(self._library())
        try:
            session = token.open(rw=True, user_pin=self.config.user_pin)
        except UserAlreadyLoggedIn:
            # Another session of this process (the AWS CRT's) holds the login; a session without a
            # login of its own shares it, and closing it later does not log the CRT out. (python-pkcs11
            # does not close the session whose C_Login failed: one handle leaks, once.)
            session = token.open(rw=True)
        self._mechanisms = frozenset(token.slot.get_mechanisms())
        return session

    def _find_token(self, lib: Any) -> Any:
        wanted_slot = self.config.slot_id
        if self.config.token_label is not None:
            tokens = list(lib.get_tokens(token_label=self.config.token_label))
            if wanted_slot is not None:
                tokens = [t for t in tokens if t.slot.slot_id == wanted_slot]
            what = f"token labelled {self.config.token_label!r}"
        else:
            tokens = [s.get_token() for s in lib.get_slots(token_present=True) if s.slot_id == wanted_slot]
            what = f"token in slot {wanted_slot}"
        if len(tokens) != 1:
            found = "no" if not tokens else str(len(tokens))
            raise KeyStoreError(f"PKCS#11 library {self.config.library} has {found} {what}")
        return tokens[0]

    def _live_session(self) -> Any:
        if self._session is not None:
            try:
                # A re-initialised library kills the session: probe with a call that is not a search
                # (python-pkcs11 leaves a failed search's context to raise again in __del__).
                with contextlib.suppress(RandomNoRNG, FunctionNotSupported):
                    self._session.generate_random(64)
                # A logout elsewhere in the process hides private objects without any error.
                if self._private_keys_visible(self._session):
                    return self._session
            except PKCS11Error:
                pass
            self.close()
        self._session = self._open_session()
        return self._session

    def _private_keys_visible(self, s: Any) -> bool:
        return any(self._find(s, ObjectClass.PRIVATE_KEY, label) for label in self._key_labels())

    @contextlib.contextmanager
    def _operation(self, what: str) -> Iterator[Any]:
        with self._locked():
            try:
                yield self._live_session()
            except PKCS11Error as exc:
                raise KeyStoreError(f"PKCS#11 token error while {what}: {exc!r}") from exc
            except OSError as exc:
                raise KeyStoreError(f"file error while {what}: {exc}") from exc

    # -------------------------------------------------------------------------------- lookups

    def _key_labels(self) -> tuple[str, str, str]:
        return (self._key_label, self._key_new, self._key_bak)

    def _cert_labels(self) -> tuple[str, str, str]:
        return (self._cert_label, self._cert_new, self._cert_bak)

    @staticmethod
    def _find(s: Any, object_class: ObjectClass, label: str, key_id: bytes | None = None) -> list[Any]:
        template: dict[Attribute, Any] = {Attribute.CLASS: object_class, Attribute.LABEL: label}
        if key_id is not None:
            template[Attribute.ID] = key_id
        return list(s.get_objects(template))  # drained: a pending search blocks other calls

    def _one(self, s: Any, object_class: ObjectClass, label: str, key_id: bytes | None = None) -> Any:
        found = self._find(s, object_class, label, key_id)
        if len(found) != 1:
            kind = {ObjectClass.PRIVATE_KEY: "private key", ObjectClass.PUBLIC_KEY: "public key"}.get(
                object_class, "certificate"
            )
            raise KeyStoreError(
                f"the token holds {len(found)} {kind} objects labelled {label!r}; expected one"
            )
        return found[0]

    def _live_certificate(self, s: Any) -> x509.Certificate:
        obj = self._one(s, ObjectClass.CERTIFICATE, self._cert_label)
        try:
            return x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE]))
        except ValueError as exc:
            raise KeyStoreError(f"certificate object {self._cert_label!r} is not X.509 DER: {exc}") from None

    def _signs_for(self, private_key: Any, certificate: x509.Certificate) -> bool:
        """Whether the token key belongs to the certificate: proven by a signature, because an EC
        private key object does not carry its public point."""
        challenge = os.urandom(32)
        public = certificate.public_key()
        sign = token_signer(private_key, self._mechanisms)
        try:
            if isinstance(public, rsa.RSAPublicKey):
                signature = sign(challenge, padding.PKCS1v15(), hashes.SHA256())
                public.verify(signature, challenge, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(public, ec.EllipticCurvePublicKey):
                public.verify(sign(challenge, None, hashes.SHA256()), challenge, ec.ECDSA(hashes.SHA256()))
            else:
                return False
        except (InvalidSignature, KeyStoreError, crypto.CryptoError):
            return False
        return True

    def _check_live_pair(self, s: Any) -> x509.Certificate:
        certificate = self._live_certificate(s)
        if not self._signs_for(self._one(s, ObjectClass.PRIVATE_KEY, self._key_label), certificate):
            raise KeyStoreError(
                f"private key {self._key_label!r} does not belong to certificate {self._cert_label!r} "
                "in the token; inspect the token by hand"
            )
        return certificate

    def _adopt_certificate_file(self, s: Any) -> None:
        """Greengrass lets certificateFilePath be a plain file next to a token key. The store keeps the
        certificate in the token (so a backup is a relabel), so adopt the file's certificate once,
        with the key's CKA_ID, if it belongs to the key. A single create: a crash leaves it done or not."""
        if self._find(s, ObjectClass.CERTIFICATE, self._cert_label) or not self.certificate_file.exists():
            return
        try:
            certificate = crypto.load_certificate(self.certificate_file.read_bytes())
        except crypto.CryptoError as exc:
            raise KeyStoreError(f"{self.certificate_file}: {exc}") from None
        private_key = self._one(s, ObjectClass.PRIVATE_KEY, self._key_label)
        if not self._signs_for(private_key, certificate):
            raise KeyStoreError(
                f"the token has no certificate {self._cert_label!r}, and {self.certificate_file} does not "
                f"belong to private key {self._key_label!r}"
            )
        log.info("storing %s in the token as certificate %r", self.certificate_file, self._cert_label)
        self._create_certificate(s, certificate, bytes(private_key[Attribute.ID]))

    def _write_certificate_file(self, der: bytes) -> None:
        atomic_write(self.certificate_file, _pem(der), 0o644)

    def _sync_certificate_file(self, s: Any) -> None:
        """Make the certificate file a copy of the live certificate object (the token is authoritative)."""
        pem = self._live_certificate(s).public_bytes(serialization.Encoding.PEM)
        try:
            current = self.certificate_file.read_bytes()
        except FileNotFoundError:
            current = b""
        if current != pem:
            log.info("rewriting %s from the token's certificate %r", self.certificate_file, self._cert_label)
            atomic_write(self.certificate_file, pem, 0o644)

    # ------------------------------------------------------------------------------ KeyStore API

    def current_certificate(self) -> x509.Certificate:
        """The live certificate object (the file is a copy that `recover()` keeps in step)."""
        with self._operation("reading the certificate") as s:
            self._settled_entry(s)
            return self._live_certificate(s)

    def verify(self) -> x509.Certificate:
        """Check that the live key and certificate belong together and the file copy matches."""
        with self._operation("checking the credentials") as s:
            self._settled_entry(s)
            certificate = self._check_live_pair(s)
            if self.certificate_file.read_bytes() != certificate.public_bytes(serialization.Encoding.PEM):
                raise KeyStoreError(f"{self.certificate_file} differs from the token's certificate")
            return certificate

    def has_backup(self) -> bool:
        with self._operation("reading the journal") as s:
            entry = self._settled_entry(s)
            return entry is not None and entry.phase == INSTALLED

    def recover(self) -> None:
        with self._operation("recovering") as s:
            self._resume(s, self.journal.read())
            self._check_live_pair(s)

    def prepare(
        self, job_id: str, key_algorithm: crypto.KeyAlgorithm, signing_algorithm: crypto.SigningAlgorithm
    ) -> str:
        try:
            self.config.validate(key_algorithm)
            crypto.check_family(key_algorithm, signing_algorithm)
        except crypto.CryptoError as exc:
            raise KeyStoreError(str(exc)) from None
        with self._operation("generating a new key") as s:
            entry = self._settled_entry(s)
            if entry is not None and entry.phase == INSTALLED:
                raise KeyStoreError(
                    f"credentials of job {entry.job_id!r} are installed but not committed; "
                    "commit or roll back before preparing a new key"
                )
            subject = self._live_certificate(s).subject
            self._drop_prepared(s)  # an earlier prepared key is never installed now
            new_id = os.urandom(16)
            crash_point("pkcs11.prepare.begin")
            self.journal.write(job_id, PREPARED, newId=new_id.hex(), keyAlgorithm=key_algorithm.value)
            crash_point("pkcs11.prepare.journaled")
            public, private = self._generate(s, key_algorithm, new_id)
            crash_point("pkcs11.prepare.generated")
            try:
                key = crypto.external_key(_public_key_of(public), token_signer(private, self._mechanisms))
                csr = crypto.build_csr(key, signing_algorithm, subject)
                # Cheap insurance against a token that signs differently from what we assume
                # (mechanism parameters, ECDSA truncation): never send the cloud a CSR that fails.
                if not crypto.inspect_csr(csr).signature_valid:
                    raise KeyStoreError(
                        f"the token's {signing_algorithm.value} CSR signature does not verify"
                    )
                return csr
            except BaseException:
                self._drop_prepared(s)
                raise

    def discard_prepared(self) -> None:
        with self._operation("discarding the prepared key") as s:
            self._settled_entry(s)
            self._drop_prepared(s)

    def install(self, job_id: str, certificate_pem: str) -> None:
        try:
            certificate = crypto.load_certificate(certificate_pem)
        except crypto.CryptoError as exc:
            raise KeyStoreError(f"the new certificate is unusable: {exc}") from None
        der = certificate.public_bytes(serialization.Encoding.DER)
        kl, cl = self._key_label, self._cert_label
        with self._operation("installing the new certificate") as s:
            entry = self._settled_entry(s)
            if entry is None or entry.phase != PREPARED or entry.job_id != job_id:
                raise KeyStoreError(f"no key was prepared for job {job_id!r} (or the agent restarted since)")
            new_id = bytes.fromhex(str(entry.extra["newId"]))
            new_private = self._one(s, ObjectClass.PRIVATE_KEY, self._key_new, new_id)
            new_public = self._one(s, ObjectClass.PUBLIC_KEY, self._key_new, new_id)
            if not crypto.same_public_key(certificate.public_key(), _public_key_of(new_public)):
                raise KeyStoreError(
                    "the new certificate is not for the key this device generated; nothing changed"
                )
            old_private = self._one(s, ObjectClass.PRIVATE_KEY, kl)
            old_publics = self._find(s, ObjectClass.PUBLIC_KEY, kl)  # provisioning tools may skip it
            old_certificate = self._one(s, ObjectClass.CERTIFICATE, cl)
            if len(old_publics) > 1:
                raise KeyStoreError(f"the token holds {len(old_publics)} public keys labelled {kl!r}")
            leftovers = [
                label
                for object_class, label in (
                    (ObjectClass.PRIVATE_KEY, self._key_bak),
                    (ObjectClass.PUBLIC_KEY, self._key_bak),
                    (ObjectClass.CERTIFICATE, self._cert_bak),
                )
                if self._find(s, object_class, label)
            ]
            if leftovers:
                raise KeyStoreError(f"the token already holds backup objects {leftovers}; inspect it by hand")

            extra = {"newId": new_id.hex(), "certificate": certificate_pem}
            crash_point("pkcs11.install.begin")
            self.journal.write(job_id, INSTALLING, **extra)
            crash_point("pkcs11.install.journaled")
            try:
                old_private[Attribute.LABEL] = self._key_bak
                crash_point("pkcs11.install.backup_private")
                for public in old_publics:
                    public[Attribute.LABEL] = self._key_bak
                crash_point("pkcs11.install.backup_public")
                old_certificate[Attribute.LABEL] = self._cert_bak
                crash_point("pkcs11.install.backup_cert")
                new_private[Attribute.LABEL] = kl
                crash_point("pkcs11.install.promote_private")
                new_public[Attribute.LABEL] = kl
                crash_point("pkcs11.install.promote_public")
                self._create_certificate(s, certificate, new_id)
                crash_point("pkcs11.install.store_cert")
                self._write_certificate_file(der)
                crash_point("pkcs11.install.cert_file")
                self.journal.write(job_id, INSTALLED, **extra)
                crash_point("pkcs11.install.done")
            except (PKCS11Error, OSError) as exc:
                # The caller is told the install failed, so undo it (journaled: a failure of the undo
                # itself is finished by the next recover()).
                self.journal.write(job_id, ROLLING_BACK, **extra)
                self._resume(s, self.journal.read())
                raise KeyStoreError(f"installing the new credentials failed and was undone: {exc!r}") from exc

    def rollback(self) -> None:
        with self._operation("rolling back") as s:
            entry = self._settled_entry(s)
            if entry is None or entry.phase != INSTALLED:
                return
            new_id = bytes.fromhex(str(entry.extra["newId"]))
            crash_point("pkcs11.rollback.begin")
            self.journal.write(entry.job_id, ROLLING_BACK, **entry.extra)
            crash_point("pkcs11.rollback.journaled")
            with self._finish_on_error(s):
                for obj in self._find(s, ObjectClass.CERTIFICATE, self._cert_label, new_id):
                    obj.destroy()
                crash_point("pkcs11.rollback.drop_cert")
                for obj in self._find(s, ObjectClass.PRIVATE_KEY, self._key_label, new_id):
                    obj.destroy()
                crash_point("pkcs11.rollback.drop_private")
                for obj in self._find(s, ObjectClass.PUBLIC_KEY, self._key_label, new_id):
                    obj.destroy()
                crash_point("pkcs11.rollback.drop_public")
                self._one(s, ObjectClass.PRIVATE_KEY, self._key_bak)[Attribute.LABEL] = self._key_label
                crash_point("pkcs11.rollback.restore_private")
                for obj in self._find(s, ObjectClass.PUBLIC_KEY, self._key_bak):
                    obj[Attribute.LABEL] = self._key_label
                crash_point("pkcs11.rollback.restore_public")
                old_certificate = self._one(s, ObjectClass.CERTIFICATE, self._cert_bak)
                old_certificate[Attribute.LABEL] = self._cert_label
                crash_point("pkcs11.rollback.restore_cert")
                self._write_certificate_file(bytes(old_certificate[Attribute.VALUE]))
                crash_point("pkcs11.rollback.cert_file")
                self.journal.clear()
                crash_point("pkcs11.rollback.done")

    def commit(self) -> None:
        with self._operation("committing") as s:
            entry = self._settled_entry(s)
            if entry is None or entry.phase != INSTALLED:
                return
            crash_point("pkcs11.commit.begin")
            self.journal.write(entry.job_id, COMMITTING, **entry.extra)
            crash_point("pkcs11.commit.journaled")
            with self._finish_on_error(s):
                for obj in self._find(s, ObjectClass.CERTIFICATE, self._cert_bak):
                    obj.destroy()
                crash_point("pkcs11.commit.drop_cert")
                for obj in self._find(s, ObjectClass.PRIVATE_KEY, self._key_bak):
                    obj.destroy()
                crash_point("pkcs11.commit.drop_private")
                for obj in self._find(s, ObjectClass.PUBLIC_KEY, self._key_bak):
                    obj.destroy()
                crash_point("pkcs11.commit.drop_public")
                self.journal.clear()
                crash_point("pkcs11.commit.done")

    # ------------------------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _finish_on_error(self, s: Any) -> Iterator[None]:
        """A journaled step that fails half-way is finished from the journal before the error goes up."""
        try:
            yield
        except (PKCS11Error, OSError, KeyStoreError) as exc:
            try:
                self._resume(s, self.journal.read())
            except (PKCS11Error, OSError, KeyStoreError) as again:
                log.error("finishing the interrupted step failed too (%r); recover() will retry", again)
            raise KeyStoreError(f"token step failed: {exc!r}") from exc

    def _generate(self, s: Any, algorithm: crypto.KeyAlgorithm, key_id: bytes) -> tuple[Any, Any]:
        common: dict[str, Any] = {
            "id": key_id,
            "label": self._key_new,
            "store": True,  # CKA_TOKEN: the key outlives the session
            "capabilities": MechanismFlag.SIGN | MechanismFlag.VERIFY,
            "private_template": {
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                # What real HSMs enforce; the rotation never copies a key, it relabels.
                Attribute.COPYABLE: False,
            },
        }
        if algorithm.family is crypto.Family.RSA:
            public, private = s.generate_keypair(
                KeyType.RSA, algorithm.rsa_bits, public_template={Attribute.PRIVATE: False}, **common
            )
        else:
            params = encode_named_curve_parameters(algorithm.curve.name)
            public, private = s.generate_keypair(
                KeyType.EC, public_template={Attribute.EC_PARAMS: params, Attribute.PRIVATE: False}, **common
            )
        return public, private

    def _create_certificate(self, s: Any, certificate: x509.Certificate, key_id: bytes) -> Any:
        # SoftHSM leaves a half-made object behind when C_CreateObject fails (e.g. CKA_SUBJECT
        # missing), so give it everything; recovery destroys certificate objects that do not parse.
        serial = certificate.serial_number
        serial_der = b"\x02" + _der_length(_int_bytes(serial)) + _int_bytes(serial)
        return s.create_object(
            {
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.LABEL: self._cert_label,
                Attribute.ID: key_id,
                Attribute.SUBJECT: certificate.subject.public_bytes(),
                Attribute.ISSUER: certificate.issuer.public_bytes(),
                Attribute.SERIAL_NUMBER: serial_der,
                Attribute.VALUE: certificate.public_bytes(serialization.Encoding.DER),
            }
        )

    def _settled_entry(self, s: Any) -> Entry | None:
        """The journal entry, after finishing a step that an error (not a crash) left half-done."""
        entry = self.journal.read()
        if entry is not None and entry.phase in (INSTALLING, ROLLING_BACK, COMMITTING):
            self._resume(s, entry)
            entry = self.journal.read()
        return entry

    def _drop_prepared(self, s: Any) -> None:
        """Destroy the prepared key pair (everything under LABEL.new), then forget it."""
        entry = self.journal.read()
        doomed = [o for c in _KEY_CLASSES for o in self._find(s, c, self._key_new)]
        doomed += self._find(s, ObjectClass.CERTIFICATE, self._cert_new)
        for obj in doomed:
            log.info("destroying prepared/leftover token object %r", obj)
            obj.destroy()
        if entry is not None and entry.phase == PREPARED:
            self.journal.clear()

    def _resume(self, s: Any, entry: Entry | None) -> None:
        """Finish (or, for a prepared key, undo) what the journal says was going on."""
        if entry is None:
            self._drop_prepared(s)  # stray LABEL.new objects only
            self._adopt_certificate_file(s)
        elif entry.phase == PREPARED:
            log.info("dropping the key prepared for job %s (it will never be installed now)", entry.job_id)
            self._drop_prepared(s)
        elif entry.phase in (INSTALLING, INSTALLED, ROLLING_BACK, COMMITTING):
            target = {
                INSTALLING: _Target.NEW_WITH_BACKUP,
                INSTALLED: _Target.NEW_WITH_BACKUP,
                ROLLING_BACK: _Target.OLD,
                COMMITTING: _Target.NEW,
            }[entry.phase]
            certificate = crypto.load_certificate(str(entry.extra["certificate"]))
            self._settle(s, bytes.fromhex(str(entry.extra["newId"])), certificate, target)
            if entry.phase == INSTALLING:
                self.journal.write(entry.job_id, INSTALLED, **entry.extra)
            elif entry.phase != INSTALLED:
                self.journal.clear()
        else:
            raise KeyStoreError(f"rotation journal {self.journal.path} has unknown phase {entry.phase!r}")
        self._sync_certificate_file(s)

    def _settle(self, s: Any, new_id: bytes, new_certificate: x509.Certificate, target: _Target) -> None:
        """Relabel, destroy or create objects until the token is in `target`; only changes what differs.

        Roles: a key is new if it has the prepared CKA_ID; a certificate is new if its value is the
        new certificate (a half-made or foreign-valued one with the new CKA_ID is junk); anything else
        under LABEL or LABEL.bak is the old pair; anything else under LABEL.new is junk.
        """
        new_der = new_certificate.public_bytes(serialization.Encoding.DER)
        keep_new = target in (_Target.NEW, _Target.NEW_WITH_BACKUP)
        old_label_suffix = {_Target.OLD: "", _Target.NEW_WITH_BACKUP: BACKUP_SUFFIX, _Target.NEW: None}[
            target
        ]

        keys = [o for c in _KEY_CLASSES for label in self._key_labels() for o in self._find(s, c, label)]
        keys += [o for c in _KEY_CLASSES for o in s.get_objects({Attribute.CLASS: c, Attribute.ID: new_id})]
        certs = [o for label in self._cert_labels() for o in self._find(s, ObjectClass.CERTIFICATE, label)]
        certs += list(s.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: new_id}))

        wanted: list[tuple[Any, str | None]] = []  # (object, label to have, or None to destroy)
        for obj in _unique(keys):
            if bytes(obj[Attribute.ID]) == new_id:
                wanted.append((obj, self._key_label if keep_new else None))
            elif str(obj[Attribute.LABEL]).endswith(NEW_SUFFIX) or old_label_suffix is None:
                wanted.append((obj, None))
            else:
                wanted.append((obj, self._key_label + old_label_suffix))
        kept_new_certificate = False
        for obj in _unique(certs):
            value = bytes(obj[Attribute.VALUE])
            if value == new_der:
                wanted.append((obj, self._cert_label if keep_new and not kept_new_certificate else None))
                kept_new_certificate = kept_new_certificate or keep_new
            elif (
                bytes(obj[Attribute.ID]) == new_id
                or str(obj[Attribute.LABEL]).endswith(NEW_SUFFIX)
                or old_label_suffix is None
                or not _is_certificate(value)
            ):
                wanted.append((obj, None))
            else:
                wanted.append((obj, self._cert_label + old_label_suffix))

        # Destroy first, then move aside to LABEL.bak, then promote: a label never names two objects.
        for obj, label in wanted:
            if label is None:
                log.info("recovery (%s): destroying %r", target.value, obj)
                obj.destroy()
        backups = [(o, label) for o, label in wanted if label is not None and label.endswith(BACKUP_SUFFIX)]
        lives = [(o, label) for o, label in wanted if label is not None and not label.endswith(BACKUP_SUFFIX)]
        for obj, label in backups + lives:
            if str(obj[Attribute.LABEL]) != label:
                log.info("recovery (%s): relabelling %r to %r", target.value, obj, label)
                obj[Attribute.LABEL] = label
        if keep_new and not kept_new_certificate:
            log.info("recovery (%s): storing the new certificate in the token", target.value)
            self._create_certificate(s, new_certificate, new_id)


def _unique(objects: list[Any]) -> list[Any]:
    seen: set[int] = set()
    result = []
    for obj in objects:
        if obj.handle not in seen:
            seen.add(obj.handle)
            result.append(obj)
    return result


def _is_certificate(der: bytes) -> bool:
    try:
        x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    return True


def _int_bytes(value: int) -> bytes:
    """Minimal two's-complement big-endian bytes of a non-negative INTEGER (DER content)."""
    return value.to_bytes(value.bit_length() // 8 + 1, "big")


def _der_length(content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([n])
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(size)]) + size


# ---------------------------------------------------------------------------------------- factories


class Pkcs11Settings(Protocol):
    """The PKCS#11 part of a standalone `device.toml` (certrotator.device.config.Pkcs11Settings)."""

    @property
    def library(self) -> Path: ...
    @property
    def user_pin(self) -> str: ...
    @property
    def key_label(self) -> str: ...
    @property
    def token_label(self) -> str | None: ...
    @property
    def slot_id(self) -> int | None: ...


def store_from_settings(
    settings: Pkcs11Settings, certificate_file: Path, journal_path: Path
) -> Pkcs11KeyStore:
    """Standalone mode: the key pair and the certificate object share the key label (told apart by
    their class), and `certificate_file` is the copy the AWS CRT reads."""
    config = Pkcs11Config(
        library=settings.library,
        key_label=settings.key_label,
        certificate_label=settings.key_label,
        user_pin=settings.user_pin,
        token_label=settings.token_label,
        slot_id=settings.slot_id,
    )
    return Pkcs11KeyStore(config, journal_path, certificate_file)


def store_from_greengrass(
    provider: Mapping[str, Any],
    certificate: str,
    private_key: str,
    certificate_file: Path,
    journal_path: Path,
) -> Pkcs11KeyStore:
    """Greengrass mode: the nucleus' `privateKeyPath` (a `pkcs11:` URI), its `certificateFilePath` (a
    `pkcs11:` URI or a file) and the `aws.greengrass.crypto.Pkcs11Provider` configuration (`library`,
    `slot`, `userPin`). A certificate kept as a file is stored in the token under the key label by
    `recover()`, and the file stays the copy the nucleus reads."""
    slot = provider.get("slot")
    try:
        slot_id = None if slot is None or str(slot).strip() == "" else int(str(slot))
    except ValueError:
        raise Pkcs11ConfigError(f"{PKCS11_PROVIDER} slot {slot!r} is not a number") from None
    pin = provider.get("userPin")
    key = parse_pkcs11_uri(private_key, "private")
    certificate_uri = (
        certificate
        if certificate.startswith("pkcs11:")
        else f"pkcs11:object={quote(key.object, safe='')};type=cert"
    )
    config = Pkcs11Config.from_uris(
        library=str(provider.get("library") or ""),
        private_key_uri=private_key,
        certificate_uri=certificate_uri,
        user_pin=None if pin is None else str(pin),
        slot_id=slot_id,
    )
    return Pkcs11KeyStore(config, journal_path, certificate_file)
