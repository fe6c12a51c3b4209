"""A node's identity directory as the Flower apps read it: tls.crt + tls.key (its ML-DSA
identity), ca.crt (the federation root) and, when the CA revoked someone, crl.pem.

The operator mounts it from a Secret, and renews the certificate in place (the kubelet swaps
tls.crt and tls.key together): every reader here notices a renewal by the files' modification
times, and a replaced ca.crt (another federation) by its inode, time and size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from pqfed.pqc import Certificate, Identity, TrustAnchor, TrustStore


def load_identity(directory: str) -> tuple[Identity, TrustAnchor]:
    """The node identity in `directory` and its CA root, re-read after a renewal."""
    d = Path(directory)
    stamp = tuple((d / f).stat().st_mtime_ns for f in ("tls.crt", "tls.key"))
    return _load_identity(directory, stamp)


@functools.lru_cache(maxsize=4)
def _load_identity(directory: str, _stamp: tuple[int, ...]) -> tuple[Identity, TrustAnchor]:
    d = Path(directory)
    ident = Identity.load_files(d / "tls.crt", d / "tls.key")
    trust = TrustAnchor(Certificate.from_pem((d / "ca.crt").read_text()))
    return ident, trust


def identity_source(directory: str) -> Callable[[], Identity]:
    """The current (possibly renewed) identity of `directory`, read on each call; what an
    audit log follows to hand over to a renewed certificate (pqc/audit.py)."""
    return lambda: load_identity(directory)[0]


def trust_store(directory: str) -> TrustStore:
    """The node's CA root and the newest revocation list in `directory` (ca.crt, crl.pem):
    one store per directory and CA file (a replaced ca.crt is another federation: a new store)
    and process; its `anchor` re-reads the list when it changes."""
    ca = (Path(directory) / "ca.crt").stat()
    return _trust_store(directory, (ca.st_ino, ca.st_mtime_ns, ca.st_size))


@functools.lru_cache(maxsize=8)
def _trust_store(directory: str, _stamp: tuple[int, ...]) -> TrustStore:
    return TrustStore.from_identity_dir(Path(directory))
