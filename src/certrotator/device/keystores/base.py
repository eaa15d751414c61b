"""What the agent needs from a credential store. Every store is crash-safe: a change of the
credentials goes through the rotation journal, and `recover()` at start-up finishes or undoes a
half-done step, so the device never ends with a certificate and key that do not belong together and
never loses its last working pair (DESIGN.md §3)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Final, Protocol

from certrotator.algorithms import KeyAlgorithm, SigningAlgorithm
from certrotator.compat import UTC

if TYPE_CHECKING:
    from cryptography import x509


class KeyStoreError(RuntimeError):
    """A store operation failed; the credentials in place are unchanged (or were restored)."""


class TransientKeyStoreError(KeyStoreError):
    """A failure that may pass by itself: a token busy with another process (SoftHSM's file store gives
    CKR_GENERAL_ERROR, or shows no token at all, to a process that opens it while another one does), or
    not present yet. The agent retries these at start-up, with back-off; any other error is final."""


# How far a new certificate's notBefore may lie ahead of this device's clock. The broker, not the device,
# is the judge of time: a device whose clock runs behind would refuse a certificate the broker accepts, and
# refusing costs the rotation, while installing one the broker refuses only costs a rollback. So the margin
# is AWS Private CA's own (it backdates notBefore by 60 minutes by default for clock differences); AWS IoT
# documents no backdating for CreateCertificateFromCsr. docs/decisions.md has the sources.
NOT_BEFORE_ALLOWANCE: Final = dt.timedelta(hours=1)


def _utc(moment: dt.datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def validity_problem(
    not_before: dt.datetime,
    not_after: dt.datetime,
    now: dt.datetime,
    allowance: dt.timedelta = NOT_BEFORE_ALLOWANCE,
) -> str | None:
    """Why a certificate valid from `not_before` to `not_after` must not be installed at `now` (all aware),
    or None. Expiry gets no allowance: a certificate that ends within the skew is not worth installing."""
    if not_after < now:
        return (
            f"the new certificate is no longer valid: its notAfter {_utc(not_after)} is before this "
            f"device's clock {_utc(now)}"
        )
    if not_before > now + allowance:
        minutes = int(allowance.total_seconds() // 60)
        return (
            f"the new certificate is not valid yet: its notBefore {_utc(not_before)} is after this device's "
            f"clock {_utc(now)} by more than the {minutes} min allowed for clock skew"
        )
    return None


def check_validity(certificate: x509.Certificate, now: dt.datetime | None = None) -> None:
    """Refuse (KeyStoreError) a new certificate outside its validity, before a store changes anything:
    the broker would refuse it, and the job should fail with the dates rather than a failed reconnect."""
    problem = validity_problem(
        certificate.not_valid_before_utc, certificate.not_valid_after_utc, now or dt.datetime.now(UTC)
    )
    if problem is not None:
        raise KeyStoreError(f"{problem}; nothing changed")


class KeyStore(Protocol):
    def recover(self) -> None:
        """At start-up: complete or undo whatever step the journal shows was interrupted."""
        ...

    def current_certificate(self) -> x509.Certificate:
        """The certificate the device connects with now."""
        ...

    def has_backup(self) -> bool:
        """True while new credentials are installed and the previous pair is kept for rollback."""
        ...

    def prepare(self, job_id: str, key_algorithm: KeyAlgorithm, signing_algorithm: SigningAlgorithm) -> str:
        """Generate a new key pair (kept aside, not in use) and return a PEM CSR for it, signed with
        `signing_algorithm`, with the current certificate's subject."""
        ...

    def install(self, job_id: str, certificate_pem: str) -> None:
        """Back up the current pair, then install the prepared key with this certificate.
        Raises KeyStoreError (and changes nothing) if the certificate is not for the prepared key or is
        outside its validity (`check_validity`)."""
        ...

    def rollback(self) -> None:
        """Restore the backed-up pair and drop the new one. No-op without a backup."""
        ...

    def commit(self) -> None:
        """Keep the new pair: delete the backup. No-op without a backup."""
        ...

    def discard_prepared(self) -> None:
        """Forget a prepared key that will not be installed (create rejected or timed out)."""
        ...
