"""SoftHSM2 for simulated PKCS#11 devices, set up with SoftHSM's own tooling the way an installer
would: `softhsm2-util --init-token`, then `--import` of the device's first key.

Each simulated device gets its own SoftHSM2 configuration and token directory, as each real device
has its own HSM: SoftHSM's file store is not made for several processes opening one token directory
at once (two agents starting together on one directory can get CKR_GENERAL_ERROR from
C_GetTokenInfo). A test can still hand one `SoftHsm` to several devices to reproduce the one case
where sharing is real: the Greengrass nucleus and the component on one device use one token.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from certrotator import crypto
from certrotator.device.standalone.config import Pkcs11Settings

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
CONF_ENV = "SOFTHSM2_CONF"  # read by the library when a process initialises it
USER_PIN = "1234"
SO_PIN = "5678"


class SoftHsmError(RuntimeError):
    pass


def softhsm_available() -> str | None:
    """None if SoftHSM2 can be used here, else what is missing."""
    if not SOFTHSM_MODULE.exists():
        return f"{SOFTHSM_MODULE} is missing (apt-get install softhsm2)"
    if shutil.which("softhsm2-util") is None:
        return "softhsm2-util is missing (apt-get install softhsm2)"
    return None


@dataclass(frozen=True, slots=True)
class SoftHsm:
    """One SoftHSM2 configuration file and the token directory it names."""

    conf: Path

    @classmethod
    def create(cls, root: Path) -> SoftHsm:
        """A configuration with its own token directory under `root` (SoftHSM wants it 0700)."""
        tokens = root / "tokens"
        tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
        conf = root / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
        return cls(conf)

    @property
    def env(self) -> dict[str, str]:
        """What a process using these tokens must have in its environment."""
        return {CONF_ENV: str(self.conf)}

    def import_key(self, key: crypto.PrivateKey, label: str, scratch: Path) -> Pkcs11Settings:
        """A new token labelled `label` holding `key` (also labelled `label`); returns the device.toml
        settings that find it. `scratch` is a private directory for the moment the key is on disk."""
        pkcs8 = scratch / ".import.p8"
        # softhsm2-util imports PKCS#8 only (RSA keys are usually PKCS#1 on disk)
        scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(pkcs8, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        try:
            self.init_token(label)
            self._util(
                "--import", str(pkcs8), "--token", label, "--label", label, "--id", "01", "--pin", USER_PIN
            )
        finally:
            pkcs8.unlink(missing_ok=True)
        return Pkcs11Settings(
            library=SOFTHSM_MODULE, user_pin=USER_PIN, key_label=label, token_label=label, slot_id=None
        )

    def init_token(self, label: str) -> None:
        """A new, empty token labelled `label` in the first free slot, with USER_PIN and SO_PIN."""
        self._util("--init-token", "--free", "--label", label, "--pin", USER_PIN, "--so-pin", SO_PIN)

    def _util(self, *args: str) -> None:
        result = subprocess.run(
            ["softhsm2-util", *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise SoftHsmError(
                f"softhsm2-util {args[0]} failed: {result.stderr.strip() or result.stdout.strip()}"
            )
