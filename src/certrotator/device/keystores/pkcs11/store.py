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

Recovery is `recovery`; the session, lock and object helpers are `token`, token signatures `signing`;
the store for each mode's settings is made by `from_settings`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import PKCS11Error

from certrotator import crypto
from certrotator.device.journal import Journal, atomic_write, crash_point
from certrotator.device.keystores.base import KeyStoreError, TransientKeyStoreError, check_validity
from certrotator.device.keystores.pkcs11.location import (
    BACKUP_SUFFIX,
    NEW_SUFFIX,
    Pkcs11Config,
)
from certrotator.device.keystores.pkcs11.recovery import (
    COMMITTING,
    INSTALLED,
    INSTALLING,
    PREPARED,
    ROLLING_BACK,
    Pkcs11Recovery,
)
from certrotator.device.keystores.pkcs11.signing import token_signer
from certrotator.device.keystores.pkcs11.token import (
    Pkcs11Token,
    create_certificate,
    find,
    find_one,
    generate_key_pair,
    public_key_of,
    token_error,
)

log = logging.getLogger(__name__)

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


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


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
        kl, cl = config.key_label, config.certificate_label
        self._key_label, self._key_new, self._key_bak = kl, kl + NEW_SUFFIX, kl + BACKUP_SUFFIX
        self._cert_label, self._cert_bak = cl, cl + BACKUP_SUFFIX
        lock_path = journal_path.with_name(journal_path.name + ".lock")
        # Loads the library now (see Pkcs11Token); the session is opened by the first operation.
        self._token = Pkcs11Token(config, (self._key_label, self._key_new, self._key_bak), lock_path)
        self._recovery = Pkcs11Recovery(self._token, self.journal, certificate_file)

    # -------------------------------------------------------------------------------- session

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._token.close()

    @contextlib.contextmanager
    def _operation(self, what: str) -> Iterator[Any]:
        with self._token.locked():
            try:
                yield self._token.session()
            except PKCS11Error as exc:
                raise token_error(f"PKCS#11 token error while {what}: {exc!r}", exc) from exc
            except OSError as exc:
                raise KeyStoreError(f"file error while {what}: {exc}") from exc

    # ------------------------------------------------------------------------------ KeyStore API

    def current_certificate(self) -> x509.Certificate:
        """The live certificate object (the file is a copy that `recover()` keeps in step)."""
        with self._operation("reading the certificate") as s:
            self._recovery.settled_entry(s)
            return self._recovery.live_certificate(s)

    def verify(self) -> x509.Certificate:
        """Check that the live key and certificate belong together and the file copy matches."""
        with self._operation("checking the credentials") as s:
            self._recovery.settled_entry(s)
            certificate = self._recovery.check_live_pair(s)
            if self.certificate_file.read_bytes() != certificate.public_bytes(serialization.Encoding.PEM):
                raise KeyStoreError(f"{self.certificate_file} differs from the token's certificate")
            return certificate

    def has_backup(self) -> bool:
        with self._operation("reading the journal") as s:
            entry = self._recovery.settled_entry(s)
            return entry is not None and entry.phase == INSTALLED

    def recover(self) -> None:
        """Also the start-up check of the token: an attempt that failed in a way that may pass leaves the
        next one to start from a re-initialised library (the agent retries with back-off)."""
        if self._token.needs_reinitialize:
            self._token.reinitialize()
        try:
            with self._operation("recovering") as s:
                self._recovery.resume(s, self.journal.read())
                self._recovery.check_live_pair(s)
        except TransientKeyStoreError:
            self._token.needs_reinitialize = True
            raise

    def prepare(
        self, job_id: str, key_algorithm: crypto.KeyAlgorithm, signing_algorithm: crypto.SigningAlgorithm
    ) -> str:
        try:
            self.config.validate(key_algorithm)
            crypto.check_family(key_algorithm, signing_algorithm)
        except crypto.CryptoError as exc:
            raise KeyStoreError(str(exc)) from None
        with self._operation("generating a new key") as s:
            entry = self._recovery.settled_entry(s)
            if entry is not None and entry.phase == INSTALLED:
                raise KeyStoreError(
                    f"credentials of job {entry.job_id!r} are installed but not committed; "
                    "commit or roll back before preparing a new key"
                )
            subject = self._recovery.live_certificate(s).subject
            self._recovery.drop_prepared(s)  # an earlier prepared key is never installed now
            new_id = os.urandom(16)
            crash_point("pkcs11.prepare.begin")
            self.journal.write(job_id, PREPARED, newId=new_id.hex(), keyAlgorithm=key_algorithm.value)
            crash_point("pkcs11.prepare.journaled")
            public, private = generate_key_pair(s, key_algorithm, self._key_new, new_id)
            crash_point("pkcs11.prepare.generated")
            try:
                key = crypto.external_key(
                    public_key_of(public), token_signer(private, self._token.mechanisms)
                )
                csr = crypto.build_csr(key, signing_algorithm, subject)
                # Cheap insurance against a token that signs differently from what we assume
                # (mechanism parameters, ECDSA truncation): never send the cloud a CSR that fails.
                if not crypto.inspect_csr(csr).signature_valid:
                    raise KeyStoreError(
                        f"the token's {signing_algorithm.value} CSR signature does not verify"
                    )
                return csr
            except BaseException:
                self._recovery.drop_prepared(s)
                raise

    def discard_prepared(self) -> None:
        with self._operation("discarding the prepared key") as s:
            self._recovery.settled_entry(s)
            self._recovery.drop_prepared(s)

    def install(self, job_id: str, certificate_pem: str) -> None:
        try:
            certificate = crypto.load_certificate(certificate_pem)
        except crypto.CryptoError as exc:
            raise KeyStoreError(f"the new certificate is unusable: {exc}") from None
        der = certificate.public_bytes(serialization.Encoding.DER)
        kl, cl = self._key_label, self._cert_label
        with self._operation("installing the new certificate") as s:
            entry = self._recovery.settled_entry(s)
            if entry is None or entry.phase != PREPARED or entry.job_id != job_id:
                raise KeyStoreError(f"no key was prepared for job {job_id!r} (or the agent restarted since)")
            new_id = bytes.fromhex(str(entry.extra["newId"]))
            new_private = find_one(s, ObjectClass.PRIVATE_KEY, self._key_new, new_id)
            new_public = find_one(s, ObjectClass.PUBLIC_KEY, self._key_new, new_id)
            if not crypto.same_public_key(certificate.public_key(), public_key_of(new_public)):
                raise KeyStoreError(
                    "the new certificate is not for the key this device generated; nothing changed"
                )
            check_validity(certificate)  # the broker would refuse it: fail the job with its dates instead
            old_private = find_one(s, ObjectClass.PRIVATE_KEY, kl)
            old_publics = find(s, ObjectClass.PUBLIC_KEY, kl)  # provisioning tools may skip it
            old_certificate = find_one(s, ObjectClass.CERTIFICATE, cl)
            if len(old_publics) > 1:
                raise KeyStoreError(f"the token holds {len(old_publics)} public keys labelled {kl!r}")
            leftovers = [
                label
                for object_class, label in (
                    (ObjectClass.PRIVATE_KEY, self._key_bak),
                    (ObjectClass.PUBLIC_KEY, self._key_bak),
                    (ObjectClass.CERTIFICATE, self._cert_bak),
                )
                if find(s, object_class, label)
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
                create_certificate(s, certificate, self._cert_label, new_id)
                crash_point("pkcs11.install.store_cert")
                self._write_certificate_file(der)
                crash_point("pkcs11.install.cert_file")
                self.journal.write(job_id, INSTALLED, **extra)
                crash_point("pkcs11.install.done")
            except (PKCS11Error, OSError) as exc:
                # The caller is told the install failed, so undo it (journaled: a failure of the undo
                # itself is finished by the next recover()).
                self.journal.write(job_id, ROLLING_BACK, **extra)
                self._recovery.resume(s, self.journal.read())
                raise KeyStoreError(f"installing the new credentials failed and was undone: {exc!r}") from exc

    def rollback(self) -> None:
        with self._operation("rolling back") as s:
            entry = self._recovery.settled_entry(s)
            if entry is None or entry.phase != INSTALLED:
                return
            new_id = bytes.fromhex(str(entry.extra["newId"]))
            crash_point("pkcs11.rollback.begin")
            self.journal.write(entry.job_id, ROLLING_BACK, **entry.extra)
            crash_point("pkcs11.rollback.journaled")
            with self._finish_on_error(s):
                for obj in find(s, ObjectClass.CERTIFICATE, self._cert_label, new_id):
                    obj.destroy()
                crash_point("pkcs11.rollback.drop_cert")
                for obj in find(s, ObjectClass.PRIVATE_KEY, self._key_label, new_id):
                    obj.destroy()
                crash_point("pkcs11.rollback.drop_private")
                for obj in find(s, ObjectClass.PUBLIC_KEY, self._key_label, new_id):
                    obj.destroy()
                crash_point("pkcs11.rollback.drop_public")
                find_one(s, ObjectClass.PRIVATE_KEY, self._key_bak)[Attribute.LABEL] = self._key_label
                crash_point("pkcs11.rollback.restore_private")
                for obj in find(s, ObjectClass.PUBLIC_KEY, self._key_bak):
                    obj[Attribute.LABEL] = self._key_label
                crash_point("pkcs11.rollback.restore_public")
                old_certificate = find_one(s, ObjectClass.CERTIFICATE, self._cert_bak)
                old_certificate[Attribute.LABEL] = self._cert_label
                crash_point("pkcs11.rollback.restore_cert")
                self._write_certificate_file(bytes(old_certificate[Attribute.VALUE]))
                crash_point("pkcs11.rollback.cert_file")
                self.journal.clear()
                crash_point("pkcs11.rollback.done")

    def commit(self) -> None:
        with self._operation("committing") as s:
            entry = self._recovery.settled_entry(s)
            if entry is None or entry.phase != INSTALLED:
                return
            crash_point("pkcs11.commit.begin")
            self.journal.write(entry.job_id, COMMITTING, **entry.extra)
            crash_point("pkcs11.commit.journaled")
            with self._finish_on_error(s):
                for obj in find(s, ObjectClass.CERTIFICATE, self._cert_bak):
                    obj.destroy()
                crash_point("pkcs11.commit.drop_cert")
                for obj in find(s, ObjectClass.PRIVATE_KEY, self._key_bak):
                    obj.destroy()
                crash_point("pkcs11.commit.drop_private")
                for obj in find(s, ObjectClass.PUBLIC_KEY, self._key_bak):
                    obj.destroy()
                crash_point("pkcs11.commit.drop_public")
                self.journal.clear()
                crash_point("pkcs11.commit.done")

    # ------------------------------------------------------------------------------- internals

    def _write_certificate_file(self, der: bytes) -> None:
        atomic_write(self.certificate_file, _pem(der), 0o644)

    @contextlib.contextmanager
    def _finish_on_error(self, s: Any) -> Iterator[None]:
        """A journaled step that fails half-way is finished from the journal before the error goes up."""
        try:
            yield
        except (PKCS11Error, OSError, KeyStoreError) as exc:
            try:
                self._recovery.resume(s, self.journal.read())
            except (PKCS11Error, OSError, KeyStoreError) as again:
                log.error("finishing the interrupted step failed too (%r); recover() will retry", again)
            raise KeyStoreError(f"token step failed: {exc!r}") from exc
