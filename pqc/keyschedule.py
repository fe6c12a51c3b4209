"""Key schedule: X-Wing-style hybrid combiner + the TLS 1.3 key schedule (RFC 8446 §7.1).

* Hybrid shared secret (draft-connolly-cfrg-xwing-kem §5.3): the ML-KEM and X25519 secrets are
  combined as SHA3-256(ss_M || ss_X || ct_X || pk_X || XWingLabel). Including the X25519
  ciphertext (the server's ephemeral public key) and the client's X25519 public key makes the
  combiner secure as long as either component is (IND-CCA robustness of the combination).
* Key schedule: HKDF-Extract/Expand (RFC 5869) with HKDF-Expand-Label and Derive-Secret exactly
  as in RFC 8446 §7.1, but with the label prefix "pqfed1 " instead of "tls13 " so that no key is
  ever valid in both protocols (domain separation).
* Traffic keys (RFC 8446 §7.3) and key update (§7.2) use the same labels as TLS 1.3.

Group X25519_MLKEM768 is X-Wing (draft-connolly-cfrg-xwing-kem, the construction of draft -06
on) on the wire and in the combiner: pk = pk_M || pk_X, ct = ct_M || ct_X, the combiner above.
Only key generation differs in form: a key share samples ML-KEM's (d, z) and the X25519 key
directly instead of expanding a 32-byte seed with SHAKE-256 (same distribution; the seed is
X-Wing's compressed private-key format, which a one-use key share never stores). The draft's
own test vectors run through this combiner and our ML-KEM backends in tests/pqc/test_vectors.py.
X25519_MLKEM1024 uses the same combiner with ML-KEM-1024 (not X-Wing, which fixes ML-KEM-768).
Vector files: tests/pqc/vectors/{X-Wing,keyschedule}/.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from pqfed.pqc.encoding import Writer

XWING_LABEL = b"\\.//^\\"  # the 6-byte X-Wing label from the draft: \./ /^\


@dataclass(frozen=True, slots=True)
class KdfProfile:
    """The hash and the HKDF-Expand-Label prefix of one key schedule. pqfed1 is SHA-384 with
    "pqfed1 "; TLS13_SHA256 (RFC 8446's own labels) exists so that the RFC 8448 example
    handshake's published secrets can check this very code (tests/pqc/vectors/keyschedule/)."""

    hash_name: str
    hash_len: int
    label_prefix: bytes

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        return _HASHES[self.hash_name]()


_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha384": hashes.SHA384,
                                                  "sha256": hashes.SHA256}
PQFED1 = KdfProfile("sha384", 48, b"pqfed1 ")
TLS13_SHA256 = KdfProfile("sha256", 32, b"tls13 ")

LABEL_PREFIX = PQFED1.label_prefix
HASH_NAME = PQFED1.hash_name
HASH_LEN = PQFED1.hash_len


def xwing_combine(ss_mlkem: bytes, ss_x25519: bytes, ct_x25519: bytes, pk_x25519: bytes) -> bytes:
    """X-Wing combiner. For the classical baseline suite `ss_mlkem` is empty."""
    return hashlib.sha3_256(ss_mlkem + ss_x25519 + ct_x25519 + pk_x25519 + XWING_LABEL).digest()


def hkdf_extract(salt: bytes, ikm: bytes, profile: KdfProfile = PQFED1) -> bytes:
    # RFC 5869 §2.2: PRK = HMAC-Hash(salt, IKM); a zero-length salt is a string of HashLen zeros.
    return hmac.new(salt or bytes(profile.hash_len), ikm, profile.hash_name).digest()


def hkdf_expand_label(secret: bytes, label: bytes, context: bytes, length: int,
                      profile: KdfProfile = PQFED1) -> bytes:
    hkdf_label = (
        Writer().u16(length).vec8(profile.label_prefix + label).vec8(context).getvalue()
    )
    return HKDFExpand(profile.hash_algorithm(), length, hkdf_label).derive(secret)


def derive_secret(secret: bytes, label: bytes, transcript_hash: bytes,
                  profile: KdfProfile = PQFED1) -> bytes:
    return hkdf_expand_label(secret, label, transcript_hash, profile.hash_len, profile)


def transcript_hash_of(data: bytes, profile: KdfProfile = PQFED1) -> bytes:
    return hashlib.new(profile.hash_name, data).digest()


EMPTY_HASH = transcript_hash_of(b"")


@dataclass(frozen=True, slots=True)
class HandshakeSecrets:
    client_handshake: bytes
    server_handshake: bytes
    master: bytes


def handshake_secrets(shared_secret: bytes, hello_hash: bytes,
                      profile: KdfProfile = PQFED1) -> HandshakeSecrets:
    """RFC 8446 §7.1 from the Early Secret (no PSK) to the handshake traffic secrets."""
    zeros, empty = bytes(profile.hash_len), transcript_hash_of(b"", profile)
    early = hkdf_extract(b"", zeros, profile)
    handshake = hkdf_extract(derive_secret(early, b"derived", empty, profile), shared_secret,
                             profile)
    master = hkdf_extract(derive_secret(handshake, b"derived", empty, profile), zeros, profile)
    return HandshakeSecrets(
        client_handshake=derive_secret(handshake, b"c hs traffic", hello_hash, profile),
        server_handshake=derive_secret(handshake, b"s hs traffic", hello_hash, profile),
        master=master,
    )


@dataclass(frozen=True, slots=True)
class ApplicationSecrets:
    client: bytes
    server: bytes
    exporter: bytes


def application_secrets(master: bytes, server_finished_hash: bytes,
                        profile: KdfProfile = PQFED1) -> ApplicationSecrets:
    return ApplicationSecrets(
        client=derive_secret(master, b"c ap traffic", server_finished_hash, profile),
        server=derive_secret(master, b"s ap traffic", server_finished_hash, profile),
        exporter=derive_secret(master, b"exp master", server_finished_hash, profile),
    )


def finished_mac(base_secret: bytes, transcript_hash: bytes,
                 profile: KdfProfile = PQFED1) -> bytes:
    """RFC 8446 §4.4.4: HMAC(finished_key, Transcript-Hash)."""
    finished_key = hkdf_expand_label(base_secret, b"finished", b"", profile.hash_len, profile)
    return hmac.new(finished_key, transcript_hash, profile.hash_name).digest()


def next_traffic_secret(secret: bytes, profile: KdfProfile = PQFED1) -> bytes:
    """RFC 8446 §7.2: application_traffic_secret_N+1."""
    return hkdf_expand_label(secret, b"traffic upd", b"", profile.hash_len, profile)


def traffic_key_iv(secret: bytes, key_len: int,
                   profile: KdfProfile = PQFED1) -> tuple[bytes, bytes]:
    """RFC 8446 §7.3: write key and 12-byte IV from a traffic secret."""
    return (hkdf_expand_label(secret, b"key", b"", key_len, profile),
            hkdf_expand_label(secret, b"iv", b"", 12, profile))
