"""A node's trust anchor kept current from files: the CA root and the newest revocation list.

The operator (or an admin with `pqfed ca revoke` / `pqfed ca x509-crl`) publishes a new list by
replacing the file (a Kubernetes Secret/ConfigMap volume swaps it atomically). The store
re-reads it, and switches only to a list that (1) the root's CA signed and (2) passes the
rollback rule (RFC 5280 §5.2.3: the CRL number only grows; one number, one content); so whoever
can write the file (the volume, the API object) cannot un-revoke anyone or forge a revocation:
the store need not be trusted, the CA key must.

A list that fails either check is ignored (the previous one stays in force) and reported in
`last_error`; a file that disappears leaves the last list in force (deletion is no
un-revocation). A list past its nextUpdate is taken but fails every live verification (fail
closed, RFC 5280 §6.3.3) until a newer one arrives.

Two formats, one reload loop (`CrlFileStore`): the pqfed format (`TrustStore`: pqfed
certificates and revocation lists, the pqfed1 channel) and X.509 (`X509TrustStore`: an X.509
CA and CRLs, the TLS 1.3 channel).
"""

from __future__ import annotations

import abc
import datetime
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from cryptography import x509

from pqfed.pqc.errors import CertificateError, DecodeError, RevocationListError
from pqfed.pqc.identity import Certificate, Role, TrustAnchor
from pqfed.pqc.pki.profile import (
    BACKDATE_S,
    NodeCertificate,
    Usage,
    X509TrustAnchor,
    load_certificate_pem,
)
from pqfed.pqc.revocation import CrlVersionGuard, RevocationList

log = logging.getLogger("pqfed.trust")

CRL_FILE = "crl.pem"  # beside ca.crt in an identity directory
A = TypeVar("A")


class CrlFileStore(abc.ABC, Generic[A]):
    """The reload loop shared by both formats: reads `crl_path` when its bytes change, lets
    the format admit the list (`_admit`), keeps the last admitted anchor otherwise. Not
    thread-safe: one owner (a sidecar's event loop, a ServerApp's strategy) reloads it."""

    def __init__(self, anchor: A, crl_path: Path | None, *, min_interval_s: float) -> None:
        self.crl_path = crl_path
        self.min_interval_s = min_interval_s
        self.last_error: Exception | None = None
        self.rejected = 0  # lists refused (bad signature, rollback, malformed)
        self._anchor = anchor
        self._seen: bytes | None = None
        self._checked = float("-inf")
        self.reload()

    @property
    def current(self) -> A:
        """The anchor in force, without looking at the file (the owner reloads explicitly)."""
        return self._anchor

    @property
    def anchor(self) -> A:
        """The current anchor, re-reading the list at most every `min_interval_s`."""
        if time.monotonic() - self._checked >= self.min_interval_s:
            self.reload()
        return self._anchor

    def reload(self) -> bool:
        """Re-reads the list file; True if a newer list is now in force."""
        self._checked = time.monotonic()
        if self.crl_path is None:
            return False
        try:
            text = self.crl_path.read_bytes()
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._refuse(RevocationListError("file", f"{self.crl_path}: {exc}"))
            return False
        if text == self._seen:
            return False
        self._seen = text
        try:
            anchor = self._admit(text)
        except (DecodeError, RevocationListError, CertificateError) as exc:
            self._refuse(exc)
            return False
        if anchor is None:  # the list already in force
            return False
        self._anchor = anchor
        self.last_error = None
        log.info("revocation list in force: %s", self.describe())
        return True

    @property
    @abc.abstractmethod
    def crl_number(self) -> int | None:
        """The number of the list in force (None: no list yet)."""

    @abc.abstractmethod
    def _admit(self, text: bytes) -> A | None:
        """The anchor with the list in `text`, None if it is the list in force; raises
        (DecodeError, RevocationListError, CertificateError) on a list to refuse."""

    def describe(self) -> str:
        return f"number {self.crl_number}"

    def _refuse(self, exc: Exception) -> None:
        self.rejected += 1
        self.last_error = exc
        log.warning("revocation list %s ignored, the previous one stays in force: %s",
                    self.crl_path, exc)


class TrustStore(CrlFileStore[TrustAnchor]):
    """The pqfed format: `ca_path` holds a pqfed CA certificate, `crl_path` a pqfed
    revocation list (`pqfed.pqc.revocation`)."""

    def __init__(self, ca_path: Path, crl_path: Path | None = None, *,
                 min_interval_s: float = 1.0) -> None:
        self.ca_path = ca_path
        self.guard = CrlVersionGuard()
        super().__init__(TrustAnchor(Certificate.from_pem(ca_path.read_text())), crl_path,
                         min_interval_s=min_interval_s)

    @classmethod
    def from_identity_dir(cls, directory: Path, **kwargs: float) -> TrustStore:
        """ca.crt and (when present, now or later) crl.pem of an identity directory."""
        return cls(directory / "ca.crt", directory / CRL_FILE, **kwargs)

    @property
    def root(self) -> Certificate:
        return self._anchor.root

    @property
    def crl_number(self) -> int | None:
        crl = self._anchor.crl
        return None if crl is None else crl.number

    def verify(self, cert: Certificate, *, now: float | None = None,
               roles: tuple[Role, ...] | None = None, node_id: str | None = None,
               signed_at: float | None = None) -> Certificate:
        return self.anchor.verify(cert, now=now, roles=roles, node_id=node_id,
                                  signed_at=signed_at)

    def _admit(self, text: bytes) -> TrustAnchor | None:
        crl = RevocationList.from_pem(text.decode("ascii", "replace"))
        anchor = self._anchor.with_crl(crl)  # signature against the root
        if not self.guard.admit(crl):  # rollback rule
            return None
        return anchor

    def describe(self) -> str:
        crl = self._anchor.crl
        if crl is None:
            return "none"
        return f"number {crl.number}, {len(crl.revoked)} revoked, next update {crl.next_update}"


@dataclass(frozen=True, slots=True)
class X509Trust:
    """An X.509 trust anchor and the nextUpdate of the CRL it holds. `verify` has the
    signature of `X509TrustAnchor.verify`, and fails closed once that CRL is stale: past
    nextUpdate the CA's revocations since are unknown (RFC 5280 §6.3.3 (a)(2))."""

    anchor: X509TrustAnchor
    next_update: float | None = None

    @property
    def root(self) -> x509.Certificate:
        return self.anchor.root

    def verify(self, cert: x509.Certificate, *, now: float | None = None,
               roles: tuple[Role, ...] | None = None, node_id: str | None = None,
               usage: Usage | None = None) -> NodeCertificate:
        t = time.time() if now is None else now
        if self.next_update is not None and t >= self.next_update:
            stamp = datetime.datetime.fromtimestamp(self.next_update, datetime.UTC)
            raise CertificateError(
                "crl", f"revocation status unknown: CRL number {self.anchor.crl_number} is "
                       f"stale since {stamp:%Y-%m-%dT%H:%M:%SZ}; the CA must publish a new one "
                       "(pqfed ca x509-crl --ca DIR --number N --out FILE)")
        return self.anchor.verify(cert, now=t, roles=roles, node_id=node_id, usage=usage)


def load_x509_crl(text: bytes, field_name: str = "crl") -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(text)
    except ValueError as exc:
        hint = (" (this is a pqfed revocation list: the pqfed1 protocol reads it; for TLS 1.3 "
                "publish an X.509 CRL with `pqfed ca x509-crl`)"
                if b"PQFED REVOCATION LIST" in text else "")
        raise CertificateError(field_name, f"not a PEM X.509 CRL{hint}: {exc}") from None


class X509TrustStore(CrlFileStore[X509Trust]):
    """X.509: `ca_path` holds the federation's X.509 CA certificate (pqc/pki/profile.py),
    `crl_path` its X.509 v2 CRL. Signature, issuer, critical extensions and the rollback rule
    are `X509TrustAnchor.with_crl`'s; freshness is judged on every verification (`X509Trust`),
    so a stale list is taken and fails closed instead of leaving an older one in force."""

    def __init__(self, ca_path: Path, crl_path: Path | None = None, *,
                 min_interval_s: float = 1.0) -> None:
        self.ca_path = ca_path
        root = X509TrustAnchor(load_certificate_pem(ca_path.read_bytes(), "root"))
        super().__init__(X509Trust(root), crl_path, min_interval_s=min_interval_s)

    @property
    def root(self) -> x509.Certificate:
        return self._anchor.root

    @property
    def crl_number(self) -> int | None:
        return self._anchor.anchor.crl_number

    def verify(self, cert: x509.Certificate, *, now: float | None = None,
               roles: tuple[Role, ...] | None = None, node_id: str | None = None,
               usage: Usage | None = None) -> NodeCertificate:
        return self.anchor.verify(cert, now=now, roles=roles, node_id=node_id, usage=usage)

    def _admit(self, text: bytes) -> X509Trust | None:
        crl = load_x509_crl(text)
        issued = crl.last_update_utc.timestamp()
        if issued > time.time() + BACKDATE_S:
            raise CertificateError("crl.last_update", "issued in the future (check clocks)")
        if crl.next_update_utc is None:
            raise CertificateError("crl.next_update", "missing (RFC 5280 §5.1.2.5: pqfed "
                                                      "requires it)")
        held = self._anchor.anchor
        # Checked as of its own issue time: staleness is X509Trust.verify's business.
        anchor = held.with_crl(crl, now=issued)
        if anchor.crl_fingerprint == held.crl_fingerprint:
            return None
        return X509Trust(anchor, crl.next_update_utc.timestamp())

    def describe(self) -> str:
        held = self._anchor
        if held.anchor.crl_number is None:
            return "none"
        return (f"number {held.anchor.crl_number}, {len(held.anchor.revoked)} revoked, next "
                f"update {held.next_update}")
