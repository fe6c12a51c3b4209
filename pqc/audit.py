"""A hash-chained, signed audit log of model updates (append-only JSON Lines).

Each entry carries the hash of the previous entry (a hash chain, as in Certificate
Transparency's append-only log idea and RFC 6962's leaf hashing), and the aggregator's ML-DSA
signature over its own hash; the log can be verified offline with only the federation's CA
certificate: `pqfed audit verify LOG --ca ca.pem [--crl crl.pem]`.

With the federation's revocation list, every entry is checked against the signer's status at
the entry's time: entries signed after the signer's revocation date fail, and all of them if
the reason is keyCompromise (the key may have signed anything, under any claimed time).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqfed.pqc.backends import get_backend
from pqfed.pqc.errors import AuditLogError, CertificateError, DecodeError, InvalidSignature
from pqfed.pqc.identity import Certificate, Identity, Role, TrustAnchor

AUDIT_CONTEXT = b"pqfed/audit/v1"
GENESIS = "0" * 64


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# What every entry carries, with its JSON type (AuditLog.append writes them all).
_REQUIRED: dict[str, tuple[type, ...]] = {"seq": (int,), "time": (int, float), "event": (str,),
                                          "prev": (str,), "signer": (str,), "hash": (str,),
                                          "sig": (str,)}


def parse_entry(line: str, lineno: int) -> dict[str, Any]:
    """One log line, exactly as AuditLog.append writes it: a JSON object in canonical form
    (json.dumps with sorted keys), no duplicate keys, no NaN/Infinity, the fields of
    `_REQUIRED` with their types. Anything else raises AuditLogError: two readers must never
    see different entries in the same bytes (with duplicate keys, JSON parsers disagree on
    which value counts; RFC 8259 §4 leaves it open)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise AuditLogError(lineno, f"duplicate key {key[:40]!r} (ambiguous entry)")
            obj[key] = value
        return obj

    def no_constant(name: str) -> Any:
        raise AuditLogError(lineno, f"{name} is not a JSON number")

    try:
        entry = json.loads(line, object_pairs_hook=unique, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise AuditLogError(lineno, f"not JSON: {exc}") from None
    except RecursionError:
        raise AuditLogError(lineno, "not JSON: nested too deeply") from None
    if not isinstance(entry, dict):
        raise AuditLogError(lineno, "entry is not an object")
    for key, types in _REQUIRED.items():
        value = entry.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            raise AuditLogError(lineno, f"field {key!r} missing or not a "
                                        f"{' or '.join(t.__name__ for t in types)}")
    if json.dumps(entry, sort_keys=True) != line:
        raise AuditLogError(lineno, "not in canonical form (sorted keys, ', ' and ': ' "
                                    "separators, ASCII escapes, as AuditLog writes it)")
    return entry


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "sig")}
    return hashlib.sha3_256(_canonical(body)).hexdigest()


class AuditLog:
    """Appends signed entries; reopening an existing log continues its chain."""

    def __init__(self, path: Path, identity: Identity) -> None:
        self.path = path
        self._identity = identity
        self._seq = 0
        self._prev = GENESIS
        if path.exists():
            summary = verify_audit_log(path, None)
            self._seq, self._prev = summary.entries, summary.head

    @property
    def head(self) -> str:
        """Hash of the newest entry; recorded elsewhere, it detects truncation of the log."""
        return self._prev

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "seq": self._seq,
            "time": round(time.time(), 3),
            "event": event,
            "prev": self._prev,
            "signer": self._identity.certificate.to_pem() if self._seq == 0 else
            self._identity.certificate.fingerprint,
            **fields,
        }
        digest = entry_hash(entry)
        entry["hash"] = digest
        entry["sig"] = self._identity.sign(bytes.fromhex(digest), AUDIT_CONTEXT).hex()
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
        self._seq += 1
        self._prev = digest
        return entry


@dataclass(frozen=True, slots=True)
class AuditSummary:
    entries: int
    head: str
    signer: str
    events: dict[str, int]
    # The revocation list the log was checked against: number, and whether it was already
    # past its nextUpdate at verification time (a newer list may revoke more).
    crl: dict[str, Any] | None = None


def verify_audit_log(path: Path, trust: TrustAnchor | None) -> AuditSummary:
    """Verifies the chain and every signature. With `trust`, the signer's certificate must be
    an aggregator's or an edge aggregator's issued by that CA. Raises
    AuditLogError(line, reason)."""
    prev, signer_cert = GENESIS, None
    events: dict[str, int] = {}
    count = 0
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        entry = parse_entry(line, lineno)
        if entry.get("seq") != count:
            raise AuditLogError(lineno, f"seq {entry.get('seq')} where {count} was expected "
                                        "(entry removed or reordered)")
        if entry.get("prev") != prev:
            raise AuditLogError(lineno, "prev does not match the previous entry's hash")
        if entry.get("hash") != entry_hash(entry):
            raise AuditLogError(lineno, "hash does not match the entry (entry modified)")
        if count == 0:
            try:
                signer_cert = Certificate.from_pem(str(entry.get("signer", "")))
            except DecodeError as exc:
                raise AuditLogError(lineno, f"signer certificate: {exc}") from None
        elif signer_cert is None or entry.get("signer") != signer_cert.fingerprint:
            raise AuditLogError(lineno, "signer differs from the log's first entry")
        assert signer_cert is not None
        if trust is not None:
            # Every entry, not only the first: the signer may be revoked mid-log.
            try:
                trust.verify(signer_cert, roles=(Role.AGGREGATOR, Role.EDGE),
                             signed_at=float(entry["time"]))
            except (CertificateError, KeyError, TypeError, ValueError) as exc:
                raise AuditLogError(lineno, f"signer certificate at the entry's time: {exc}"
                                    ) from None
        try:
            get_backend().sig_verify(signer_cert.sig_algorithm, signer_cert.public_key,
                                     bytes.fromhex(entry["hash"]), bytes.fromhex(entry["sig"]),
                                     AUDIT_CONTEXT)
        except (InvalidSignature, ValueError, KeyError):
            raise AuditLogError(lineno, "signature does not verify") from None
        prev = entry["hash"]
        events[entry["event"]] = events.get(entry["event"], 0) + 1
        count += 1
    crl = None
    if trust is not None and trust.crl is not None:
        crl = {"number": trust.crl.number, "nextUpdate": trust.crl.next_update,
               "stale": time.time() >= trust.crl.next_update}
    return AuditSummary(count, prev, signer_cert.node_id if signer_cert else "", events, crl)
