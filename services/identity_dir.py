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

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import mldsa

from pqfed.pqc import Certificate, Identity, TrustAnchor, TrustStore
from pqfed.pqc.pki.profile import load_certificate_pem, load_private_key_pem
from pqfed.pqc.truststore import CRL_FILE, X509TrustStore

# tls13 jobs: the X.509 twin of an operator-run node's identity, below its identity directory
# (operator/pods.py mounts it there); the aggregator verifies site-signed updates against its
# ca.crt and crl.pem.
X509_SUBDIR = "x509"
_X509_PEM = b"-----BEGIN CERTIFICATE-----"


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


def is_site_directory(directory: str) -> bool:
    """Whether `directory` holds a site-held X.509 identity (tls.crt is an X.509 PEM, as
    `pqfed ca csr` + the issued certificate leave it) instead of a pqfed-format one."""
    with open(Path(directory) / "tls.crt", "rb") as f:
        return f.read(len(_X509_PEM)) == _X509_PEM


def load_site_key(directory: str) -> tuple[mldsa.MLDSA65PrivateKey, x509.Certificate]:
    """A site's own ML-DSA-65 key and its X.509 certificate (tls.key, tls.crt), re-read when
    the site replaces them (a renewed certificate)."""
    d = Path(directory)
    stamp = tuple((d / f).stat().st_mtime_ns for f in ("tls.crt", "tls.key"))
    return _load_site_key(directory, stamp)


@functools.lru_cache(maxsize=4)
def _load_site_key(directory: str, _stamp: tuple[int, ...]
                   ) -> tuple[mldsa.MLDSA65PrivateKey, x509.Certificate]:
    d = Path(directory)
    key = load_private_key_pem((d / "tls.key").read_bytes(), "tls.key")
    return key, load_certificate_pem((d / "tls.crt").read_bytes(), "tls.crt")


def x509_trust_store(directory: str) -> X509TrustStore:
    """The job's X.509 CA and newest CRL below an operator-run node's identity directory
    (X509_SUBDIR: ca.crt, crl.pem): what site-signed updates are checked against. One store
    per directory and process; it re-reads crl.pem when the CRL changes."""
    return _x509_trust_store(str(Path(directory) / X509_SUBDIR))


@functools.lru_cache(maxsize=4)
def _x509_trust_store(directory: str) -> X509TrustStore:
    d = Path(directory)
    return X509TrustStore(d / "ca.crt", d / CRL_FILE)
