from __future__ import annotations

import pytest

from pqfed.pqc.errors import RecordError
from pqfed.pqc.record import (
    HEADER,
    MAX_HANDSHAKE_FRAME,
    WIRE_VERSION,
    Frame,
    FrameDecoder,
    FrameType,
    InnerType,
    RecordProtection,
    encode_frame,
)

SECRET = bytes(range(48))


def pair(aead: str = "AES-256-GCM") -> tuple[RecordProtection, RecordProtection]:
    return RecordProtection(aead, SECRET), RecordProtection(aead, SECRET)


def frames(data: bytes) -> list[Frame]:
    return list(FrameDecoder().feed(data))


@pytest.mark.parametrize("aead", ["AES-256-GCM", "CHACHA20-POLY1305"])
def test_round_trip_in_order(aead: str) -> None:
    tx, rx = pair(aead)
    wire = [tx.seal(InnerType.DATA, f"m{i}".encode()) for i in range(5)]
    assert [rx.open(frames(w)[0])[1] for w in wire] == [b"m0", b"m1", b"m2", b"m3", b"m4"]


def test_nonce_is_iv_xor_sequence() -> None:
    tx, _ = pair()
    a, b = tx.seal(InnerType.DATA, b"x"), tx.seal(InnerType.DATA, b"x")
    assert a != b  # same plaintext, different nonce


@pytest.mark.parametrize("where", ["type", "version", "length", "body", "tag"])
def test_tampered_record_is_rejected(where: str) -> None:
    tx, rx = pair()
    wire = bytearray(tx.seal(InnerType.DATA, b"model update"))
    pos = {"type": 0, "version": 2, "length": 6, "body": 8, "tag": len(wire) - 1}[where]
    wire[pos] ^= 0x01
    with pytest.raises(RecordError):
        for f in frames(bytes(wire)):
            rx.open(f)
        raise RecordError("length", "frame incomplete")  # a grown length never completes


def test_replayed_record_is_rejected() -> None:
    tx, rx = pair()
    w = tx.seal(InnerType.DATA, b"a")
    rx.open(frames(w)[0])
    with pytest.raises(RecordError, match="replayed"):
        rx.open(frames(w)[0])


def test_reordered_records_are_rejected() -> None:
    tx, rx = pair()
    w0, w1 = tx.seal(InnerType.DATA, b"a"), tx.seal(InnerType.DATA, b"b")
    with pytest.raises(RecordError, match="reordered"):
        rx.open(frames(w1)[0])
    del w0


def test_dropped_record_is_detected() -> None:
    tx, rx = pair()
    tx.seal(InnerType.DATA, b"dropped")
    with pytest.raises(RecordError, match="tag"):
        rx.open(frames(tx.seal(InnerType.DATA, b"next"))[0])


def test_header_is_authenticated_as_aad() -> None:
    tx, rx = pair()
    w = tx.seal(InnerType.DATA, b"abc")
    f = frames(w)[0]
    forged = Frame(f.type, HEADER.pack(FrameType.PROTECTED, WIRE_VERSION + 1, len(f.body)), f.body)
    with pytest.raises(RecordError, match="tag"):
        rx.open(forged)


def test_oversized_frame_refused_before_buffering() -> None:
    dec = FrameDecoder(max_plaintext=1 << 16)
    with pytest.raises(RecordError, match="oversized"):
        list(dec.feed(HEADER.pack(FrameType.PROTECTED, WIRE_VERSION, (1 << 16) + 1 + 16 + 1)))
    with pytest.raises(RecordError, match="oversized"):
        list(FrameDecoder().feed(HEADER.pack(FrameType.HANDSHAKE, WIRE_VERSION,
                                             MAX_HANDSHAKE_FRAME + 1)))


def test_unknown_type_wrong_version_short_record() -> None:
    with pytest.raises(RecordError, match="type"):
        list(FrameDecoder().feed(HEADER.pack(0x42, WIRE_VERSION, 0)))
    with pytest.raises(RecordError, match="version"):
        list(FrameDecoder().feed(HEADER.pack(FrameType.PROTECTED, 0x0303, 40)))
    with pytest.raises(RecordError, match="shorter than the AEAD tag"):
        list(FrameDecoder().feed(HEADER.pack(FrameType.PROTECTED, WIRE_VERSION, 3)))


def test_plaintext_frame_after_keys_is_refused() -> None:
    _, rx = pair()
    with pytest.raises(RecordError, match="plaintext frame"):
        rx.open(frames(encode_frame(FrameType.HANDSHAKE, b"hello"))[0])


def test_partial_frames_reassemble_and_report_pending() -> None:
    tx, rx = pair()
    w = tx.seal(InnerType.DATA, b"x" * 1000)
    dec = FrameDecoder()
    assert list(dec.feed(w[:10])) == [] and dec.pending == 10
    got = list(dec.feed(w[10:]))
    assert rx.open(got[0])[1] == b"x" * 1000 and dec.pending == 0


def test_key_update_rotates_both_sides_in_step() -> None:
    tx, rx = pair()
    old = tx.seal(InnerType.DATA, b"before")
    assert rx.open(frames(old)[0])[1] == b"before"
    ku = tx.seal(InnerType.KEY_UPDATE, b"")
    tx.rotate()
    assert rx.open(frames(ku)[0])[0] is InnerType.KEY_UPDATE
    rx.rotate()
    after = tx.seal(InnerType.DATA, b"after")
    assert tx.seq == 1
    assert rx.open(frames(after)[0])[1] == b"after"


def test_record_under_old_key_after_update_is_rejected() -> None:
    tx, rx = pair()
    stale = RecordProtection("AES-256-GCM", SECRET)
    tx.rotate()
    rx.rotate()
    with pytest.raises(RecordError):
        rx.open(frames(stale.seal(InnerType.DATA, b"old key"))[0])
