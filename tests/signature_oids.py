"""The X.509 signature algorithm each of our signing algorithms must produce: written out from the
standards' OIDs (not derived from the code under test), for the software and the PKCS#11 signers' tests."""

from __future__ import annotations

from cryptography.x509.oid import SignatureAlgorithmOID

from certrotator.algorithms import SigningAlgorithm

SIGNATURE_OIDS = {
    SigningAlgorithm.SHA256WITHRSA: SignatureAlgorithmOID.RSA_WITH_SHA256,
    SigningAlgorithm.SHA384WITHRSA: SignatureAlgorithmOID.RSA_WITH_SHA384,
    SigningAlgorithm.SHA512WITHRSA: SignatureAlgorithmOID.RSA_WITH_SHA512,
    SigningAlgorithm.SHA256WITHRSAANDMGF1: SignatureAlgorithmOID.RSASSA_PSS,
    SigningAlgorithm.SHA384WITHRSAANDMGF1: SignatureAlgorithmOID.RSASSA_PSS,
    SigningAlgorithm.SHA512WITHRSAANDMGF1: SignatureAlgorithmOID.RSASSA_PSS,
    SigningAlgorithm.ECDSA_WITH_SHA256: SignatureAlgorithmOID.ECDSA_WITH_SHA256,
    SigningAlgorithm.ECDSA_WITH_SHA384: SignatureAlgorithmOID.ECDSA_WITH_SHA384,
    SigningAlgorithm.ECDSA_WITH_SHA512: SignatureAlgorithmOID.ECDSA_WITH_SHA512,
}
