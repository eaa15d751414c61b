"""Credentials as files (certificateFilePath / privateKeyPath), crash-safe.

Invariant at every instruction: either (cert, key) or (cert.bak, key.bak) is a matching pair, and
the journal names the phase, so `recover()` knows which one to keep:

    phase      on disk                                        recover()
    -------    ---------------------------------------------  --------------------------------------
    install    .bak being linked to the old pair, then the    move the .bak files back (undo; a .bak
               new pair staged and renamed into place         that is a link to the file in place
                                                              changes nothing), drop staged files
    installed  new pair in place, .bak = the old pair         nothing: the agent tries the new pair
    rollback   .bak being moved back                          finish moving the remaining .bak files
    commit     .bak being deleted                             finish deleting
    backup     (written by earlier versions, which copied     drop the partial .bak files
               the old pair)

The new key is generated in memory and written only once its certificate has arrived, matches it and
is within its validity (`base.check_validity`).

PERF, and flash wear on a real device: the old pair is kept as a second name (a hard link) rather
than a copy, and the files that change together share one directory fsync. Install + commit cost
12 fsyncs instead of 19; every fsync that orders one step before the next is kept.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from certrotator.device.journal import Journal, crash_point
from certrotator.device.keystores.base import KeyStoreError, check_validity
from certrotator.fsutil import fsync_dirs, publish, remove_all, remove_stale_temps, second_name, stage

if TYPE_CHECKING:
    from cryptography import x509

    from certrotator import crypto

# `certrotator.crypto` (and with it `cryptography`, ~18 MB) is imported by the methods that need it:
# an agent waiting for a job never does, so its idle footprint stays small.

CRASH_POINTS = (
    "files.install.journaled",
    "files.install.key_backed_up",
    "files.install.backed_up",
    "files.install.staged",
    "files.install.key_written",
    "files.install.cert_written",
    "files.install.installed",
    "files.rollback.journaled",
    "files.rollback.key_restored",
    "files.rollback.cert_restored",
    "files.commit.journaled",
    "files.commit.key_backup_deleted",
    "files.commit.cert_backup_deleted",
)


class FileKeyStore:
    def __init__(self, certificate_path: Path, key_path: Path, journal_path: Path) -> None:
        self.cert = certificate_path
        self.key = key_path
        self.cert_bak = certificate_path.with_name(certificate_path.name + ".bak")
        self.key_bak = key_path.with_name(key_path.name + ".bak")
        self.journal = Journal(journal_path)
        self._prepared: tuple[str, crypto.PrivateKey] | None = None

    # ------------------------------------------------------------------------------ inspection

    def current_certificate(self) -> x509.Certificate:
        from certrotator import crypto

        try:
            return crypto.load_certificate(self.cert.read_bytes())
        except (OSError, crypto.CryptoError) as exc:
            raise KeyStoreError(f"cannot read the device certificate {self.cert}: {exc}") from None

    def has_backup(self) -> bool:
        return self.cert_bak.exists() and self.key_bak.exists()

    def pair_matches(self) -> bool:
        """Whether the certificate and key in place belong together."""
        from certrotator import crypto

        try:
            key = crypto.load_private_key(self.key.read_bytes())
            return crypto.certificate_matches_key(self.current_certificate(), key)
        except (OSError, crypto.CryptoError, KeyStoreError):
            return False

    # -------------------------------------------------------------------------------- recovery

    def recover(self) -> None:
        entry = self.journal.read()
        if entry is None:
            return
        if entry.phase == "backup":
            remove_all([self.key_bak, self.cert_bak])
        elif entry.phase in ("install", "rollback"):
            self._restore_backup()
            for path in (self.key, self.cert):
                remove_stale_temps(path)
        elif entry.phase == "commit":
            remove_all([self.key_bak, self.cert_bak])
        elif entry.phase == "installed":
            return  # the state machine decides: commit or roll back
        else:  # only this class writes the journal: keep it (and the files) for a human to inspect
            raise KeyStoreError(f"rotation journal {self.journal.path} has an unknown phase {entry.phase!r}")
        self.journal.clear()

    def _restore_backup(self) -> None:
        # Idempotent: a .bak that is gone has already been moved back. Durable (one fsync) before the
        # caller clears the journal; until then a power cut only means moving them again.
        self._restore(self.key_bak, self.key)
        crash_point("files.rollback.key_restored")
        self._restore(self.cert_bak, self.cert)
        crash_point("files.rollback.cert_restored")
        fsync_dirs([self.key, self.cert])

    @staticmethod
    def _restore(backup: Path, path: Path) -> None:
        if not backup.exists():
            return
        if path.exists() and backup.samefile(path):
            # Linked before the new file was put in place: nothing to restore. (rename() between two
            # names of one file does nothing at all, so the link must go by itself.)
            backup.unlink()
        else:
            os.replace(backup, path)  # not publish(): a failed rename must keep the backup

    # ---------------------------------------------------------------------------------- rotate

    def prepare(
        self, job_id: str, key_algorithm: crypto.KeyAlgorithm, signing_algorithm: crypto.SigningAlgorithm
    ) -> str:
        from certrotator import crypto

        crypto.check_family(key_algorithm, signing_algorithm)
        key = crypto.generate_private_key(key_algorithm)
        csr = crypto.build_csr(key, signing_algorithm, self.current_certificate().subject)
        self._prepared = (job_id, key)
        return csr

    def discard_prepared(self) -> None:
        self._prepared = None

    def install(self, job_id: str, certificate_pem: str) -> None:
        from certrotator import crypto

        if self._prepared is None or self._prepared[0] != job_id:
            raise KeyStoreError(f"no key was prepared for job {job_id!r} (the agent restarted since)")
        key = self._prepared[1]
        try:
            certificate = crypto.load_certificate(certificate_pem)
        except crypto.CryptoError as exc:
            raise KeyStoreError(f"the new certificate is unusable: {exc}") from None
        if not crypto.certificate_matches_key(certificate, key):
            raise KeyStoreError("the new certificate is not for the key this device generated")
        check_validity(certificate)  # the broker would refuse it: fail the job with its dates instead
        if self.journal.read() is not None or self.has_backup():
            raise KeyStoreError("a previous rotation is still pending (backup present); not installing")
        key_pem, cert_pem = crypto.private_key_pem(key), crypto.certificate_pem(certificate).encode()
        for stale in (self.key_bak, self.cert_bak):  # a lone .bak, with no journal, backs up nothing
            stale.unlink(missing_ok=True)

        self.journal.write(job_id, "install")
        crash_point("files.install.journaled")
        second_name(self.key, self.key_bak)
        crash_point("files.install.key_backed_up")
        second_name(self.cert, self.cert_bak)
        crash_point("files.install.backed_up")
        staged_key, staged_cert = stage(self.key, key_pem, 0o600), stage(self.cert, cert_pem, 0o644)
        # The backups must be durable before the old pair loses its own names.
        fsync_dirs([self.key, self.cert])
        crash_point("files.install.staged")
        publish(staged_key, self.key)
        crash_point("files.install.key_written")
        publish(staged_cert, self.cert)
        crash_point("files.install.cert_written")
        fsync_dirs([self.key, self.cert])  # the new pair is in place before the journal says so
        self.journal.write(job_id, "installed")
        crash_point("files.install.installed")
        self._prepared = None

    def rollback(self) -> None:
        if not self.has_backup() and self.journal.read() is None:
            return
        entry = self.journal.read()
        self.journal.write(entry.job_id if entry else "", "rollback")
        crash_point("files.rollback.journaled")
        self._restore_backup()
        self.journal.clear()

    def commit(self) -> None:
        if not self.has_backup():
            return
        entry = self.journal.read()
        self.journal.write(entry.job_id if entry else "", "commit")
        crash_point("files.commit.journaled")
        self.key_bak.unlink(missing_ok=True)
        crash_point("files.commit.key_backup_deleted")
        self.cert_bak.unlink(missing_ok=True)
        crash_point("files.commit.cert_backup_deleted")
        fsync_dirs([self.key_bak, self.cert_bak])  # gone for good before the journal stops saying so
        self.journal.clear()
