"""Certificate revocation lists (CRLs) signed by the federation CA.

Modelled on X.509 CRLs (RFC 5280 §5): the issuer, a CRL number that only grows (§5.2.3),
thisUpdate/nextUpdate (§5.1.2.4-5) and, per revoked certificate, its serial, the revocation
date and a reason code (§5.3.1's CRLReason values). The encoding is our own strict binary one,
like the certificate's (pqc/encoding.py), so every field maps one-to-one onto an X.509 CRL.

The CA signs the list with ML-DSA under its own context string `pqfed/crl/v1` (FIPS 204 §5.2
domain separation): a certificate signature never verifies as a CRL, nor a CRL's as a
certificate. Who checks that signature against which root is `TrustAnchor` (identity.py); this
module holds the data model, its encoding and the rollback rule (`CrlVersionGuard`).
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import itertools
from dataclasses import dataclass, field

from pqfed.pqc.algorithms import SIG_BY_CODE, SIG_CODES, SIG_SIZES
from pqfed.pqc.armor import armor, unarmor
from pqfed.pqc.encoding import Reader, Writer
from pqfed.pqc.errors import DecodeError, RevocationListError

CRL_VERSION = 1
CRL_CONTEXT = b"pqfed/crl/v1"
CRL_PEM_LABEL = "PQFED REVOCATION LIST"
ISSUER_LEN = 16  # identity.KEY_ID_LEN: SHA3-256(CA public key)[:16]
MAX_REVOKED = 1 << 20  # far beyond any federation; bounds a decoder's allocation
# A sidecar accepts a list this far before its thisUpdate (clock skew between CA and node).
CLOCK_SKEW_S = 300


class RevocationReason(enum.IntEnum):
    """RFC 5280 §5.3.1 CRLReason codes. certificateHold (6) and removeFromCRL (8) are left out:
    revocation here is permanent, a serial never leaves the list while its certificate is valid.
    """

    UNSPECIFIED = 0
    KEY_COMPROMISE = 1
    CA_COMPROMISE = 2
    AFFILIATION_CHANGED = 3
    SUPERSEDED = 4
    CESSATION_OF_OPERATION = 5
    PRIVILEGE_WITHDRAWN = 9

    @classmethod
    def parse(cls, value: str) -> RevocationReason:
        key = value.replace("-", "_").upper()
        try:
            return cls[key]
        except KeyError:
            names = ", ".join(r.name.lower().replace("_", "-") for r in cls)
            raise ValueError(f"reason {value!r} is not one of: {names}") from None

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True, slots=True, order=True)
class RevokedCertificate:
    """One entry (RFC 5280 revokedCertificates: userCertificate, revocationDate, reasonCode)."""

    serial: int
    revoked_at: int
    reason: RevocationReason = RevocationReason.UNSPECIFIED

    def describe(self) -> str:
        return f"serial {self.serial} revoked at {self.revoked_at} ({self.reason.label})"


@dataclass(frozen=True, slots=True)
class RevocationList:
    """A CA-signed list of revoked serials. Build one with CertificateAuthority.sign_crl."""

    federation: str
    issuer: bytes
    sig_algorithm: str
    number: int
    this_update: int
    next_update: int
    revoked: tuple[RevokedCertificate, ...] = ()
    signature: bytes = field(default=b"", repr=False)
    version: int = CRL_VERSION

    def __post_init__(self) -> None:
        serials = [e.serial for e in self.revoked]
        if any(a >= b for a, b in itertools.pairwise(serials)):
            raise RevocationListError("revoked", "serials must be sorted and unique")
        if self.next_update <= self.this_update:
            raise RevocationListError("next_update", "must be later than this_update")
        if len(self.issuer) != ISSUER_LEN:
            raise RevocationListError("issuer", f"must be {ISSUER_LEN} bytes")

    def tbs_bytes(self) -> bytes:
        w = (
            Writer()
            .u16(self.version)
            .text(self.federation)
            .raw(self.issuer)
            .u16(SIG_CODES[self.sig_algorithm])
            .u64(self.number)
            .u64(self.this_update)
            .u64(self.next_update)
            .u32(len(self.revoked))
        )
        for e in self.revoked:
            w.u64(e.serial).u64(e.revoked_at).u8(int(e.reason))
        return w.getvalue()

    def to_bytes(self) -> bytes:
        return Writer().raw(self.tbs_bytes()).vec16(self.signature).getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        r = Reader(data, "revocation_list")
        version = r.u16("version")
        if version != CRL_VERSION:
            raise DecodeError("revocation_list.version", f"{version} is not {CRL_VERSION}")
        federation = r.text("federation", 1, 63)
        issuer = r.raw(ISSUER_LEN, "issuer")
        code = r.u16("sig_algorithm")
        if code not in SIG_BY_CODE:
            raise DecodeError("revocation_list.sig_algorithm",
                              f"unknown algorithm code {code:#06x}")
        number = r.u64("number")
        this_update = r.u64("this_update")
        next_update = r.u64("next_update")
        count = r.u32("revoked.count")
        if count > MAX_REVOKED or count * 17 > r.remaining:
            raise DecodeError("revocation_list.revoked.count", f"{count} entries do not fit")
        entries: list[RevokedCertificate] = []
        for i in range(count):
            serial = r.u64(f"revoked[{i}].serial")
            revoked_at = r.u64(f"revoked[{i}].revoked_at")
            reason_code = r.u8(f"revoked[{i}].reason")
            try:
                reason = RevocationReason(reason_code)
            except ValueError:
                raise DecodeError(f"revocation_list.revoked[{i}].reason",
                                  f"unknown reason code {reason_code}") from None
            if entries and serial <= entries[-1].serial:
                raise DecodeError(f"revocation_list.revoked[{i}].serial",
                                  "serials must be sorted and unique")
            entries.append(RevokedCertificate(serial, revoked_at, reason))
        signature = r.vec16("signature", 1, max(s.signature for s in SIG_SIZES.values()))
        r.finish()
        if next_update <= this_update:
            raise DecodeError("revocation_list.next_update", "must be later than this_update")
        return cls(federation, issuer, SIG_BY_CODE[code], number, this_update, next_update,
                   tuple(entries), signature, version)

    def to_pem(self) -> str:
        return armor(CRL_PEM_LABEL, self.to_bytes())

    @classmethod
    def from_pem(cls, text: str) -> RevocationList:
        return cls.from_bytes(unarmor(CRL_PEM_LABEL, text))

    @property
    def digest(self) -> bytes:
        """SHA3-256 of the signed content (not the signature: ML-DSA's hedged signing gives
        one content many signatures): tells two lists with one number apart."""
        return hashlib.sha3_256(self.tbs_bytes()).digest()

    def lookup(self, serial: int) -> RevokedCertificate | None:
        i = bisect.bisect_left(self.revoked, serial, key=lambda e: e.serial)
        if i < len(self.revoked) and self.revoked[i].serial == serial:
            return self.revoked[i]
        return None

    @property
    def serials(self) -> frozenset[int]:
        return frozenset(e.serial for e in self.revoked)

    def check_current(self, now: int) -> None:
        """A list past its nextUpdate is stale (RFC 5280 §6.3.3 (a)(2)): revocation status
        is then unknown, and a node refuses peers rather than trust an old answer."""
        if now + CLOCK_SKEW_S < self.this_update:
            raise RevocationListError("this_update", "list is not valid yet (check clocks)")
        if now >= self.next_update:
            raise RevocationListError(
                "next_update", f"list number {self.number} is stale since {self.next_update}; "
                "the CA must publish a new one (pqfed ca crl --ca DIR --out FILE)")


@dataclass
class CrlVersionGuard:
    """The rollback rule: having accepted list number N, refuse any list numbered below N, and
    refuse a list numbered N whose content differs (two different lists under one number mean
    the CA key signed conflicting statements, or someone replays an old signature).

    Not thread-safe; one per trust store (a sidecar's reload loop)."""

    number: int = -1
    digest: bytes = b""

    def admit(self, crl: RevocationList) -> bool:
        """True if `crl` is newer than what was seen (the caller should switch to it), False if
        it is the very list already in use. Raises RevocationListError on a rollback."""
        if crl.number < self.number:
            raise RevocationListError(
                "number", f"{crl.number} is older than the list {self.number} already seen "
                "(rollback refused)")
        if crl.number == self.number:
            if crl.digest != self.digest:
                raise RevocationListError(
                    "number", f"a different list with the same number {crl.number} was seen "
                    "before (conflicting lists refused; the CA must issue a higher number)")
            return False
        self.number, self.digest = crl.number, crl.digest
        return True
