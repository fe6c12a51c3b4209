"""Algorithm names and their fixed sizes (FIPS 203 ML-KEM, FIPS 204 ML-DSA, RFC 7748/8032).

Sizes are checked on every decode, so a key, ciphertext or signature of the wrong length is
refused with the field named before any backend sees it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KemSizes:
    public_key: int
    ciphertext: int
    shared_secret: int


@dataclass(frozen=True, slots=True)
class SigSizes:
    public_key: int
    signature: int


KEM_SIZES: dict[str, KemSizes] = {
    "ML-KEM-768": KemSizes(public_key=1184, ciphertext=1088, shared_secret=32),
    "ML-KEM-1024": KemSizes(public_key=1568, ciphertext=1568, shared_secret=32),
}

SIG_SIZES: dict[str, SigSizes] = {
    "ML-DSA-44": SigSizes(public_key=1312, signature=2420),
    "ML-DSA-65": SigSizes(public_key=1952, signature=3309),
    "ML-DSA-87": SigSizes(public_key=2592, signature=4627),
    # Classical baseline for benchmarks only; never selected by default.
    "Ed25519": SigSizes(public_key=32, signature=64),
}

PQ_SIGNATURES = ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87")
DEFAULT_KEM = "ML-KEM-768"
DEFAULT_SIGNATURE = "ML-DSA-65"

# Wire codes for signature algorithms inside certificates.
SIG_CODES: dict[str, int] = {"ML-DSA-44": 0x0904, "ML-DSA-65": 0x0905, "ML-DSA-87": 0x0906,
                             "Ed25519": 0x0807}
SIG_BY_CODE: dict[int, str] = {code: name for name, code in SIG_CODES.items()}
