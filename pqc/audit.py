"""A hash-chained, signed audit log of model updates (append-only JSON Lines).

Each entry carries the hash of the previous entry (a hash chain, as in Certificate
Transparency's append-only log idea and RFC 6962's leaf hashing), and the aggregator's ML-DSA
signature over its own hash; the log can be verified offline with only the federation's CA
certificate: `pqfed audit verify LOG --ca ca.pem [--crl crl.pem]`.

With the federation's revocation list, every entry is checked against the signer's status at
the entry's time: entries signed after the signer's revocation date fail, and all of them if
the reason is keyCompromise (the key may have signed anything, under any claimed time).

Signer hand-over. Node certificates are short-lived and renewed (new key) mid-job, so a log may
outlive the certificate of its first entry. A `signer-renewed` entry carries the new
certificate (`newSigner`, PEM) and is signed like every entry by the OLD key (the outgoing key
vouches for its successor, like the old-with-new certificate of RFC 4210 §4.4's CA key
update), and countersigned by the NEW key (`newSig`, context `pqfed/audit-handover/v1`, over
the entry without `hash`, `sig` and `newSig`: proof of possession, as a PKCS#10 request's
self-signature). Every later entry must name and be signed by the new certificate. The new
certificate must be for the same federation, CA, role and node id as the log's signer; with a
trust anchor each signer is checked against the CA and the revocation list at the time of each
entry it signs (the new one also at the hand-over).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqfed.pqc.backends import get_backend
from pqfed.pqc.errors import (
    AuditLogError,
    CertificateError,
    DecodeError,
    InvalidSignature,
    PqcError,
)
from pqfed.pqc.identity import Certificate, Identity, Role, TrustAnchor

AUDIT_CONTEXT = b"pqfed/audit/v1"
HANDOVER_CONTEXT = b"pqfed/audit-handover/v1"  # the new key's countersignature
HANDOVER_EVENT = "signer-renewed"
GENESIS = "0" * 64

log = logging.getLogger("pqfed.audit")


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


def handover_digest(entry: dict[str, Any]) -> bytes:
    """What the new key countersigns in a hand-over: the entry without hash, sig, newSig (so
    the countersignature is itself covered by the entry's hash and the old key's signature)."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "sig", "newSig")}
    return hashlib.sha3_256(_canonical(body)).digest()


def _shown(value: object) -> str:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Role):
        return value.name.lower()
    return repr(value)


def check_successor(current: Certificate, new: Certificate) -> None:
    """A certificate may take over a log only from one of the same federation, CA, node id and
    role (a renewal), and must be another certificate. Raises CertificateError naming the
    field."""
    for name in ("federation", "issuer", "role", "node_id"):
        old_value, new_value = getattr(current, name), getattr(new, name)
        if old_value != new_value:
            raise CertificateError(name, f"the new signer's {_shown(new_value)} is not the "
                                   f"log signer's {_shown(old_value)} (only a renewal of the "
                                   "same node's certificate may take over a log)")
    if new.fingerprint == current.fingerprint:
        raise CertificateError("newSigner", "is the current signer (nothing to hand over)")


IdentitySource = Callable[[], Identity]


class AuditLog:
    """Appends signed entries; reopening an existing log continues its chain.

    `renewed`: where the writer's current identity comes from (e.g. the identity directory the
    operator renews); before each entry the log hands over to a renewed identity
    (`hand_over`). Reopening a log whose current signer is not `identity` needs `previous`, the
    identity that signed it last (its key signs the hand-over); without it AuditLogError."""

    def __init__(self, path: Path, identity: Identity, *,
                 renewed: IdentitySource | None = None,
                 previous: Identity | None = None) -> None:
        self.path = path
        self._identity = identity
        self._renewed = renewed
        self._seq = 0
        self._prev = GENESIS
        if path.exists():
            summary = verify_audit_log(path, None)
            self._seq, self._prev = summary.entries, summary.head
            if summary.signer_certificate is not None and \
                    summary.signer_certificate.fingerprint != identity.certificate.fingerprint:
                current = summary.signer_certificate
                if previous is None or \
                        previous.certificate.fingerprint != current.fingerprint:
                    raise AuditLogError(
                        summary.entries, f"the log is signed by certificate serial "
                        f"{current.serial} of {current.node_id!r}, not by this identity "
                        f"(serial {identity.certificate.serial}); pass the previous identity "
                        "to hand the log over, or archive it and start a new one")
                self._identity = previous
                self.hand_over(identity)

    @classmethod
    def resume(cls, path: Path, identity: Identity, *,
               renewed: IdentitySource | None = None) -> AuditLog:
        """Opens `path` to continue it, as a restarted aggregator does. A log it cannot
        continue (signed last by a certificate whose key is gone, as after a renewal while the
        writer was down; or one that does not verify) is renamed `<stem>-<time>.jsonl`, kept
        for review, and a new log starts with a `log-continued` entry naming it, its head
        hash when its chain verifies, and why it was not continued."""
        try:
            return cls(path, identity, renewed=renewed)
        except AuditLogError as exc:
            archive = path.with_name(f"{path.stem}-{time.time_ns()}{path.suffix}")
            path.rename(archive)
            log.warning("audit log %s not continued, kept as %s: %s", path, archive, exc)
            fields: dict[str, Any] = {"previousLog": archive.name, "reason": str(exc)}
            with contextlib.suppress(AuditLogError):  # a broken chain has no head
                fields["previousHead"] = verify_audit_log(archive, None).head
            new = cls(path, identity, renewed=renewed)
            new.append("log-continued", **fields)
            return new

    @property
    def identity(self) -> Identity:
        """The identity that signs the next entry."""
        return self._identity

    def hand_over(self, new: Identity) -> dict[str, Any] | None:
        """Appends a `signer-renewed` entry (signed by the current key, countersigned by
        `new`'s) and signs later entries with `new`. None if `new` is the current signer.
        Raises CertificateError if `new` is not a renewal of the current signer."""
        current = self._identity.certificate
        if new.certificate.fingerprint == current.fingerprint:
            return None
        check_successor(current, new.certificate)
        entry = self._entry(HANDOVER_EVENT, {"newSigner": new.certificate.to_pem(),
                                             "serial": new.certificate.serial})
        entry["newSig"] = new.sign(handover_digest(entry), HANDOVER_CONTEXT).hex()
        self._write(entry)
        self._identity = new
        log.info("audit log %s: signer renewed (serial %d -> %d)", self.path, current.serial,
                 new.certificate.serial)
        return entry

    def _follow_renewal(self) -> None:
        if self._renewed is None:
            return
        try:
            new = self._renewed()
            if self._seq == 0:  # nothing signed yet: the first entry names the new signer
                if new.certificate.fingerprint != self._identity.certificate.fingerprint:
                    check_successor(self._identity.certificate, new.certificate)
                    self._identity = new
                return
            self.hand_over(new)
        except (PqcError, OSError) as exc:
            # A renewal that is not one (another node, a key that does not match): the
            # current signer keeps signing; its certificate's lifetime still bounds the log.
            log.warning("audit log %s: renewed identity not used: %s", self.path, exc)

    @property
    def head(self) -> str:
        """Hash of the newest entry; recorded elsewhere, it detects truncation of the log."""
        return self._prev

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        if event == HANDOVER_EVENT:
            raise ValueError(f"event {HANDOVER_EVENT!r} is written by hand_over only")
        self._follow_renewal()
        entry = self._entry(event, fields)
        self._write(entry)
        return entry

    def _entry(self, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        return {
            "seq": self._seq,
            "time": round(time.time(), 3),
            "event": event,
            "prev": self._prev,
            "signer": self._identity.certificate.to_pem() if self._seq == 0 else
            self._identity.certificate.fingerprint,
            **fields,
        }

    def _write(self, entry: dict[str, Any]) -> None:
        digest = entry_hash(entry)
        entry["hash"] = digest
        entry["sig"] = self._identity.sign(bytes.fromhex(digest), AUDIT_CONTEXT).hex()
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
        self._seq += 1
        self._prev = digest


@dataclass(frozen=True, slots=True)
class AuditSummary:
    entries: int
    head: str
    signer: str
    events: dict[str, int]
    # The revocation list the log was checked against: number, and whether it was already
    # past its nextUpdate at verification time (a newer list may revoke more).
    crl: dict[str, Any] | None = None
    # Serials of the certificates that signed the log, in hand-over order.
    signers: tuple[int, ...] = ()
    signer_certificate: Certificate | None = None  # the one that signed the newest entry


def verify_audit_log(path: Path, trust: TrustAnchor | None) -> AuditSummary:
    """Verifies the chain, every signature and every signer hand-over. With `trust`, each
    signer's certificate must be an aggregator's or an edge aggregator's issued by that CA, and
    valid and unrevoked at the time of every entry it signed. Raises AuditLogError(line,
    reason)."""
    prev, signer_cert = GENESIS, None
    events: dict[str, int] = {}
    signers: list[int] = []
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
            signers.append(signer_cert.serial)
        elif signer_cert is None or entry.get("signer") != signer_cert.fingerprint:
            raise AuditLogError(lineno, "signer is not the log's current signer (serial "
                                f"{signer_cert.serial if signer_cert else '?'}; a new signer "
                                f"takes over only through a {HANDOVER_EVENT!r} entry)")
        assert signer_cert is not None
        _check_signer(lineno, signer_cert, entry, trust)
        try:
            get_backend().sig_verify(signer_cert.sig_algorithm, signer_cert.public_key,
                                     bytes.fromhex(entry["hash"]), bytes.fromhex(entry["sig"]),
                                     AUDIT_CONTEXT)
        except (InvalidSignature, ValueError, KeyError):
            raise AuditLogError(lineno, "signature does not verify") from None
        if entry["event"] == HANDOVER_EVENT:
            signer_cert = _verify_handover(lineno, signer_cert, entry, trust)
            signers.append(signer_cert.serial)
        prev = entry["hash"]
        events[entry["event"]] = events.get(entry["event"], 0) + 1
        count += 1
    crl = None
    if trust is not None and trust.crl is not None:
        crl = {"number": trust.crl.number, "nextUpdate": trust.crl.next_update,
               "stale": time.time() >= trust.crl.next_update}
    return AuditSummary(count, prev, signer_cert.node_id if signer_cert else "", events, crl,
                        tuple(signers), signer_cert)


def _check_signer(lineno: int, cert: Certificate, entry: dict[str, Any],
                  trust: TrustAnchor | None, what: str = "signer") -> None:
    """Every entry, not only the first: the signer may expire or be revoked mid-log."""
    if trust is None:
        return
    try:
        trust.verify(cert, roles=(Role.AGGREGATOR, Role.EDGE), signed_at=float(entry["time"]))
    except (CertificateError, KeyError, TypeError, ValueError) as exc:
        raise AuditLogError(lineno, f"{what} certificate (serial {cert.serial}) at the "
                                    f"entry's time: {exc}") from None


def _verify_handover(lineno: int, current: Certificate, entry: dict[str, Any],
                     trust: TrustAnchor | None) -> Certificate:
    """A `signer-renewed` entry (already verified as signed by `current`): returns the new
    signer after checking it is a renewal of `current`, valid at the entry's time, and that
    its key countersigned the entry."""
    raw, newsig = entry.get("newSigner"), entry.get("newSig")
    if not isinstance(raw, str) or not isinstance(newsig, str):
        raise AuditLogError(lineno, "hand-over without 'newSigner' and 'newSig' strings")
    try:
        new = Certificate.from_pem(raw)
    except DecodeError as exc:
        raise AuditLogError(lineno, f"newSigner certificate: {exc}") from None
    try:
        check_successor(current, new)
    except CertificateError as exc:
        raise AuditLogError(lineno, f"hand-over refused: {exc}") from None
    _check_signer(lineno, new, entry, trust, "newSigner")
    try:
        get_backend().sig_verify(new.sig_algorithm, new.public_key, handover_digest(entry),
                                 bytes.fromhex(newsig), HANDOVER_CONTEXT)
    except (InvalidSignature, ValueError):
        raise AuditLogError(lineno, "hand-over: the new signer's countersignature (newSig) "
                                    "does not verify (no proof of the new key)") from None
    return new
