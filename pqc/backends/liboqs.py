"""Optional backend: liboqs through liboqs-python.

liboqs-python tries to *download and build* liboqs on import when the C library is missing.
That must never happen on a hospital node (no outbound traffic, no surprise compilers), so we
locate the shared library ourselves first and import `oqs` only when it is already installed.
"""

from __future__ import annotations

import ctypes.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqfed.pqc.errors import BackendUnavailable, InvalidSignature, UnsupportedAlgorithm

KEM_ALGORITHMS = ("ML-KEM-768", "ML-KEM-1024")
SIG_ALGORITHMS = ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87")


def find_liboqs() -> Path | None:
    """Where liboqs-python would load liboqs from, without triggering its auto-installer."""
    root = Path(os.environ.get("OQS_INSTALL_PATH", Path.home() / "_oqs"))
    for candidate in (root / "lib" / "liboqs.so", root / "lib64" / "liboqs.so"):
        if candidate.exists():
            return candidate
    found = ctypes.util.find_library("oqs")
    return Path(found) if found else None


def _import_oqs() -> Any:
    library = find_liboqs()
    if library is None:
        raise BackendUnavailable(
            "liboqs",
            "the liboqs C library is not installed (looked in $OQS_INSTALL_PATH/lib, ~/_oqs/lib "
            "and the system linker path); build liboqs >= 0.14 with -DBUILD_SHARED_LIBS=ON and "
            "set OQS_INSTALL_PATH, or use the default backend 'pyca'",
        )
    try:
        import oqs
    except ImportError as exc:
        raise BackendUnavailable(
            "liboqs", f"liboqs-python is not installed ({exc}); pip install 'pqfed[oqs]'"
        ) from exc
    return oqs


@dataclass(slots=True)
class OqsKemKey:
    algorithm: str
    _kem: Any
    _public: bytes

    def public_bytes(self) -> bytes:
        return self._public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        return bytes(self._kem.decap_secret(ciphertext))


@dataclass(slots=True)
class OqsSigKey:
    algorithm: str
    _sig: Any
    _public: bytes

    def public_bytes(self) -> bytes:
        return self._public

    def private_bytes(self) -> bytes:
        return bytes(self._sig.export_secret_key())

    def sign(self, message: bytes, context: bytes = b"") -> bytes:
        if context:
            return bytes(self._sig.sign_with_ctx_str(message, context))
        return bytes(self._sig.sign(message))


class LiboqsBackend:
    """liboqs (Open Quantum Safe). Interoperates with pyca on public keys, ciphertexts and
    signatures (both implement FIPS 203/204); private key formats differ (liboqs exports the
    expanded key, pyca the seed)."""

    name = "liboqs"
    kem_algorithms = KEM_ALGORITHMS
    sig_algorithms = SIG_ALGORITHMS

    def __init__(self) -> None:
        self._oqs = _import_oqs()

    def _check(self, algorithm: str, supported: tuple[str, ...]) -> None:
        if algorithm not in supported:
            raise UnsupportedAlgorithm(algorithm, supported)

    def kem_generate(self, algorithm: str) -> OqsKemKey:
        self._check(algorithm, KEM_ALGORITHMS)
        kem = self._oqs.KeyEncapsulation(algorithm)
        public = bytes(kem.generate_keypair())
        return OqsKemKey(algorithm, kem, public)

    def kem_encapsulate(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]:
        self._check(algorithm, KEM_ALGORITHMS)
        with self._oqs.KeyEncapsulation(algorithm) as kem:
            ciphertext, shared = kem.encap_secret(public_key)
        return bytes(ciphertext), bytes(shared)

    def sig_generate(self, algorithm: str) -> OqsSigKey:
        self._check(algorithm, SIG_ALGORITHMS)
        sig = self._oqs.Signature(algorithm)
        public = bytes(sig.generate_keypair())
        return OqsSigKey(algorithm, sig, public)

    def sig_load_private(self, algorithm: str, data: bytes) -> OqsSigKey:
        raise UnsupportedAlgorithm(
            f"{algorithm} private-key import", ("generate keys with the liboqs backend",)
        )

    def sig_verify(
        self, algorithm: str, public_key: bytes, message: bytes, signature: bytes,
        context: bytes = b"",
    ) -> None:
        self._check(algorithm, SIG_ALGORITHMS)
        with self._oqs.Signature(algorithm) as sig:
            ok = (
                sig.verify_with_ctx_str(message, signature, context, public_key)
                if context
                else sig.verify(message, signature, public_key)
            )
        if not ok:
            raise InvalidSignature(f"{algorithm} signature does not verify (liboqs)")
