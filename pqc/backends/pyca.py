"""Default backend: pyca/cryptography (OpenSSL's FIPS 203/204 implementations).

pyca releases the GIL for ML-DSA sign/verify but holds it for ML-KEM; the crypto pool in
`pqfed.pqc.pool` decides threads vs processes from that (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature as _PycaInvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem

from pqfed.pqc.errors import InvalidSignature, UnsupportedAlgorithm

_KEM: dict[str, tuple[Any, Any]] = {
    "ML-KEM-768": (mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey),
    "ML-KEM-1024": (mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey),
}
_SIG: dict[str, tuple[Any, Any]] = {
    "ML-DSA-44": (mldsa.MLDSA44PrivateKey, mldsa.MLDSA44PublicKey),
    "ML-DSA-65": (mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey),
    "ML-DSA-87": (mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey),
}


@dataclass(frozen=True, slots=True)
class PycaKemKey:
    algorithm: str
    _key: Any

    def public_bytes(self) -> bytes:
        return bytes(self._key.public_key().public_bytes_raw())

    def decapsulate(self, ciphertext: bytes) -> bytes:
        return bytes(self._key.decapsulate(ciphertext))


@dataclass(frozen=True, slots=True)
class PycaSigKey:
    algorithm: str
    _key: Any

    def public_bytes(self) -> bytes:
        return bytes(self._key.public_key().public_bytes_raw())

    def private_bytes(self) -> bytes:
        return bytes(self._key.private_bytes_raw())

    def sign(self, message: bytes, context: bytes = b"") -> bytes:
        if self.algorithm == "Ed25519":
            # Ed25519 has no context input; bind it into the message (RFC 8032 pure mode).
            return bytes(self._key.sign(context + message))
        return bytes(self._key.sign(message, context) if context else self._key.sign(message))


@functools.lru_cache(maxsize=1024)
def _public_key(algorithm: str, data: bytes) -> Any:
    """Parsed public keys, cached: an aggregator verifies the same few hundred peer keys
    every round, and parsing an ML-DSA key costs as much as 5% of a verification."""
    if algorithm == "Ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    if algorithm in _SIG:
        return _SIG[algorithm][1].from_public_bytes(data)
    return _KEM[algorithm][1].from_public_bytes(data)


class PycaBackend:
    """pyca/cryptography >= 50 (bundled OpenSSL with ML-KEM and ML-DSA)."""

    name = "pyca"
    kem_algorithms: tuple[str, ...] = tuple(_KEM)
    sig_algorithms: tuple[str, ...] = (*_SIG, "Ed25519")

    def _kem(self, algorithm: str) -> tuple[Any, Any]:
        try:
            return _KEM[algorithm]
        except KeyError:
            raise UnsupportedAlgorithm(algorithm, self.kem_algorithms) from None

    def _sig_private(self, algorithm: str) -> Any:
        if algorithm == "Ed25519":
            return ed25519.Ed25519PrivateKey
        try:
            return _SIG[algorithm][0]
        except KeyError:
            raise UnsupportedAlgorithm(algorithm, self.sig_algorithms) from None

    def kem_generate(self, algorithm: str) -> PycaKemKey:
        return PycaKemKey(algorithm, self._kem(algorithm)[0].generate())

    def kem_encapsulate(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]:
        self._kem(algorithm)
        pub = _public_key(algorithm, bytes(public_key))
        shared, ciphertext = pub.encapsulate()
        return bytes(ciphertext), bytes(shared)

    def sig_generate(self, algorithm: str) -> PycaSigKey:
        return PycaSigKey(algorithm, self._sig_private(algorithm).generate())

    def sig_load_private(self, algorithm: str, data: bytes) -> PycaSigKey:
        cls = self._sig_private(algorithm)
        load: Callable[[bytes], Any] = (
            cls.from_private_bytes if algorithm == "Ed25519" else cls.from_seed_bytes
        )
        return PycaSigKey(algorithm, load(data))

    def sig_verify(
        self, algorithm: str, public_key: bytes, message: bytes, signature: bytes,
        context: bytes = b"",
    ) -> None:
        try:
            if algorithm != "Ed25519" and algorithm not in _SIG:
                raise UnsupportedAlgorithm(algorithm, self.sig_algorithms)
            pub = _public_key(algorithm, bytes(public_key))
            if algorithm == "Ed25519":
                pub.verify(signature, context + message)
            elif context:
                pub.verify(signature, message, context)
            else:
                pub.verify(signature, message)
        except _PycaInvalidSignature:
            raise InvalidSignature(f"{algorithm} signature does not verify") from None
        except ValueError as exc:  # malformed public key bytes
            raise InvalidSignature(f"{algorithm} public key rejected: {exc}") from None
