"""Signed manifests, both directions of a round.

Uplink (per-update signatures): the sender signs a manifest that binds the digest of each
model update to (federation, job, round, sender, size) and to the weight the aggregator gives
it (`num_examples`, and `contributors`: 1 for a client, the clients behind an edge's
aggregate); the receiver verifies before using it, and takes the weight from the manifest only.

Downlink (model signatures): the central aggregator signs (federation, job, epoch, round,
model version, model digest) once per model version; edges forward the signature unchanged
and clients verify it against the pinned aggregator identity before training, so an edge in
between can neither alter the model nor replay an older one.

A manifest, not the multi-megabyte model, is what ML-DSA signs: FIPS 204 signs any message,
but hashing once with SHA3-256 lets the digest double as the audit log's key and keeps
signing time independent of the model size. Each direction has its own FIPS 204 context
string, so a signature made for one can never verify as the other.

Encodings (big-endian, pqc/encoding.py: `text` is a u8 length + UTF-8, `raw` fixed length):

  UpdateManifest v2: u16 version=2 | text federation | text job | u32 round | text node_id |
                     raw[32] digest | u64 size | u64 timestamp | u64 num_examples |
                     u32 contributors
  ModelManifest v1:  u16 version=1 | text federation | text job | raw[8] epoch | u32 round |
                     u32 model_version | raw[32] digest | u64 timestamp

Version 1 update manifests (no signed weight) are refused: the weight must be signed.

Site-held keys (tls13 jobs, docs/pki.md): a site enrolled through a PKCS#10 request holds an
ML-DSA-65 key and the X.509 certificate the job's CA issued for it, and no pqfed-format
identity. It signs the same UpdateManifest under the same context with that key
(`sign_update_x509`); the envelope carries its DER certificate instead of a pqfed one:

  X509SignedUpdate:  vec16 manifest | vec16 signature | vec16 certificate (X.509 DER)

The aggregator checks the certificate against the job's X.509 CA and CRL (RFC 5280 path of
length one, the profile of pqc/pki/profile.py: role client, EKU clientAuth), that its URI's
node id is the manifest's sender and one of the job's external clients, then the signature
and the manifest as for the pqfed form (`verify_update_x509`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from pqfed.pqc.armor import armor, unarmor
from pqfed.pqc.backends import get_backend
from pqfed.pqc.encoding import Reader, Writer
from pqfed.pqc.errors import (
    CertificateError,
    DecodeError,
    InvalidSignature,
    PqcError,
    UpdateRejected,
)
from pqfed.pqc.identity import Certificate, Identity, Role, TrustAnchor
from pqfed.pqc.pki.profile import NodeCertificate, Usage, check_ml_dsa_65_key, read_node_uri

UPDATE_CONTEXT = b"pqfed/update/v1"
DIGEST_LEN = 32
MANIFEST_VERSION = 2
MODEL_CONTEXT = b"pqfed/model/v1"
MODEL_MANIFEST_VERSION = 1
EPOCH_LEN = 8
MAX_WEIGHT = 2**63 - 1


class ModelRejected(PqcError):
    """A signed global model failed verification at a node and must not be trained on."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"model rejected: {reason}")
        self.reason = reason


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
    num_examples: int = 0  # the aggregation weight (FedAvg's); signed, so never altered
    contributors: int = 1  # how many clients this update stands for (minClients counts it)

    def to_bytes(self) -> bytes:
        return (
            Writer().u16(MANIFEST_VERSION).text(self.federation).text(self.job)
            .u32(self.round).text(self.node_id).raw(self.digest).u64(self.size)
            .u64(self.timestamp).u64(self.num_examples).u32(self.contributors).getvalue()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UpdateManifest:
        r = Reader(data, "update_manifest")
        version = r.u16("version")
        if version != MANIFEST_VERSION:
            raise DecodeError("update_manifest.version",
                              f"{version} is not {MANIFEST_VERSION} (version 1 manifests do "
                              "not sign the update's weight; upgrade the sender)")
        out = cls(r.text("federation", 1, 63), r.text("job", 1, 253), r.u32("round"),
                  r.text("node_id", 1, 63), r.raw(DIGEST_LEN, "digest"), r.u64("size"),
                  r.u64("timestamp"), r.u64("num_examples"), r.u32("contributors"))
        r.finish()
        if out.num_examples > MAX_WEIGHT:
            raise DecodeError("update_manifest.num_examples", f"{out.num_examples} > {MAX_WEIGHT}")
        return out


def _envelope(manifest: bytes, signature: bytes, certificate: Certificate) -> bytes:
    """A signed manifest on the wire: manifest, signature, signer's certificate (vec16 each)."""
    return Writer().vec16(manifest).vec16(signature).vec16(certificate.to_bytes()).getvalue()


def _open_envelope(data: bytes, what: str) -> tuple[bytes, bytes, Certificate]:
    r = Reader(data, what)
    manifest = r.vec16("manifest", 1, 1024)
    signature = r.vec16("signature", 1, 8192)
    cert = Certificate.from_bytes(r.vec16("certificate", 1, 16384))
    r.finish()
    return manifest, signature, cert


@dataclass(frozen=True, slots=True)
class SignedUpdate:
    """Manifest + signature + the signer's certificate (so the receiver needs only the CA)."""

    manifest: UpdateManifest
    signature: bytes
    certificate: Certificate

    def to_bytes(self) -> bytes:
        return _envelope(self.manifest.to_bytes(), self.signature, self.certificate)

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedUpdate:
        manifest, signature, cert = _open_envelope(data, "signed_update")
        return cls(UpdateManifest.from_bytes(manifest), signature, cert)

    def to_text(self) -> str:
        return armor("PQFED SIGNED UPDATE", self.to_bytes())

    @classmethod
    def from_text(cls, text: str) -> SignedUpdate:
        return cls.from_bytes(unarmor("PQFED SIGNED UPDATE", text))


def sign_update(identity: Identity, job: str, round_number: int, payload: bytes, *,
                num_examples: int = 0, contributors: int = 1) -> SignedUpdate:
    """Signs `payload` for (job, round) with its aggregation weight (`num_examples`) and the
    number of clients it stands for (`contributors`)."""
    if not 0 <= num_examples <= MAX_WEIGHT:
        raise ValueError(f"num_examples: {num_examples} is not in [0, {MAX_WEIGHT}]")
    if not 1 <= contributors <= 0xFFFFFFFF:
        raise ValueError(f"contributors: {contributors} must be >= 1")
    cert = identity.certificate
    manifest = UpdateManifest(cert.federation, job, round_number, cert.node_id,
                              update_digest(payload), len(payload), int(time.time()),
                              num_examples, contributors)
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
    return _check_manifest(m, payload, job, round_number)


def _check_manifest(m: UpdateManifest, payload: bytes, job: str, round_number: int
                    ) -> UpdateManifest:
    """What both forms check after the signature: job, round, digest and size."""
    who = m.node_id
    if m.job != job:
        raise UpdateRejected(who, f"manifest job {m.job!r} is not {job!r}")
    if m.round != round_number:
        raise UpdateRejected(who, f"manifest round {m.round} is not the current round "
                                  f"{round_number} (replayed update?)")
    if m.size != len(payload) or m.digest != update_digest(payload):
        raise UpdateRejected(who, "update bytes do not match the signed digest (tampered)")
    return m


# ---------------------------------------------------------------- site-held X.509 keys --

class X509Verifier(Protocol):
    """`X509TrustAnchor`, or a store that re-reads the CRL (`pqc.truststore.X509TrustStore`)."""

    def verify(self, cert: x509.Certificate, *, now: float | None = None,
               roles: tuple[Role, ...] | None = None, node_id: str | None = None,
               usage: Usage | None = None) -> NodeCertificate: ...


@dataclass(frozen=True, slots=True)
class X509SignedUpdate:
    """Manifest + signature by a site-held ML-DSA-65 key + that site's X.509 certificate."""

    manifest: UpdateManifest
    signature: bytes
    certificate: x509.Certificate

    def to_bytes(self) -> bytes:
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return (Writer().vec16(self.manifest.to_bytes()).vec16(self.signature).vec16(der)
                .getvalue())

    @classmethod
    def from_bytes(cls, data: bytes) -> X509SignedUpdate:
        r = Reader(data, "x509_signed_update")
        manifest = r.vec16("manifest", 1, 1024)
        signature = r.vec16("signature", 1, 8192)
        der = r.vec16("certificate", 1, 16384)
        r.finish()
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise DecodeError("x509_signed_update.certificate", f"not X.509 DER: {exc}") from None
        return cls(UpdateManifest.from_bytes(manifest), signature, cert)


def sign_update_x509(key: mldsa.MLDSA65PrivateKey, certificate: x509.Certificate, job: str,
                     round_number: int, payload: bytes, *, num_examples: int = 0,
                     contributors: int = 1) -> X509SignedUpdate:
    """`sign_update` with a site-held key: the manifest names the node of the certificate's
    URI, and the key must be the certificate's."""
    if not 0 <= num_examples <= MAX_WEIGHT:
        raise ValueError(f"num_examples: {num_examples} is not in [0, {MAX_WEIGHT}]")
    if not 1 <= contributors <= 0xFFFFFFFF:
        raise ValueError(f"contributors: {contributors} must be >= 1")
    if certificate.public_key() != key.public_key():
        raise CertificateError("public_key", "the key is not the certificate's; use the key "
                                             "`pqfed ca csr` made for this certificate")
    uri = read_node_uri(certificate)
    manifest = UpdateManifest(uri.federation, job, round_number, uri.node_id,
                              update_digest(payload), len(payload), int(time.time()),
                              num_examples, contributors)
    return X509SignedUpdate(manifest, key.sign(manifest.to_bytes(), UPDATE_CONTEXT),
                            certificate)


def verify_update_x509(
    signed: X509SignedUpdate, payload: bytes, trust: X509Verifier, *, job: str,
    round_number: int, node_ids: Collection[str], roles: tuple[Role, ...] = (Role.CLIENT,),
) -> UpdateManifest:
    """An update signed with a site-held key: the certificate chains to the job's X.509 CA, is
    not on its CRL, is a client's (role and EKU clientAuth) and names the manifest's sender,
    which must be one of `node_ids` (the job's external clients); then the signature, job,
    round, digest and size. Raises UpdateRejected naming what did not match."""
    m = signed.manifest
    who = m.node_id
    if who not in node_ids:
        raise UpdateRejected(who, "node_id: not one of the job's externalClients ("
                                  f"{', '.join(sorted(node_ids)) or 'none'}); only they sign "
                                  "with site-held X.509 keys")
    try:
        node = trust.verify(signed.certificate, roles=roles, node_id=who, usage=Usage.CLIENT)
    except CertificateError as exc:
        raise UpdateRejected(who, f"signer certificate: {exc.field}: {exc.reason}") from None
    if m.federation != node.federation:
        raise UpdateRejected(who, f"manifest federation {m.federation!r} is not the signer's "
                                  f"{node.federation!r}")
    try:
        check_ml_dsa_65_key(signed.certificate.public_key()).verify(
            signed.signature, m.to_bytes(), UPDATE_CONTEXT)
    except CryptoInvalidSignature:
        raise UpdateRejected(who, "signature does not verify") from None
    return _check_manifest(m, payload, job, round_number)


# ---------------------------------------------------------------- downlink ---------------

@dataclass(frozen=True, slots=True)
class ModelManifest:
    """What the central aggregator vouches for: the model of (job, epoch, round, version)."""

    federation: str
    job: str
    epoch: bytes  # random per aggregator start: a restarted aggregator starts a new epoch
    round: int
    version: int  # the model version within the epoch (the public model's, or the round)
    digest: bytes  # services.downlink.weights_digest of the weights nodes train from
    timestamp: int

    def to_bytes(self) -> bytes:
        return (
            Writer().u16(MODEL_MANIFEST_VERSION).text(self.federation).text(self.job)
            .raw(self.epoch).u32(self.round).u32(self.version).raw(self.digest)
            .u64(self.timestamp).getvalue()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelManifest:
        r = Reader(data, "model_manifest")
        version = r.u16("version")
        if version != MODEL_MANIFEST_VERSION:
            raise DecodeError("model_manifest.version",
                              f"{version} is not {MODEL_MANIFEST_VERSION}")
        out = cls(r.text("federation", 1, 63), r.text("job", 1, 253), r.raw(EPOCH_LEN, "epoch"),
                  r.u32("round"), r.u32("model_version"), r.raw(DIGEST_LEN, "digest"),
                  r.u64("timestamp"))
        r.finish()
        return out


@dataclass(frozen=True, slots=True)
class SignedModel:
    """Model manifest + the aggregator's signature + its certificate."""

    manifest: ModelManifest
    signature: bytes
    certificate: Certificate

    def to_bytes(self) -> bytes:
        return _envelope(self.manifest.to_bytes(), self.signature, self.certificate)

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedModel:
        manifest, signature, cert = _open_envelope(data, "signed_model")
        return cls(ModelManifest.from_bytes(manifest), signature, cert)


def sign_model(identity: Identity, job: str, epoch: bytes, round_number: int, version: int,
               digest: bytes) -> SignedModel:
    """The aggregator's signature over one model version (once per version, not per node)."""
    if len(epoch) != EPOCH_LEN or len(digest) != DIGEST_LEN:
        raise ValueError(f"epoch must be {EPOCH_LEN} bytes and digest {DIGEST_LEN} bytes")
    cert = identity.certificate
    manifest = ModelManifest(cert.federation, job, epoch, round_number, version, digest,
                             int(time.time()))
    return SignedModel(manifest, identity.sign(manifest.to_bytes(), MODEL_CONTEXT), cert)


def verify_model(signed: SignedModel, trust: TrustAnchor, *, job: str, signer: str,
                 round_number: int, digest: bytes) -> ModelManifest:
    """Checks the signer is the pinned aggregator (`signer`: its node id) of this CA, the
    signature, the job, the round and that `digest` (of the weights received) is the signed
    one. Raises ModelRejected naming what did not match. Freshness across messages (no older
    version of the same epoch) is the caller's: it holds what it accepted before."""
    m = signed.manifest
    try:
        trust.verify(signed.certificate, roles=(Role.AGGREGATOR,), node_id=signer)
    except CertificateError as exc:
        raise ModelRejected(f"signer certificate: {exc}") from None
    try:
        get_backend().sig_verify(signed.certificate.sig_algorithm, signed.certificate.public_key,
                                 m.to_bytes(), signed.signature, MODEL_CONTEXT)
    except InvalidSignature:
        raise ModelRejected("signature does not verify") from None
    if m.federation != signed.certificate.federation:
        raise ModelRejected(f"signed federation {m.federation!r} is not the signer's")
    if m.job != job:
        raise ModelRejected(f"signed job {m.job!r} is not {job!r}")
    if m.round != round_number:
        raise ModelRejected(f"signed round {m.round} is not the announced round {round_number} "
                            "(replayed model?)")
    if m.digest != digest:
        raise ModelRejected("model weights do not match the aggregator's signed digest "
                            "(altered in transit)")
    return m
