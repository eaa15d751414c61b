"""The PKCS#11 token that holds the device key: its library, one logged-in session with a lock for
exclusive use, and the object lookups and creations the key store is built from.

PKCS#11 login state is per process, and closing a logged-in session logs out every session of the
process, the AWS CRT's TLS sessions included: so one session is kept open until `close()`, and
reopened only when it has died.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, CertificateType, KeyType, MechanismFlag, ObjectClass
from pkcs11.exceptions import (
    DeviceError,
    DeviceMemory,
    DeviceRemoved,
    FunctionFailed,
    FunctionNotSupported,
    GeneralError,
    HostMemory,
    NoSuchToken,
    PKCS11Error,
    RandomNoRNG,
    SessionClosed,
    SessionCount,
    SessionHandleInvalid,
    TokenNotPresent,
    TokenNotRecognised,
    UserAlreadyLoggedIn,
    UserPinNotInitialized,
)
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from certrotator import crypto
from certrotator.device.keystores.base import KeyStoreError, TransientKeyStoreError
from certrotator.device.keystores.pkcs11.location import Pkcs11Config

if sys.platform == "win32":
    import msvcrt

    def _lock_file(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)

else:
    import fcntl

    def _lock_file(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)


KEY_CLASSES = (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)

# Errors a token or its library may report while busy, short of memory or (re)plugged: they may pass by
# themselves. Measured with SoftHSM2's file store: processes opening one token directory together get
# CKR_GENERAL_ERROR, no token at all, or CKR_USER_PIN_NOT_INITIALIZED (the token's flags read while
# another process rewrites them). A missing object or a refused mechanism do not pass, and a wrong PIN
# is never tried again: tokens lock the user PIN after a few wrong tries.
TRANSIENT_ERRORS: tuple[type[PKCS11Error], ...] = (
    GeneralError,
    DeviceError,
    DeviceMemory,
    DeviceRemoved,
    FunctionFailed,
    HostMemory,
    NoSuchToken,
    SessionClosed,
    SessionCount,
    SessionHandleInvalid,
    TokenNotPresent,
    TokenNotRecognised,
    UserPinNotInitialized,
)


def token_error(message: str, exc: PKCS11Error) -> KeyStoreError:
    """The KeyStoreError for a PKCS#11 error: transient or not, as TRANSIENT_ERRORS says."""
    kind = TransientKeyStoreError if isinstance(exc, TRANSIENT_ERRORS) else KeyStoreError
    return kind(message)


class Pkcs11Token:
    """The configured token and a logged-in read-write session on it (see the module docstring).

    Use the session only inside `locked()`; `lock_path` is the lock file that keeps other processes out.
    """

    def __init__(self, config: Pkcs11Config, key_labels: Sequence[str], lock_path: Path) -> None:
        self.config = config
        # A session that sees no private key under any of these labels has lost its login.
        self.key_labels = tuple(key_labels)
        self.mechanisms: frozenset[Any] = frozenset()
        self._session: Any = None
        self._lock_path = lock_path
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        # Set when finding or opening the token failed in a way that may pass: SoftHSM keeps the view of
        # its token directory it took at C_Initialize, so only a re-initialised library sees it again.
        self.needs_reinitialize = False
        # Initialise the library now, before an AWS CRT Pkcs11Lib of this process does: python-pkcs11
        # refuses a library that is already initialised, while the CRT's DEFAULT behaviour accepts it.
        self._library()

    def session(self) -> Any:
        """The open session if it still works (and is still logged in), else a new one."""
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

    def reinitialize(self) -> None:
        """C_Finalize + C_Initialize: a fresh view of the tokens. Every session of this process dies with
        it, the AWS CRT's too, so only before the first connection (start-up recovery)."""
        with self._thread_lock:
            self.close()
            try:
                self._library().reinitialize()
            except PKCS11Error as exc:
                raise token_error(f"re-initialising {self.config.library} failed: {exc!r}", exc) from exc
            self.needs_reinitialize = False

    def close(self) -> None:
        with self._thread_lock:
            session, self._session = self._session, None
            if session is not None:
                with contextlib.suppress(PKCS11Error):  # already gone (library re-initialised, logged out)
                    session.close()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Thread lock plus an exclusive lock file (next to the journal), so that neither two threads
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

    def _open_session(self) -> Any:
        token = self._find_token(self._library())
        try:
            session = token.open(rw=True, user_pin=self.config.user_pin)
        except UserAlreadyLoggedIn:
            # Another session of this process (the AWS CRT's) holds the login; a session without a
            # login of its own shares it, and closing it later does not log the CRT out. (python-pkcs11
            # does not close the session whose C_Login failed: one handle leaks, once.)
            session = token.open(rw=True)
        self.mechanisms = frozenset(token.slot.get_mechanisms())
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
        if not tokens:
            # Not plugged in yet, or hidden from this process while another one had the store open.
            raise TransientKeyStoreError(f"PKCS#11 library {self.config.library} has no {what}")
        if len(tokens) != 1:
            raise KeyStoreError(f"PKCS#11 library {self.config.library} has {len(tokens)} {what}")
        return tokens[0]

    def _private_keys_visible(self, s: Any) -> bool:
        return any(find(s, ObjectClass.PRIVATE_KEY, label) for label in self.key_labels)


# ------------------------------------------------------------------------------------------ objects


def find(s: Any, object_class: ObjectClass, label: str, key_id: bytes | None = None) -> list[Any]:
    """The objects of a class under a label (and with a CKA_ID, when given) in session `s`."""
    template: dict[Attribute, Any] = {Attribute.CLASS: object_class, Attribute.LABEL: label}
    if key_id is not None:
        template[Attribute.ID] = key_id
    return list(s.get_objects(template))  # drained: a pending search blocks other calls


def find_one(s: Any, object_class: ObjectClass, label: str, key_id: bytes | None = None) -> Any:
    """Like `find`, for an object that must exist exactly once; KeyStoreError otherwise."""
    found = find(s, object_class, label, key_id)
    if len(found) != 1:
        kind = {ObjectClass.PRIVATE_KEY: "private key", ObjectClass.PUBLIC_KEY: "public key"}.get(
            object_class, "certificate"
        )
        raise KeyStoreError(f"the token holds {len(found)} {kind} objects labelled {label!r}; expected one")
    return found[0]


def generate_key_pair(s: Any, algorithm: crypto.KeyAlgorithm, label: str, key_id: bytes) -> tuple[Any, Any]:
    """A new (public, private) key pair in the token; the private key cannot leave it or be copied."""
    common: dict[str, Any] = {
        "id": key_id,
        "label": label,
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


def create_certificate(s: Any, certificate: x509.Certificate, label: str, key_id: bytes) -> Any:
    """A token certificate object holding `certificate`, with the CKA_ID of its key."""
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
            Attribute.LABEL: label,
            Attribute.ID: key_id,
            Attribute.SUBJECT: certificate.subject.public_bytes(),
            Attribute.ISSUER: certificate.issuer.public_bytes(),
            Attribute.SERIAL_NUMBER: serial_der,
            Attribute.VALUE: certificate.public_bytes(serialization.Encoding.DER),
        }
    )


def public_key_of(public_object: Any) -> crypto.PublicKey:
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


def _int_bytes(value: int) -> bytes:
    """Minimal two's-complement big-endian bytes of a non-negative INTEGER (DER content)."""
    return value.to_bytes(value.bit_length() // 8 + 1, "big")


def _der_length(content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([n])
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(size)]) + size
