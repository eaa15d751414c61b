"""What a report adds to the policy's facts: a certificate's issuer and key algorithm, read from its PEM
(`cryptography` loads only when a report asks)."""

from __future__ import annotations


def certificate_details(pem: str) -> tuple[str, str]:
    """(issuer, key algorithm) of a PEM certificate: the issuer's CN (its whole DN if it has none)
    and the key algorithm's table name ("ECDSA-P256", ...; the key type's name otherwise)."""
    from cryptography.x509.oid import NameOID

    from certrotator import crypto

    try:
        cert = crypto.load_certificate(pem)
    except crypto.CryptoError:
        return "?", "?"
    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer = str(names[0].value) if names else cert.issuer.rfc4514_string()
    key = cert.public_key()
    algorithm = crypto.key_algorithm_of(key)
    return issuer, algorithm.value if algorithm else type(key).__name__
