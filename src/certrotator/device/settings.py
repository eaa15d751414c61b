"""Settings every agent mode validates the same way: the key and signing algorithms. Every error names
the setting and what would be valid. Standalone (`device.toml`) and Greengrass (component configuration)
both use it, so neither mode imports the other."""

from __future__ import annotations

from certrotator import algorithms  # not certrotator.crypto: the agent loads `cryptography` lazily


class ConfigError(ValueError):
    pass


def validate_algorithms(
    key_algorithm: str, signing_algorithm: str, store: str = "file"
) -> tuple[algorithms.KeyAlgorithm, algorithms.SigningAlgorithm]:
    """keyAlgorithm / signingAlgorithm: known, of one family, and usable with the key store."""
    try:
        key = algorithms.parse_key_algorithm(key_algorithm)
        signing = algorithms.parse_signing_algorithm(signing_algorithm)
        algorithms.check_family(key, signing)
    except algorithms.CryptoError as exc:
        raise ConfigError(str(exc)) from None
    if store == "pkcs11" and key is algorithms.KeyAlgorithm.ECDSA_P521:
        raise ConfigError(
            "ECDSA-P521 cannot be used with PKCS#11: the AWS CRT cannot use P-521 token keys for TLS "
            "(awslabs/aws-c-io#591); choose ECDSA-P256 or ECDSA-P384"
        )
    return key, signing
