"""Backend selection: `get_backend()` returns pyca unless `PQFED_CRYPTO_BACKEND` or the
caller names another. An unavailable backend raises `BackendUnavailable`; there is no silent
fallback from one backend to another."""

from __future__ import annotations

import functools
import os

from pqfed.pqc.backends.base import Backend, KemPrivateKey, SigPrivateKey
from pqfed.pqc.errors import BackendUnavailable

BACKENDS = ("pyca", "liboqs")
DEFAULT_BACKEND = "pyca"

__all__ = ["BACKENDS", "Backend", "KemPrivateKey", "SigPrivateKey", "available_backends",
           "get_backend"]


@functools.cache
def get_backend(name: str | None = None) -> Backend:
    chosen = name or os.environ.get("PQFED_CRYPTO_BACKEND") or DEFAULT_BACKEND
    if chosen == "pyca":
        from pqfed.pqc.backends.pyca import PycaBackend

        return PycaBackend()
    if chosen == "liboqs":
        from pqfed.pqc.backends.liboqs import LiboqsBackend

        return LiboqsBackend()
    raise BackendUnavailable(chosen, f"unknown backend; choose one of {', '.join(BACKENDS)}")


def available_backends() -> dict[str, str]:
    """Each backend's name mapped to 'ok' or the reason it cannot be used here."""
    out: dict[str, str] = {}
    for name in BACKENDS:
        try:
            get_backend(name)
        except BackendUnavailable as exc:
            out[name] = exc.reason
        else:
            out[name] = "ok"
    return out
