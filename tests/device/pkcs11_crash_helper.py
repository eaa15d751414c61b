"""Run one PKCS#11 store step in a separate process, for the power-loss tests.

    python pkcs11_crash_helper.py SPEC.json

The test sets CERTROTATOR_CRASH_AT, so the process dies with os._exit(86) at that crash point, leaving
the token, the journal and the certificate file exactly as a power cut would (no cleanup, no
finally blocks, no session close).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from certrotator.crypto import KeyAlgorithm, SigningAlgorithm
from certrotator.device.keystores.pkcs11.location import Pkcs11Config
from certrotator.device.keystores.pkcs11.store import Pkcs11KeyStore


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    config = Pkcs11Config.from_uris(
        library=spec["library"],
        private_key_uri=spec["privateKeyUri"],
        certificate_uri=spec["certificateUri"],
        user_pin=spec["userPin"],
        token_label=spec["tokenLabel"],
    )
    store = Pkcs11KeyStore(config, Path(spec["journal"]), Path(spec["certificateFile"]))
    step = spec["step"]
    if step == "prepare":
        store.prepare(
            spec["jobId"], KeyAlgorithm(spec["keyAlgorithm"]), SigningAlgorithm(spec["signingAlgorithm"])
        )
    elif step == "install":
        store.install(spec["jobId"], spec["certificate"])
    elif step == "rollback":
        store.rollback()
    elif step == "commit":
        store.commit()
    else:
        raise SystemExit(f"unknown step {step!r}")
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
