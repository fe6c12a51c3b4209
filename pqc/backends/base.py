"""The one interface every PQC backend implements (pyca/cryptography, liboqs)."""

from __future__ import annotations

from typing import Protocol


class KemPrivateKey(Protocol):
    """A decapsulation key. Never leaves the process except through `private_bytes`."""

    @property
    def algorithm(self) -> str: ...

    def public_bytes(self) -> bytes: ...

    def decapsulate(self, ciphertext: bytes) -> bytes: ...


class SigPrivateKey(Protocol):
    """A signing key; `private_bytes` is the backend's own export (a seed for pyca)."""

    @property
    def algorithm(self) -> str: ...

    def public_bytes(self) -> bytes: ...

    def private_bytes(self) -> bytes: ...

    def sign(self, message: bytes, context: bytes = b"") -> bytes: ...


class Backend(Protocol):
    """Post-quantum primitives behind one small, bytes-in/bytes-out API.

    `sig_verify` raises `pqfed.pqc.errors.InvalidSignature`; it never returns False.
    `kem_encapsulate` returns (ciphertext, shared_secret).
    """

    @property
    def name(self) -> str: ...

    @property
    def kem_algorithms(self) -> tuple[str, ...]: ...

    @property
    def sig_algorithms(self) -> tuple[str, ...]: ...

    def kem_generate(self, algorithm: str) -> KemPrivateKey: ...

    def kem_encapsulate(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]: ...

    def sig_generate(self, algorithm: str) -> SigPrivateKey: ...

    def sig_load_private(self, algorithm: str, data: bytes) -> SigPrivateKey: ...

    def sig_verify(
        self, algorithm: str, public_key: bytes, message: bytes, signature: bytes,
        context: bytes = b"",
    ) -> None: ...
