"""Backend selection.

`get_backend()` returns the backend named by the caller or `PQFED_CRYPTO_BACKEND`, else the
default `auto`: liboqs when its library is present (it measured faster on every primitive and
on the full handshake, docs/BENCHMARKS.md "PQC backends"), pyca otherwise. A backend named
explicitly that cannot be used raises `BackendUnavailable`; only `auto` falls back.
"""

from __future__ import annotations

import functools
import os
from typing import Final

from pqfed.pqc.backends.base import Backend, KemPrivateKey, SigPrivateKey
from pqfed.pqc.errors import BackendUnavailable

BACKENDS = ("pyca", "liboqs")
CHOICES = ("auto", *BACKENDS)
DEFAULT_BACKEND = "auto"
# The environment variable that names the backend when the caller does not.
BACKEND_ENV: Final = "PQFED_CRYPTO_BACKEND"

# `auto` tries these in order: the faster first (measured by `make bench-pqc`).
AUTO_ORDER = ("liboqs", "pyca")

__all__ = ["AUTO_ORDER", "BACKENDS", "BACKEND_ENV", "CHOICES", "DEFAULT_BACKEND", "Backend",
           "KemPrivateKey", "SigPrivateKey", "available_backends", "backend_report", "get_backend"]


@functools.cache
def get_backend(name: str | None = None) -> Backend:
    chosen = name or os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND
    if chosen == "auto":
        for candidate in AUTO_ORDER[:-1]:
            try:
                return get_backend(candidate)
            except BackendUnavailable:
                continue
        return get_backend(AUTO_ORDER[-1])
    if chosen == "pyca":
        from pqfed.pqc.backends.pyca import PycaBackend

        return PycaBackend()
    if chosen == "liboqs":
        from pqfed.pqc.backends.liboqs import LiboqsBackend

        return LiboqsBackend()
    raise BackendUnavailable(chosen, f"unknown backend; choose one of {', '.join(CHOICES)} "
                                     "(PQFED_CRYPTO_BACKEND or crypto.backend)")


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


def backend_report() -> dict[str, str]:
    """What runs here, for `pqfed selftest` and the sidecar's admin endpoint: the selected
    backend's name and a one-line description (library, version, binding)."""
    backend = get_backend()
    description = getattr(backend, "description", None)
    if description is None:
        from cryptography.hazmat.backends.openssl.backend import backend as openssl

        description = f"pyca/cryptography ({openssl.openssl_version_text()})"
    return {"backend": backend.name, "description": str(description)}


def cross_backend_checks() -> dict[str, str]:
    """A KEM + signature round trip from each usable backend to each (FIPS 203/204
    interoperability), for `pqfed selftest`: {"producer->consumer": "ok" or what failed}."""
    checks: dict[str, str] = {}
    usable = [name for name, why in available_backends().items() if why == "ok"]
    for producer in usable:
        for consumer in usable:
            p, c = get_backend(producer), get_backend(consumer)
            try:
                kem = c.kem_generate("ML-KEM-768")
                ct, ss = p.kem_encapsulate("ML-KEM-768", kem.public_bytes())
                sig_key = p.sig_generate("ML-DSA-65")
                c.sig_verify("ML-DSA-65", sig_key.public_bytes(), b"selftest",
                             sig_key.sign(b"selftest", b"pqfed"), b"pqfed")
                ok = kem.decapsulate(ct) == ss
            except Exception as exc:
                checks[f"{producer}->{consumer}"] = f"{type(exc).__name__}: {exc}"
                continue
            checks[f"{producer}->{consumer}"] = "ok" if ok else "KEM shared secrets differ"
    return checks
