"""SoftHSM2 tokens for simulated PKCS#11 devices, set up with SoftHSM's own tooling the way an
installer would: `softhsm2-util --init-token`, then `--import` of the device's first key."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from certrotator import crypto
from certrotator.local.provision import CONFIG_FILE, KEY_FILE

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
CONF_ENV = "SOFTHSM2_CONF"
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


def softhsm_config(root: Path) -> Path:
    """A SoftHSM2 configuration with its own token directory under `root` (SoftHSM wants it 0700)."""
    tokens = root / "softhsm-tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return conf


def _util(conf: Path, *args: str) -> None:
    result = subprocess.run(
        ["softhsm2-util", *args],
        env={**os.environ, CONF_ENV: str(conf)},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SoftHsmError(
            f"softhsm2-util {args[0]} failed: {result.stderr.strip() or result.stdout.strip()}"
        )


def move_key_into_token(conf: Path, device_dir: Path, token_label: str) -> None:
    """Turn a provisioned credentials directory into a PKCS#11 one: a fresh token holding the key
    (the key file is deleted) and a device.toml that names the token instead of the file."""
    key_path = device_dir / KEY_FILE
    key = crypto.load_private_key(key_path.read_bytes())
    pkcs8 = device_dir / ".import.p8"
    # softhsm2-util imports PKCS#8 only; RSA keys are written PKCS#1 on disk, so re-encode
    pkcs8.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(pkcs8, 0o600)
    try:
        _util(conf, "--init-token", "--free", "--label", token_label, "--pin", USER_PIN, "--so-pin", SO_PIN)
        _util(
            conf,
            "--import",
            str(pkcs8),
            "--token",
            token_label,
            "--label",
            token_label,
            "--id",
            "01",
            "--pin",
            USER_PIN,
        )
    finally:
        pkcs8.unlink(missing_ok=True)
    key_path.unlink()
    toml = device_dir / CONFIG_FILE
    text = toml.read_text()
    file_section = (
        f'[credentials]\nstore = "file"\ncertificate = "device.pem.crt"\nprivate_key = "{KEY_FILE}"\n'
    )
    if file_section not in text:
        raise SoftHsmError(f"{toml} does not have the provisioned file credentials section")
    token_section = (
        "[credentials]\n"
        'store = "pkcs11"\n'
        f'library = "{SOFTHSM_MODULE}"\n'
        f'token_label = "{token_label}"\n'
        f'user_pin = "{USER_PIN}"\n'
        f'key_label = "{token_label}"\n'
        'certificate = "device.pem.crt"\n'
    )
    toml.write_text(text.replace(file_section, token_section))
