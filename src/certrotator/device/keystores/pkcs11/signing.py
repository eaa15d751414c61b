"""Signing with a private key that never leaves a PKCS#11 token, and proving a key by a signature.

`token_signer` chooses the token mechanism for a signature the cryptography library asks for (a CSR
signature); `signs_for` uses it to check that a token key belongs to a certificate.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import MGF, Mechanism
from pkcs11.exceptions import PKCS11Error
from pkcs11.util.ec import encode_ecdsa_signature

from certrotator import crypto
from certrotator.device.keystores.base import KeyStoreError

_PKCS1_MECHANISMS = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
_PSS_MECHANISMS = {
    "sha256": Mechanism.SHA256_RSA_PKCS_PSS,
    "sha384": Mechanism.SHA384_RSA_PKCS_PSS,
    "sha512": Mechanism.SHA512_RSA_PKCS_PSS,
}
_HASH_MECHANISMS = {"sha256": Mechanism.SHA256, "sha384": Mechanism.SHA384, "sha512": Mechanism.SHA512}
_MGFS = {"sha256": MGF.SHA256, "sha384": MGF.SHA384, "sha512": MGF.SHA512}
# DER DigestInfo prefixes (RFC 8017 §9.2, note 1), for tokens that only offer raw CKM_RSA_PKCS.
_DIGEST_INFO_PREFIXES = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def _digest(data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def _pss_mgf_hash(pss: padding.PSS, digest: hashes.HashAlgorithm) -> hashes.HashAlgorithm:
    # Like the salt length, cryptography keeps the MGF1 hash in private attributes.
    mgf: Any = getattr(pss, "_mgf", None)
    algorithm: Any = getattr(mgf, "_algorithm", None)
    return algorithm if isinstance(algorithm, hashes.HashAlgorithm) else digest


def token_signer(private_key: Any, mechanisms: frozenset[Any]) -> crypto.ExternalSign:
    """An `ExternalSign` that signs with a token private key.

    RSA uses the token's combined hash-and-sign mechanisms when `mechanisms` lists them, otherwise
    hashes on the host (CKM_RSA_PKCS with a DigestInfo, CKM_RSA_PKCS_PSS). ECDSA always hashes on the
    host and signs with plain CKM_ECDSA, which every EC token has (Debian's SoftHSM lacks
    CKM_ECDSA_SHA*), and turns the raw r‖s into the DER that X.509 wants.
    """

    def sign(data: bytes, pad: padding.AsymmetricPadding | None, algorithm: hashes.HashAlgorithm) -> bytes:
        name = algorithm.name
        if name not in _HASH_MECHANISMS:
            raise crypto.CryptoError(f"hash {name} is not supported for token signatures")
        try:
            if pad is None:
                raw = private_key.sign(_digest(data, algorithm), mechanism=Mechanism.ECDSA)
                return bytes(encode_ecdsa_signature(raw))
            if isinstance(pad, padding.PSS):
                mgf_hash = _pss_mgf_hash(pad, algorithm).name
                if mgf_hash not in _MGFS:
                    raise crypto.CryptoError(f"MGF1 hash {mgf_hash} is not supported for token signatures")
                params = (_HASH_MECHANISMS[name], _MGFS[mgf_hash], crypto.pss_salt_length(pad, algorithm))
                if _PSS_MECHANISMS[name] in mechanisms:
                    return bytes(
                        private_key.sign(data, mechanism=_PSS_MECHANISMS[name], mechanism_param=params)
                    )
                return bytes(
                    private_key.sign(
                        _digest(data, algorithm), mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=params
                    )
                )
            if isinstance(pad, padding.PKCS1v15):
                if _PKCS1_MECHANISMS[name] in mechanisms:
                    return bytes(private_key.sign(data, mechanism=_PKCS1_MECHANISMS[name]))
                digest_info = _DIGEST_INFO_PREFIXES[name] + _digest(data, algorithm)
                return bytes(private_key.sign(digest_info, mechanism=Mechanism.RSA_PKCS))
        except PKCS11Error as exc:
            raise KeyStoreError(f"the PKCS#11 token refused to sign ({exc!r})") from exc
        raise crypto.CryptoError(f"padding {pad.name} is not supported for token signatures")

    return sign


def signs_for(private_key: Any, certificate: x509.Certificate, mechanisms: frozenset[Any]) -> bool:
    """Whether the token key belongs to the certificate: proven by a signature, because an EC
    private key object does not carry its public point."""
    challenge = os.urandom(32)
    public = certificate.public_key()
    sign = token_signer(private_key, mechanisms)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            signature = sign(challenge, padding.PKCS1v15(), hashes.SHA256())
            public.verify(signature, challenge, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(sign(challenge, None, hashes.SHA256()), challenge, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except (InvalidSignature, KeyStoreError, crypto.CryptoError):
        return False
    return True
