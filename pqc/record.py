"""Record layer: framing and AEAD protection in the model of TLS 1.3 (RFC 8446 §5).

Wire frame: type (u8) | version (u16) | length (u32) | body.
* Plaintext frames (type HANDSHAKE) carry only ClientHello and ServerHello.
* Protected frames (type PROTECTED) carry AEAD(key, nonce, inner, aad=header) where
  inner = content || inner_type (TLSInnerPlaintext, §5.2) so the true type is hidden.
* nonce = IV xor sequence number (§5.3); the sequence number is implicit, so a replayed,
  reordered or dropped record fails authentication and closes the channel.
* An authenticated close (inner type CLOSE) distinguishes a clean end from truncation (§6.1).
* Before AEAD usage limits (§5.5) the sender rotates keys with a KEY_UPDATE record (§4.6.3).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from pqfed.pqc.errors import RecordError
from pqfed.pqc.keyschedule import next_traffic_secret, traffic_key_iv

WIRE_VERSION = 0x5001
HEADER = struct.Struct(">BHI")
HEADER_LEN = HEADER.size
TAG_LEN = 16
MAX_PLAINTEXT = 1 << 16  # larger than TLS's 2^14: model updates are bulk transfers
MAX_HANDSHAKE_FRAME = 1 << 14
# An encrypted handshake flight (certificate + CertificateVerify + Finished) is one record;
# with ML-DSA-87 it is ~12.5 KB, so protected records may always be this large.
MAX_FLIGHT = 1 << 14
# RFC 8446 §5.5: AES-GCM may protect up to 2^24.5 full-size records per key; we rotate far
# earlier, and count records rather than bytes since our records can be 4x TLS's.
DEFAULT_KEY_UPDATE_AFTER = 1 << 20
MAX_SEQUENCE = (1 << 64) - 1


class FrameType(enum.IntEnum):
    HANDSHAKE = 0x16
    PROTECTED = 0x17


class InnerType(enum.IntEnum):
    CLOSE = 0x15
    HANDSHAKE = 0x16
    DATA = 0x17
    KEY_UPDATE = 0x18


AEADS: dict[str, tuple[type[AESGCM] | type[ChaCha20Poly1305], int]] = {
    "AES-256-GCM": (AESGCM, 32),
    "CHACHA20-POLY1305": (ChaCha20Poly1305, 32),
}


def encode_frame(frame_type: FrameType, body: bytes) -> bytes:
    return HEADER.pack(frame_type, WIRE_VERSION, len(body)) + body


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    header: bytes
    body: bytes


class FrameDecoder:
    """Incremental, strict frame parser: feed bytes, iterate complete frames.

    Rejects unknown types, a wrong version and lengths above the limit for the frame's type
    as soon as the header arrives, before buffering the body (no memory exhaustion).
    """

    def __init__(self, max_plaintext: int = MAX_PLAINTEXT) -> None:
        self._buf = bytearray()
        self._max_protected = max(max_plaintext, MAX_FLIGHT) + 1 + TAG_LEN

    def feed(self, data: bytes) -> Iterator[Frame]:
        # Parse in place from one contiguous view; only an incomplete tail is kept, so each
        # byte is copied once on the way to the AEAD (bulk model updates are the hot path).
        if self._buf:
            self._buf += data
            view = memoryview(bytes(self._buf))
            self._buf.clear()
        else:
            view = memoryview(data)
        pos, end = 0, len(view)
        while end - pos >= HEADER_LEN:
            ftype, version, length = HEADER.unpack_from(view, pos)
            self._check_header(ftype, version, length)
            if end - pos < HEADER_LEN + length:
                break
            header = bytes(view[pos : pos + HEADER_LEN])
            body = bytes(view[pos + HEADER_LEN : pos + HEADER_LEN + length])
            pos += HEADER_LEN + length
            yield Frame(FrameType(ftype), header, body)
        self._buf += view[pos:]

    def _check_header(self, ftype: int, version: int, length: int) -> None:
        if ftype not in (FrameType.HANDSHAKE, FrameType.PROTECTED):
            raise RecordError("type", f"unknown frame type {ftype:#04x}")
        if version != WIRE_VERSION:
            raise RecordError("version", f"{version:#06x} is not {WIRE_VERSION:#06x}")
        limit = MAX_HANDSHAKE_FRAME if ftype == FrameType.HANDSHAKE else self._max_protected
        if length > limit:
            raise RecordError("length", f"{length} exceeds the maximum {limit} (oversized)")
        if ftype == FrameType.PROTECTED and length < 1 + TAG_LEN:
            raise RecordError("length", f"{length} is shorter than the AEAD tag")

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame; non-zero at EOF means the stream was truncated."""
        return len(self._buf)


class RecordProtection:
    """One direction's AEAD state: traffic secret, key, IV and implicit sequence number."""

    __slots__ = ("_aead", "_aead_name", "_iv", "_secret", "seq")

    def __init__(self, aead_name: str, secret: bytes) -> None:
        if aead_name not in AEADS:
            raise RecordError("aead", f"unsupported AEAD {aead_name!r}")
        self._aead_name = aead_name
        self._install(secret)

    def _install(self, secret: bytes) -> None:
        cls, key_len = AEADS[self._aead_name]
        key, self._iv = traffic_key_iv(secret, key_len)
        self._secret = secret
        self._aead = cls(key)
        self.seq = 0  # also the number of records under the current key

    def rotate(self) -> None:
        self._install(next_traffic_secret(self._secret))

    def _nonce(self) -> bytes:
        if self.seq >= MAX_SEQUENCE:
            raise RecordError("sequence", "sequence number exhausted; reconnect")
        return (int.from_bytes(self._iv, "big") ^ self.seq).to_bytes(12, "big")

    def seal(self, inner_type: InnerType, content: bytes) -> bytes:
        inner = content + bytes((inner_type,))
        header = HEADER.pack(FrameType.PROTECTED, WIRE_VERSION, len(inner) + TAG_LEN)
        ciphertext = self._aead.encrypt(self._nonce(), inner, header)
        self.seq += 1
        return header + ciphertext

    def open(self, frame: Frame) -> tuple[InnerType, bytes]:
        if frame.type != FrameType.PROTECTED:
            raise RecordError("type", "plaintext frame after keys were established")
        try:
            inner = self._aead.decrypt(self._nonce(), frame.body, frame.header)
        except InvalidTag:
            raise RecordError(
                "tag", f"authentication failed at sequence {self.seq} "
                "(tampered, replayed, reordered or dropped record)"
            ) from None
        self.seq += 1
        try:
            inner_type = InnerType(inner[-1])
        except ValueError:
            raise RecordError("inner_type", f"unknown inner type {inner[-1]:#04x}") from None
        return inner_type, inner[:-1]
