"""Key schedule: X-Wing-style hybrid combiner + the TLS 1.3 key schedule (RFC 8446 §7.1).

* Hybrid shared secret (draft-connolly-cfrg-xwing-kem §5.3): the ML-KEM and X25519 secrets are
  combined as SHA3-256(ss_M || ss_X || ct_X || pk_X || XWingLabel). Including the X25519
  ciphertext (the server's ephemeral public key) and the client's X25519 public key makes the
  combiner secure as long as either component is (IND-CCA robustness of the combination).
* Key schedule: HKDF-Extract/Expand (RFC 5869) with HKDF-Expand-Label and Derive-Secret exactly
  as in RFC 8446 §7.1, but with the label prefix "pqfed1 " instead of "tls13 " so that no key is
  ever valid in both protocols (domain separation).
* Traffic keys (RFC 8446 §7.3) and key update (§7.2) use the same labels as TLS 1.3.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from pqfed.pqc.encoding import Writer

LABEL_PREFIX = b"pqfed1 "
XWING_LABEL = b"\\.//^\\"  # the 6-byte X-Wing label from the draft: \./ /^\

HASH_NAME = "sha384"
HASH_LEN = 48


def _hash_obj() -> hashes.HashAlgorithm:
    return hashes.SHA384()


def xwing_combine(ss_mlkem: bytes, ss_x25519: bytes, ct_x25519: bytes, pk_x25519: bytes) -> bytes:
    """X-Wing combiner. For the classical baseline suite `ss_mlkem` is empty."""
    return hashlib.sha3_256(ss_mlkem + ss_x25519 + ct_x25519 + pk_x25519 + XWING_LABEL).digest()


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    # RFC 5869 §2.2: PRK = HMAC-Hash(salt, IKM); a zero-length salt is a string of HashLen zeros.
    return hmac.new(salt or bytes(HASH_LEN), ikm, HASH_NAME).digest()


def hkdf_expand_label(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    hkdf_label = (
        Writer().u16(length).vec8(LABEL_PREFIX + label).vec8(context).getvalue()
    )
    return HKDFExpand(_hash_obj(), length, hkdf_label).derive(secret)


def derive_secret(secret: bytes, label: bytes, transcript_hash: bytes) -> bytes:
    return hkdf_expand_label(secret, label, transcript_hash, HASH_LEN)


def transcript_hash_of(data: bytes) -> bytes:
    return hashlib.new(HASH_NAME, data).digest()


EMPTY_HASH = transcript_hash_of(b"")


@dataclass(frozen=True, slots=True)
class HandshakeSecrets:
    client_handshake: bytes
    server_handshake: bytes
    master: bytes


def handshake_secrets(shared_secret: bytes, hello_hash: bytes) -> HandshakeSecrets:
    """RFC 8446 §7.1 from the Early Secret (no PSK) to the handshake traffic secrets."""
    early = hkdf_extract(b"", bytes(HASH_LEN))
    handshake = hkdf_extract(derive_secret(early, b"derived", EMPTY_HASH), shared_secret)
    master = hkdf_extract(derive_secret(handshake, b"derived", EMPTY_HASH), bytes(HASH_LEN))
    return HandshakeSecrets(
        client_handshake=derive_secret(handshake, b"c hs traffic", hello_hash),
        server_handshake=derive_secret(handshake, b"s hs traffic", hello_hash),
        master=master,
    )


@dataclass(frozen=True, slots=True)
class ApplicationSecrets:
    client: bytes
    server: bytes
    exporter: bytes


def application_secrets(master: bytes, server_finished_hash: bytes) -> ApplicationSecrets:
    return ApplicationSecrets(
        client=derive_secret(master, b"c ap traffic", server_finished_hash),
        server=derive_secret(master, b"s ap traffic", server_finished_hash),
        exporter=derive_secret(master, b"exp master", server_finished_hash),
    )


def finished_mac(base_secret: bytes, transcript_hash: bytes) -> bytes:
    """RFC 8446 §4.4.4: HMAC(finished_key, Transcript-Hash)."""
    finished_key = hkdf_expand_label(base_secret, b"finished", b"", HASH_LEN)
    return hmac.new(finished_key, transcript_hash, HASH_NAME).digest()


def next_traffic_secret(secret: bytes) -> bytes:
    """RFC 8446 §7.2: application_traffic_secret_N+1."""
    return hkdf_expand_label(secret, b"traffic upd", b"", HASH_LEN)


def traffic_key_iv(secret: bytes, key_len: int) -> tuple[bytes, bytes]:
    """RFC 8446 §7.3: write key and 12-byte IV from a traffic secret."""
    return (hkdf_expand_label(secret, b"key", b"", key_len),
            hkdf_expand_label(secret, b"iv", b"", 12))
