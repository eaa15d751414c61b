"""What the agent needs from a credential store. Every store is crash-safe: a change of the
credentials goes through the rotation journal, and `recover()` at start-up finishes or undoes a
half-done step, so the device never ends with a certificate and key that do not belong together and
never loses its last working pair (DESIGN.md §3)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from certrotator.algorithms import KeyAlgorithm, SigningAlgorithm

if TYPE_CHECKING:
    from cryptography import x509


class KeyStoreError(RuntimeError):
    """A store operation failed; the credentials in place are unchanged (or were restored)."""


class TransientKeyStoreError(KeyStoreError):
    """A failure that may pass by itself: a token busy with another process (SoftHSM's file store gives
    CKR_GENERAL_ERROR, or shows no token at all, to a process that opens it while another one does), or
    not present yet. The agent retries these at start-up, with back-off; any other error is final."""


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
        Raises KeyStoreError (and changes nothing) if the certificate is not for the prepared key."""
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
