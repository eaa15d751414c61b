"""Provisioning writes the whole device.toml from its request: what the standalone agent then loads is
what was asked for (file or PKCS#11 key, state timeout, algorithms), and the first certificate has
the asked validity."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from certrotator import crypto
from certrotator.device.standalone.config import Pkcs11Settings, load_device_config
from certrotator.local.ca import IssuerName, LocalCa, ensure_local_ca
from certrotator.local.db import Database
from certrotator.local.provision import (
    CERT_FILE,
    CONFIG_FILE,
    KEY_FILE,
    ProvisionRequest,
    provision,
    provision_thing,
)
from certrotator.local.registry import LocalRegistry


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[LocalRegistry, LocalCa]]:
    db = Database(tmp_path / "data")
    try:
        yield LocalRegistry(db), ensure_local_ca(tmp_path / "data")
    finally:
        db.close()


def test_file_device_config_round_trips_through_the_agents_loader(
    stores: tuple[LocalRegistry, LocalCa], tmp_path: Path
) -> None:
    registry, ca = stores
    request = ProvisionRequest(
        "dev:1_a-b",
        tmp_path / "dev",
        group="g",
        key_algorithm=crypto.KeyAlgorithm.RSA_3072,
        signing_algorithm=crypto.SigningAlgorithm.SHA384WITHRSAANDMGF1,
        state_timeout_s=2.5,
    )
    done = provision(registry, ca, request, host="127.0.0.1", port=18883)

    config = load_device_config(tmp_path / "dev" / CONFIG_FILE)
    assert (config.thing_name, config.endpoint, config.port) == (request.thing, "127.0.0.1", 18883)
    assert (config.key_algorithm, config.signing_algorithm) == (
        crypto.KeyAlgorithm.RSA_3072,
        crypto.SigningAlgorithm.SHA384WITHRSAANDMGF1,
    )
    assert config.state_timeout_s == 2.5
    assert config.store == "file" and config.private_key == tmp_path / "dev" / KEY_FILE
    assert crypto.certificate_matches_key(
        config.certificate.read_text(), crypto.load_private_key(config.private_key.read_bytes())
    )
    assert registry.thing_principals(request.thing) == [done.certificate_id]
    assert registry.group_members("g") == [request.thing]


def test_pkcs11_device_gets_a_token_section_and_no_key_file(
    stores: tuple[LocalRegistry, LocalCa], tmp_path: Path
) -> None:
    registry, ca = stores
    key = crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P384)
    token = Pkcs11Settings(
        library=Path('/opt/odd "hsm" \\dir/lib.so'),
        user_pin='0"0',
        key_label="dev-key",
        token_label="dev",
        slot_id=None,
    )
    request = ProvisionRequest(
        "hsm-dev",
        tmp_path / "hsm",
        key_algorithm=crypto.KeyAlgorithm.ECDSA_P384,
        pkcs11=token,
        public_key=key.public_key(),
    )
    provision(registry, ca, request)

    config = load_device_config(tmp_path / "hsm" / CONFIG_FILE)
    assert config.store == "pkcs11" and config.private_key is None
    assert config.pkcs11 == token
    assert not (tmp_path / "hsm" / KEY_FILE).exists()
    # the certificate is for the token's key
    assert crypto.certificate_matches_key((tmp_path / "hsm" / CERT_FILE).read_text(), key)
    assert config.signing_algorithm is crypto.SigningAlgorithm.ECDSA_WITH_SHA256


def test_validity_days_sets_the_first_certificates_lifetime(
    stores: tuple[LocalRegistry, LocalCa], tmp_path: Path
) -> None:
    registry, ca = stores
    for issuer in IssuerName:
        out = tmp_path / issuer.value
        provision_thing(registry, ca, f"short-{issuer.value}", out, issuer=issuer, validity_days=10)
        cert = crypto.load_certificate((out / CERT_FILE).read_bytes())
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=10)
        assert cert.issuer == ca.issuer(issuer).certificate.subject


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"validity_days": 0}, "at least 1 day"),
        ({"state_timeout_s": 0.0}, "state timeout must be positive"),
        ({"state_timeout_s": float("nan")}, "state timeout must be positive"),
        ({"pkcs11": "token"}, "needs the public key"),
        ({"public_key": "p256"}, "only for a key kept in a PKCS#11 token"),
        ({"pkcs11": "token", "public_key": "p384"}, "the token's key is ECDSA-P384, not ECDSA-P256"),
        ({"signing_algorithm": crypto.SigningAlgorithm.SHA256WITHRSA}, "does not match"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_registered(
    stores: tuple[LocalRegistry, LocalCa], tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    registry, ca = stores
    token = Pkcs11Settings(Path("/lib.so"), "1", "k", "t", None)
    keys = {
        "p256": crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P256).public_key(),
        "p384": crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P384).public_key(),
    }
    values = {
        k: token if v == "token" else keys.get(v, v) if isinstance(v, str) else v for k, v in changes.items()
    }
    request = ProvisionRequest("bad", tmp_path / "bad", **values)  # type: ignore[arg-type]
    with pytest.raises((ValueError, crypto.CryptoError), match=message):
        provision(registry, ca, request)
    assert not registry.thing_exists("bad")
    assert not (tmp_path / "bad").exists()
