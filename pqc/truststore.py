"""A node's trust anchor kept current from files: the CA root and the newest revocation list.

The operator (or an admin with `pqfed ca revoke`) publishes a new list by replacing the file
(a Kubernetes Secret/ConfigMap volume swaps it atomically). The store re-reads it, and switches
only to a list that (1) the root's CA signed under the CRL context and (2) passes the rollback
rule of `CrlVersionGuard`; so whoever can write the file (the volume, the API object) cannot
un-revoke anyone or forge a revocation: the store need not be trusted, the CA key must.

A list that fails either check is ignored (the previous one stays in force) and reported in
`last_error`; a file that disappears leaves the last list in force (deletion is no
un-revocation).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pqfed.pqc.errors import DecodeError, RevocationListError
from pqfed.pqc.identity import Certificate, Role, TrustAnchor
from pqfed.pqc.revocation import CrlVersionGuard, RevocationList

log = logging.getLogger("pqfed.trust")

CRL_FILE = "crl.pem"  # beside ca.crt in an identity directory


class TrustStore:
    """Loads `ca_path` once and `crl_path` whenever its content changes. Not thread-safe:
    one owner (a sidecar's event loop, a ServerApp's strategy) reloads it."""

    def __init__(self, ca_path: Path, crl_path: Path | None = None, *,
                 min_interval_s: float = 1.0) -> None:
        self.ca_path = ca_path
        self.crl_path = crl_path
        self.min_interval_s = min_interval_s
        self.guard = CrlVersionGuard()
        self.last_error: Exception | None = None
        self.rejected = 0  # lists refused (bad signature, rollback, malformed)
        self._anchor = TrustAnchor(Certificate.from_pem(ca_path.read_text()))
        self._seen: bytes | None = None
        self._checked = float("-inf")
        self.reload()

    @classmethod
    def from_identity_dir(cls, directory: Path, **kwargs: float) -> TrustStore:
        """ca.crt and (when present, now or later) crl.pem of an identity directory."""
        return cls(directory / "ca.crt", directory / CRL_FILE, **kwargs)

    @property
    def root(self) -> Certificate:
        return self._anchor.root

    @property
    def current(self) -> TrustAnchor:
        """The anchor in force, without looking at the file (the owner reloads explicitly)."""
        return self._anchor

    @property
    def anchor(self) -> TrustAnchor:
        """The current anchor, re-reading the list at most every `min_interval_s`."""
        if time.monotonic() - self._checked >= self.min_interval_s:
            self.reload()
        return self._anchor

    def verify(self, cert: Certificate, *, now: float | None = None,
               roles: tuple[Role, ...] | None = None, node_id: str | None = None,
               signed_at: float | None = None) -> Certificate:
        return self.anchor.verify(cert, now=now, roles=roles, node_id=node_id,
                                  signed_at=signed_at)

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
            crl = RevocationList.from_pem(text.decode("ascii", "replace"))
            anchor = self._anchor.with_crl(crl)  # signature against the root
            if not self.guard.admit(crl):  # rollback rule
                return False
        except (DecodeError, RevocationListError) as exc:
            self._refuse(exc)
            return False
        self._anchor = anchor
        self.last_error = None
        log.info("revocation list %d in force: %d revoked, next update %d", crl.number,
                 len(crl.revoked), crl.next_update)
        return True

    def _refuse(self, exc: Exception) -> None:
        self.rejected += 1
        self.last_error = exc
        log.warning("revocation list %s ignored, the previous one stays in force: %s",
                    self.crl_path, exc)
