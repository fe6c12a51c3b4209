"""Federation identities: a per-federation CA (ML-DSA-65) and small node certificates.

The certificate is deliberately tiny compared to X.509: the fields a federation needs
(federation, node id, role, public key, validity, serial, issuer key id) in a strict binary
encoding, signed by the CA with a domain-separated ML-DSA context string (FIPS 204 §5.2).
The CA also signs revocation lists (revocation.py, context `pqfed/crl/v1`); a `TrustAnchor`
holds the root and the newest verified list, and checks the root's own validity, path
validity (RFC 5280 §6.1.3: no certificate outlives its issuer) and revocation on every use.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pqfed.pqc.algorithms import DEFAULT_SIGNATURE, SIG_BY_CODE, SIG_CODES, SIG_SIZES
from pqfed.pqc.armor import armor, unarmor
from pqfed.pqc.backends import SigPrivateKey, get_backend
from pqfed.pqc.encoding import Reader, Writer
from pqfed.pqc.errors import (
    CertificateError,
    DecodeError,
    InvalidSignature,
    RevocationListError,
)
from pqfed.pqc.revocation import (
    CRL_CONTEXT,
    RevocationList,
    RevocationReason,
    RevokedCertificate,
)

CERT_VERSION = 1
CERT_CONTEXT = b"pqfed/cert/v1"
KEY_ID_LEN = 16
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


class Role(enum.IntEnum):
    CA = 0
    AGGREGATOR = 1
    CLIENT = 2
    EDGE = 3  # edge aggregator in hierarchical mode: a client upstream, an aggregator downstream
    # The Kubernetes operator: reads an aggregator's progress and checkpoint through its
    # sidecar, never the Fleet API, and signs no model updates.
    OPERATOR = 4

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls[value.upper()]
        except KeyError:
            names = ", ".join(r.name.lower() for r in cls if r is not cls.CA)
            raise ValueError(f"role {value!r} is not one of: {names}") from None


def key_id(public_key: bytes) -> bytes:
    """Issuer/subject key identifier: the first 16 bytes of SHA3-256 over the public key."""
    return hashlib.sha3_256(public_key).digest()[:KEY_ID_LEN]


def check_name(field_name: str, value: str) -> str:
    if not _NAME.match(value):
        raise CertificateError(
            field_name,
            f"{value!r} must be 1-63 lowercase letters, digits, '-' or '.', "
            "starting and ending with a letter or digit (a DNS label, like Kubernetes names)",
        )
    return value


@dataclass(frozen=True, slots=True)
class Certificate:
    """A signed binding of (federation, node id, role) to a signature public key."""

    federation: str
    node_id: str
    role: Role
    sig_algorithm: str
    public_key: bytes
    not_before: int
    not_after: int
    serial: int
    issuer: bytes
    signature: bytes = field(default=b"", repr=False)
    version: int = CERT_VERSION

    def tbs_bytes(self) -> bytes:
        """The to-be-signed encoding: every field but the signature."""
        return (
            Writer()
            .u16(self.version)
            .u64(self.serial)
            .text(self.federation)
            .text(self.node_id)
            .u8(int(self.role))
            .u16(SIG_CODES[self.sig_algorithm])
            .vec16(self.public_key)
            .u64(self.not_before)
            .u64(self.not_after)
            .raw(self.issuer)
            .getvalue()
        )

    def to_bytes(self) -> bytes:
        return Writer().raw(self.tbs_bytes()).vec16(self.signature).getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Certificate:
        r = Reader(data, "certificate")
        version = r.u16("version")
        if version != CERT_VERSION:
            raise DecodeError("certificate.version", f"{version} is not {CERT_VERSION}")
        serial = r.u64("serial")
        federation = r.text("federation", 1, 63)
        node_id = r.text("node_id", 1, 63)
        role_code = r.u8("role")
        try:
            role = Role(role_code)
        except ValueError:
            raise DecodeError("certificate.role", f"unknown role code {role_code}") from None
        code = r.u16("sig_algorithm")
        if code not in SIG_BY_CODE:
            raise DecodeError("certificate.sig_algorithm", f"unknown algorithm code {code:#06x}")
        alg = SIG_BY_CODE[code]
        size = SIG_SIZES[alg].public_key
        public_key = r.vec16("public_key", size, size)
        not_before = r.u64("not_before")
        not_after = r.u64("not_after")
        issuer = r.raw(KEY_ID_LEN, "issuer")
        # The CA's algorithm is not known yet; bound by the largest ML-DSA signature.
        signature = r.vec16("signature", 1, max(s.signature for s in SIG_SIZES.values()))
        r.finish()
        return cls(federation, node_id, role, alg, public_key, not_before, not_after, serial,
                   issuer, signature, version)

    def to_pem(self) -> str:
        return armor("PQFED CERTIFICATE", self.to_bytes())

    @classmethod
    def from_pem(cls, text: str) -> Certificate:
        return cls.from_bytes(unarmor("PQFED CERTIFICATE", text))

    @property
    def key_id(self) -> bytes:
        return key_id(self.public_key)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha3_256(self.to_bytes()).hexdigest()


@functools.lru_cache(maxsize=4096)
def _ca_signed(algorithm: str, ca_public_key: bytes, tbs: bytes, signature: bytes) -> bool:
    """Whether the CA signed `tbs`. Cached: the answer for given bytes never changes, and an
    aggregator sees the same node certificates in every handshake and every signed update.
    Validity time, revocation and role are checked on every use, outside the cache."""
    try:
        get_backend().sig_verify(algorithm, ca_public_key, tbs, signature, CERT_CONTEXT)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True, slots=True)
class TrustAnchor:
    """What a node trusts: its federation's CA root certificate, plus the newest revocation
    list it has verified (None: nothing revoked yet). The list's signature is checked when
    the anchor is built, so an anchor never holds a list the root did not sign."""

    root: Certificate
    crl: RevocationList | None = None

    def __post_init__(self) -> None:
        if self.crl is not None:
            verify_crl_signature(self.root, self.crl)

    @property
    def anchor(self) -> TrustAnchor:
        """Itself (a TrustStore's `anchor` is its newest one): code taking either asks this."""
        return self

    @property
    def revoked(self) -> frozenset[int]:
        return self.crl.serials if self.crl is not None else frozenset()

    def with_crl(self, crl: RevocationList) -> TrustAnchor:
        """The same root with `crl` (verified against the root, or RevocationListError)."""
        return TrustAnchor(self.root, crl)

    def revocation(self, cert: Certificate) -> RevokedCertificate | None:
        """The list's entry for `cert`, if it is one of this CA's revoked certificates."""
        if self.crl is None or cert.issuer != self.root.key_id:
            return None
        return self.crl.lookup(cert.serial)

    def check_root(self, now: float | None = None) -> None:
        """The root itself must be within its validity window (RFC 5280 §6.1.3 (a)(2) for
        every certificate of the path, the trust anchor's included)."""
        t = int(time.time() if now is None else now)
        if t < self.root.not_before:
            raise CertificateError("root.not_before", "the federation CA is not valid yet "
                                   "(check clocks)")
        if t >= self.root.not_after:
            raise CertificateError("root.not_after", "the federation CA expired; create a new "
                                   "CA and re-issue every node certificate")

    def verify(
        self,
        cert: Certificate,
        *,
        now: float | None = None,
        roles: tuple[Role, ...] | None = None,
        node_id: str | None = None,
        signed_at: float | None = None,
    ) -> Certificate:
        """Checks `cert` was issued by this CA for this federation and is usable now.

        With `signed_at` (checking a signature made in the past, e.g. an audit log entry) the
        root and certificate validity are checked at that time, the revocation list need not
        be current, and a revoked certificate still counts for signatures made before its
        revocation date, unless the reason is keyCompromise (then the key may have signed
        anything, at any claimed time). Without it, any listed serial is refused and the list
        must be current (not past its nextUpdate).

        Raises CertificateError naming the failing field. Returns the certificate.
        """
        live = signed_at is None
        t = int(signed_at if signed_at is not None else time.time() if now is None else now)
        self.check_root(t)
        if cert.federation != self.root.federation:
            raise CertificateError(
                "federation", f"{cert.federation!r} is not {self.root.federation!r}"
            )
        if cert.issuer != self.root.key_id:
            raise CertificateError("issuer", "not issued by this federation's CA")
        if cert.role is Role.CA:
            raise CertificateError("role", "a CA certificate cannot identify a node")
        if roles is not None and cert.role not in roles:
            allowed = ", ".join(r.name.lower() for r in roles)
            raise CertificateError("role", f"{cert.role.name.lower()} is not one of: {allowed}")
        if node_id is not None and cert.node_id != node_id:
            raise CertificateError("node_id", f"{cert.node_id!r} is not the expected {node_id!r}")
        if cert.not_after > self.root.not_after:
            raise CertificateError("not_after", "certificate outlives the CA that issued it; "
                                   "issue a new one within the CA's validity")
        if t < cert.not_before:
            raise CertificateError("not_before", "certificate is not valid yet (check clocks)")
        if t >= cert.not_after:
            raise CertificateError("not_after", "certificate expired; issue a new one")
        if self.crl is not None:
            if live:
                try:
                    self.crl.check_current(t)
                except RevocationListError as exc:
                    raise CertificateError("crl", f"revocation status unknown: {exc}") from None
            entry = self.crl.lookup(cert.serial)
            if entry is not None and (live or entry.reason is RevocationReason.KEY_COMPROMISE
                                      or t >= entry.revoked_at):
                raise CertificateError("serial", f"{cert.node_id!r}: {entry.describe()}")
        if not _ca_signed(self.root.sig_algorithm, self.root.public_key, cert.tbs_bytes(),
                          cert.signature):
            raise CertificateError("signature", "CA signature does not verify")
        return cert


@functools.lru_cache(maxsize=64)
def _crl_signed(algorithm: str, ca_public_key: bytes, tbs: bytes, signature: bytes) -> bool:
    try:
        get_backend().sig_verify(algorithm, ca_public_key, tbs, signature, CRL_CONTEXT)
    except InvalidSignature:
        return False
    return True


def verify_crl_signature(root: Certificate, crl: RevocationList) -> RevocationList:
    """Checks that `root`'s CA issued `crl` (federation, issuer key id, algorithm, ML-DSA
    signature under the CRL context). Freshness and rollback are the holder's business
    (RevocationList.check_current, CrlVersionGuard). Raises RevocationListError."""
    if crl.federation != root.federation:
        raise RevocationListError("federation",
                                  f"{crl.federation!r} is not {root.federation!r}")
    if crl.issuer != root.key_id:
        raise RevocationListError("issuer", "not issued by this federation's CA")
    if crl.sig_algorithm != root.sig_algorithm:
        raise RevocationListError("sig_algorithm",
                                  f"{crl.sig_algorithm} is not the CA's {root.sig_algorithm}")
    if not _crl_signed(root.sig_algorithm, root.public_key, crl.tbs_bytes(), crl.signature):
        raise RevocationListError("signature", "CA signature does not verify")
    return crl


@dataclass(frozen=True, slots=True)
class Identity:
    """A node's certificate and the matching signing key."""

    certificate: Certificate
    key: SigPrivateKey = field(repr=False)

    def sign(self, message: bytes, context: bytes) -> bytes:
        return self.key.sign(message, context)

    def private_key_pem(self) -> str:
        body = (
            Writer()
            .u16(SIG_CODES[self.key.algorithm])
            .vec16(self.key.private_bytes())
            .getvalue()
        )
        return armor("PQFED PRIVATE KEY", body)

    @classmethod
    def load(cls, cert_pem: str, key_pem: str) -> Identity:
        cert = Certificate.from_pem(cert_pem)
        r = Reader(unarmor("PQFED PRIVATE KEY", key_pem), "private_key")
        code = r.u16("sig_algorithm")
        if SIG_BY_CODE.get(code) != cert.sig_algorithm:
            raise DecodeError("private_key.sig_algorithm", "does not match the certificate")
        raw = r.vec16("key", 1, 8192)
        r.finish()
        key = get_backend().sig_load_private(cert.sig_algorithm, raw)
        if key.public_bytes() != cert.public_key:
            raise CertificateError("public_key", "private key does not match the certificate")
        return cls(cert, key)

    @classmethod
    def load_files(cls, cert_path: Path, key_path: Path) -> Identity:
        return cls.load(cert_path.read_text(), key_path.read_text())

    def save(self, cert_path: Path, key_path: Path) -> None:
        cert_path.write_text(self.certificate.to_pem())
        key_path.touch(mode=0o600)
        key_path.write_text(self.private_key_pem())


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """The per-federation CA. Its key stays with the operator (a Kubernetes Secret)."""

    identity: Identity

    @property
    def root(self) -> Certificate:
        return self.identity.certificate

    @property
    def trust(self) -> TrustAnchor:
        return TrustAnchor(self.root)

    def sign_crl(
        self, number: int, revoked: tuple[RevokedCertificate, ...] | list[RevokedCertificate]
        = (), *, validity_s: int = 7 * 86400, this_update: int | None = None,
    ) -> RevocationList:
        """A revocation list numbered `number`, valid from now for `validity_s` (its
        nextUpdate), never past the CA's own not_after."""
        if number < 0:
            raise RevocationListError("number", "must be >= 0")
        start = int(time.time()) if this_update is None else this_update
        end = min(start + validity_s, self.root.not_after)
        entries = tuple(sorted(revoked, key=lambda e: e.serial))
        crl = RevocationList(self.root.federation, self.root.key_id, self.root.sig_algorithm,
                             number, start, end, entries)
        return replace(crl, signature=self.identity.sign(crl.tbs_bytes(), CRL_CONTEXT))

    def revoke(
        self, previous: RevocationList | None, serial: int,
        reason: RevocationReason = RevocationReason.UNSPECIFIED, *,
        validity_s: int = 7 * 86400, now: int | None = None,
    ) -> RevocationList:
        """The next list: `previous`'s entries plus `serial`, numbered one higher. Revoking a
        serial again keeps its first entry (its date and reason stay as first published)."""
        t = int(time.time()) if now is None else now
        entries = {e.serial: e for e in (previous.revoked if previous else ())}
        entries.setdefault(serial, RevokedCertificate(serial, t, reason))
        number = previous.number + 1 if previous else 1
        return self.sign_crl(number, list(entries.values()), validity_s=validity_s,
                             this_update=t)

    @classmethod
    def generate(
        cls, federation: str, *, algorithm: str = DEFAULT_SIGNATURE,
        validity_s: int = 365 * 86400,
    ) -> CertificateAuthority:
        check_name("federation", federation)
        key = get_backend().sig_generate(algorithm)
        now = int(time.time())
        public = key.public_bytes()
        root = Certificate(federation, "ca", Role.CA, algorithm, public, now - 300,
                           now + validity_s, secrets.randbits(63), key_id(public))
        signed = replace(root, signature=key.sign(root.tbs_bytes(), CERT_CONTEXT))
        return cls(Identity(signed, key))

    def issue(
        self, node_id: str, role: Role, public_key: bytes, *,
        algorithm: str = DEFAULT_SIGNATURE, validity_s: int = 30 * 86400,
        not_before: int | None = None,
    ) -> Certificate:
        check_name("node_id", node_id)
        if role is Role.CA:
            raise CertificateError("role", "node certificates cannot have the CA role")
        if len(public_key) != SIG_SIZES[algorithm].public_key:
            raise CertificateError("public_key", f"wrong length for {algorithm}")
        start = int(time.time()) - 300 if not_before is None else not_before
        if start + validity_s > self.root.not_after:
            raise CertificateError(
                "not_after", f"a {validity_s} s certificate from {start} would outlive the CA "
                f"(valid until {self.root.not_after}); shorten the validity or renew the CA")
        cert = Certificate(self.root.federation, node_id, role, algorithm, public_key, start,
                           start + validity_s, secrets.randbits(63), self.root.key_id)
        return replace(cert, signature=self.identity.sign(cert.tbs_bytes(), CERT_CONTEXT))

    def new_identity(self, node_id: str, role: Role, *, algorithm: str = DEFAULT_SIGNATURE,
                     validity_s: int = 30 * 86400) -> Identity:
        key = get_backend().sig_generate(algorithm)
        cert = self.issue(node_id, role, key.public_bytes(), algorithm=algorithm,
                          validity_s=validity_s)
        return Identity(cert, key)

