"""Recovery of the PKCS#11 key store: finish (or, for a prepared key, undo) what the rotation journal
says was going on, keep the certificate file a copy of the token's certificate, and check that the
live key belongs to the live certificate. The phases and what recovery makes of each are tabled in
`certrotator.device.keystores.pkcs11.store`.

Objects are recognised by their role, not by their step (`settle`): keys by the prepared CKA_ID,
certificates by value, so recovery converges from any point in between and is idempotent.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, ObjectClass

from certrotator import crypto
from certrotator.device.journal import Entry, Journal, atomic_write
from certrotator.device.keystores.base import KeyStoreError
from certrotator.device.keystores.pkcs11.location import BACKUP_SUFFIX, NEW_SUFFIX
from certrotator.device.keystores.pkcs11.signing import signs_for
from certrotator.device.keystores.pkcs11.token import (
    KEY_CLASSES,
    Pkcs11Token,
    create_certificate,
    find,
    find_one,
)

# The store's logger: this is the store recovering.
log = logging.getLogger("certrotator.device.keystores.pkcs11.store")

# The journal phases of a rotation.
PREPARED = "prepared"
INSTALLING = "installing"
INSTALLED = "installed"
ROLLING_BACK = "rolling_back"
COMMITTING = "committing"


class RecoveryTarget(Enum):
    """Where recovery converges to."""

    NEW_WITH_BACKUP = "new pair live, old pair backed up"
    NEW = "new pair live, old pair destroyed"
    OLD = "old pair live, new pair destroyed"


_TARGETS = {
    INSTALLING: RecoveryTarget.NEW_WITH_BACKUP,
    INSTALLED: RecoveryTarget.NEW_WITH_BACKUP,
    ROLLING_BACK: RecoveryTarget.OLD,
    COMMITTING: RecoveryTarget.NEW,
}


class Pkcs11Recovery:
    """Recovery for the key store that owns `token`, `journal` and `certificate_file`.

    Every method takes the session of an operation that holds the token's lock.
    """

    def __init__(self, token: Pkcs11Token, journal: Journal, certificate_file: Path) -> None:
        self.token = token
        self.journal = journal
        self.certificate_file = certificate_file
        self.key_label = token.config.key_label
        self.certificate_label = token.config.certificate_label

    def settled_entry(self, s: Any) -> Entry | None:
        """The journal entry, after finishing a step that an error (not a crash) left half-done."""
        entry = self.journal.read()
        if entry is not None and entry.phase in (INSTALLING, ROLLING_BACK, COMMITTING):
            self.resume(s, entry)
            entry = self.journal.read()
        return entry

    def resume(self, s: Any, entry: Entry | None) -> None:
        """Finish (or, for a prepared key, undo) what the journal says was going on."""
        if entry is None:
            self.drop_prepared(s)  # stray LABEL.new objects only
            self._adopt_certificate_file(s)
        elif entry.phase == PREPARED:
            log.info("dropping the key prepared for job %s (it will never be installed now)", entry.job_id)
            self.drop_prepared(s)
        elif entry.phase in _TARGETS:
            certificate = crypto.load_certificate(str(entry.extra["certificate"]))
            new_id = bytes.fromhex(str(entry.extra["newId"]))
            settle(s, self.key_label, self.certificate_label, new_id, certificate, _TARGETS[entry.phase])
            if entry.phase == INSTALLING:
                self.journal.write(entry.job_id, INSTALLED, **entry.extra)
            elif entry.phase != INSTALLED:
                self.journal.clear()
        else:
            raise KeyStoreError(f"rotation journal {self.journal.path} has unknown phase {entry.phase!r}")
        self._sync_certificate_file(s)

    def drop_prepared(self, s: Any) -> None:
        """Destroy the prepared key pair (everything under LABEL.new), then forget it."""
        entry = self.journal.read()
        doomed = [o for c in KEY_CLASSES for o in find(s, c, self.key_label + NEW_SUFFIX)]
        doomed += find(s, ObjectClass.CERTIFICATE, self.certificate_label + NEW_SUFFIX)
        for obj in doomed:
            log.info("destroying prepared/leftover token object %r", obj)
            obj.destroy()
        if entry is not None and entry.phase == PREPARED:
            self.journal.clear()

    def live_certificate(self, s: Any) -> x509.Certificate:
        obj = find_one(s, ObjectClass.CERTIFICATE, self.certificate_label)
        try:
            return x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE]))
        except ValueError as exc:
            raise KeyStoreError(
                f"certificate object {self.certificate_label!r} is not X.509 DER: {exc}"
            ) from None

    def check_live_pair(self, s: Any) -> x509.Certificate:
        certificate = self.live_certificate(s)
        if not self._signs_for(find_one(s, ObjectClass.PRIVATE_KEY, self.key_label), certificate):
            raise KeyStoreError(
                f"private key {self.key_label!r} does not belong to certificate {self.certificate_label!r} "
                "in the token; inspect the token by hand"
            )
        return certificate

    def _signs_for(self, private_key: Any, certificate: x509.Certificate) -> bool:
        return signs_for(private_key, certificate, self.token.mechanisms)

    def _adopt_certificate_file(self, s: Any) -> None:
        """Greengrass lets certificateFilePath be a plain file next to a token key. The store keeps the
        certificate in the token (so a backup is a relabel), so adopt the file's certificate once,
        with the key's CKA_ID, if it belongs to the key. A single create: a crash leaves it done or not."""
        if find(s, ObjectClass.CERTIFICATE, self.certificate_label) or not self.certificate_file.exists():
            return
        try:
            certificate = crypto.load_certificate(self.certificate_file.read_bytes())
        except crypto.CryptoError as exc:
            raise KeyStoreError(f"{self.certificate_file}: {exc}") from None
        private_key = find_one(s, ObjectClass.PRIVATE_KEY, self.key_label)
        if not self._signs_for(private_key, certificate):
            raise KeyStoreError(
                f"the token has no certificate {self.certificate_label!r}, and {self.certificate_file} does "
                f"not belong to private key {self.key_label!r}"
            )
        log.info("storing %s in the token as certificate %r", self.certificate_file, self.certificate_label)
        create_certificate(s, certificate, self.certificate_label, bytes(private_key[Attribute.ID]))

    def _sync_certificate_file(self, s: Any) -> None:
        """Make the certificate file a copy of the live certificate object (the token is authoritative)."""
        pem = self.live_certificate(s).public_bytes(serialization.Encoding.PEM)
        try:
            current = self.certificate_file.read_bytes()
        except FileNotFoundError:
            current = b""
        if current != pem:
            log.info(
                "rewriting %s from the token's certificate %r", self.certificate_file, self.certificate_label
            )
            atomic_write(self.certificate_file, pem, 0o644)


def settle(
    s: Any,
    key_label: str,
    certificate_label: str,
    new_id: bytes,
    new_certificate: x509.Certificate,
    target: RecoveryTarget,
) -> None:
    """Relabel, destroy or create objects until the token is in `target`; only changes what differs.

    Roles: a key is new if it has the prepared CKA_ID; a certificate is new if its value is the
    new certificate (a half-made or foreign-valued one with the new CKA_ID is junk); anything else
    under LABEL or LABEL.bak is the old pair; anything else under LABEL.new is junk.
    """
    new_der = new_certificate.public_bytes(serialization.Encoding.DER)
    keep_new = target in (RecoveryTarget.NEW, RecoveryTarget.NEW_WITH_BACKUP)
    old_label_suffix = {
        RecoveryTarget.OLD: "",
        RecoveryTarget.NEW_WITH_BACKUP: BACKUP_SUFFIX,
        RecoveryTarget.NEW: None,
    }[target]

    key_labels = _with_rotation_labels(key_label)
    certificate_labels = _with_rotation_labels(certificate_label)
    keys = [o for c in KEY_CLASSES for label in key_labels for o in find(s, c, label)]
    keys += [o for c in KEY_CLASSES for o in s.get_objects({Attribute.CLASS: c, Attribute.ID: new_id})]
    certs = [o for label in certificate_labels for o in find(s, ObjectClass.CERTIFICATE, label)]
    certs += list(s.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: new_id}))

    wanted: list[tuple[Any, str | None]] = []  # (object, label to have, or None to destroy)
    for obj in _unique(keys):
        if bytes(obj[Attribute.ID]) == new_id:
            wanted.append((obj, key_label if keep_new else None))
        elif str(obj[Attribute.LABEL]).endswith(NEW_SUFFIX) or old_label_suffix is None:
            wanted.append((obj, None))
        else:
            wanted.append((obj, key_label + old_label_suffix))
    kept_new_certificate = False
    for obj in _unique(certs):
        value = bytes(obj[Attribute.VALUE])
        if value == new_der:
            wanted.append((obj, certificate_label if keep_new and not kept_new_certificate else None))
            kept_new_certificate = kept_new_certificate or keep_new
        elif (
            bytes(obj[Attribute.ID]) == new_id
            or str(obj[Attribute.LABEL]).endswith(NEW_SUFFIX)
            or old_label_suffix is None
            or not _is_certificate(value)
        ):
            wanted.append((obj, None))
        else:
            wanted.append((obj, certificate_label + old_label_suffix))

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
        create_certificate(s, new_certificate, certificate_label, new_id)


def _with_rotation_labels(label: str) -> tuple[str, str, str]:
    """LABEL, LABEL.new and LABEL.bak: where the objects of one role can be during a rotation."""
    return (label, label + NEW_SUFFIX, label + BACKUP_SUFFIX)


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
