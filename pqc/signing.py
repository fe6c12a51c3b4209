"""Per-update signatures: the sender signs a manifest that binds the digest of each model
update to (federation, round, sender, size); the receiver verifies before using it.

The manifest, not the multi-megabyte update, is what ML-DSA signs: FIPS 204 signs any
message, but hashing once with SHA3-256 lets the digest double as the audit log's key and
keeps signing time independent of the model size.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from pqfed.pqc.armor import armor, unarmor
from pqfed.pqc.backends import get_backend
from pqfed.pqc.encoding import Reader, Writer
from pqfed.pqc.errors import CertificateError, DecodeError, InvalidSignature, UpdateRejected
from pqfed.pqc.identity import Certificate, Identity, Role, TrustAnchor

UPDATE_CONTEXT = b"pqfed/update/v1"
DIGEST_LEN = 32
MANIFEST_VERSION = 1


def update_digest(payload: bytes) -> bytes:
    return hashlib.sha3_256(payload).digest()


@dataclass(frozen=True, slots=True)
class UpdateManifest:
    federation: str
    job: str
    round: int
    node_id: str
    digest: bytes
    size: int
    timestamp: int

    def to_bytes(self) -> bytes:
        return (
            Writer().u16(MANIFEST_VERSION).text(self.federation).text(self.job)
            .u32(self.round).text(self.node_id).raw(self.digest).u64(self.size)
            .u64(self.timestamp).getvalue()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UpdateManifest:
        r = Reader(data, "update_manifest")
        version = r.u16("version")
        if version != MANIFEST_VERSION:
            raise DecodeError("update_manifest.version", f"{version} is not {MANIFEST_VERSION}")
        out = cls(r.text("federation", 1, 63), r.text("job", 1, 253), r.u32("round"),
                  r.text("node_id", 1, 63), r.raw(DIGEST_LEN, "digest"), r.u64("size"),
                  r.u64("timestamp"))
        r.finish()
        return out


@dataclass(frozen=True, slots=True)
class SignedUpdate:
    """Manifest + signature + the signer's certificate (so the receiver needs only the CA)."""

    manifest: UpdateManifest
    signature: bytes
    certificate: Certificate

    def to_bytes(self) -> bytes:
        return (
            Writer().vec16(self.manifest.to_bytes()).vec16(self.signature)
            .vec16(self.certificate.to_bytes()).getvalue()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedUpdate:
        r = Reader(data, "signed_update")
        manifest = UpdateManifest.from_bytes(r.vec16("manifest", 1, 1024))
        signature = r.vec16("signature", 1, 8192)
        cert = Certificate.from_bytes(r.vec16("certificate", 1, 16384))
        r.finish()
        return cls(manifest, signature, cert)

    def to_text(self) -> str:
        return armor("PQFED SIGNED UPDATE", self.to_bytes())

    @classmethod
    def from_text(cls, text: str) -> SignedUpdate:
        return cls.from_bytes(unarmor("PQFED SIGNED UPDATE", text))


def sign_update(identity: Identity, job: str, round_number: int, payload: bytes) -> SignedUpdate:
    cert = identity.certificate
    manifest = UpdateManifest(cert.federation, job, round_number, cert.node_id,
                              update_digest(payload), len(payload), int(time.time()))
    return SignedUpdate(manifest, identity.sign(manifest.to_bytes(), UPDATE_CONTEXT), cert)


def verify_update(
    signed: SignedUpdate, payload: bytes, trust: TrustAnchor, *, job: str, round_number: int,
    roles: tuple[Role, ...] = (Role.CLIENT, Role.EDGE, Role.AGGREGATOR),
    node_id: str | None = None,
) -> UpdateManifest:
    """Checks signer certificate, signature, job, round, digest and size. Raises UpdateRejected
    naming what did not match; returns the manifest when everything holds."""
    m = signed.manifest
    who = m.node_id
    try:
        trust.verify(signed.certificate, roles=roles, node_id=node_id)
    except CertificateError as exc:
        raise UpdateRejected(who, f"signer certificate: {exc}") from None
    if signed.certificate.node_id != m.node_id:
        raise UpdateRejected(who, "manifest node_id differs from the signer's certificate")
    try:
        get_backend().sig_verify(signed.certificate.sig_algorithm, signed.certificate.public_key,
                                 m.to_bytes(), signed.signature, UPDATE_CONTEXT)
    except InvalidSignature:
        raise UpdateRejected(who, "signature does not verify") from None
    if m.job != job:
        raise UpdateRejected(who, f"manifest job {m.job!r} is not {job!r}")
    if m.round != round_number:
        raise UpdateRejected(who, f"manifest round {m.round} is not the current round "
                                  f"{round_number} (replayed update?)")
    if m.size != len(payload) or m.digest != update_digest(payload):
        raise UpdateRejected(who, "update bytes do not match the signed digest (tampered)")
    return m
