"""Property-based fuzzing of every parser that sees untrusted bytes: only typed pqfed errors
may escape, never IndexError/struct.error/UnicodeDecodeError or a hang. The mutation harness
(tests/fuzz/harness.py, `make fuzz` for a million inputs) runs here with a small budget."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqfed.pqc.errors import PqcError
from pqfed.pqc.handshake import HandshakeConfig, ServerHandshake
from pqfed.pqc.identity import Certificate, CertificateAuthority, Identity
from pqfed.pqc.record import HEADER, WIRE_VERSION, FrameDecoder, FrameType
from pqfed.pqc.signing import SignedUpdate

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_frame_decoder_on_arbitrary_chunks(chunks: list[bytes]) -> None:
    dec = FrameDecoder(max_plaintext=256)
    try:
        for c in chunks:
            for frame in dec.feed(c):
                assert len(frame.body) <= (1 << 14) + 17
    except PqcError:
        pass


@FUZZ
@given(ftype=st.sampled_from([FrameType.HANDSHAKE, FrameType.PROTECTED]),
       body=st.binary(max_size=2000))
def test_server_handshake_on_arbitrary_hello(ftype: FrameType, body: bytes,
                                             ca: CertificateAuthority,
                                             aggregator: Identity) -> None:
    server = ServerHandshake(HandshakeConfig(aggregator, ca.trust))
    wire = HEADER.pack(ftype, WIRE_VERSION, len(body)) + body
    with pytest.raises(PqcError):
        for frame in FrameDecoder().feed(wire):
            server.receive(frame)
        raise PqcError("incomplete")


@FUZZ
@given(st.binary(max_size=6000))
def test_certificate_and_signed_update_parsers(data: bytes) -> None:
    for parse in (Certificate.from_bytes, SignedUpdate.from_bytes):
        try:
            parse(data)
        except PqcError:
            pass


@FUZZ
@given(data=st.data())
def test_mutated_valid_client_hello(data: st.DataObject, ca: CertificateAuthority,
                                    client: Identity, aggregator: Identity) -> None:
    from pqfed.pqc.handshake import ClientHandshake

    hello = bytearray(ClientHandshake(HandshakeConfig(client, ca.trust)).start())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(hello) - 1))
        hello[pos] = data.draw(st.integers(0, 255))
    server = ServerHandshake(HandshakeConfig(aggregator, ca.trust))
    try:
        for frame in FrameDecoder().feed(bytes(hello)):
            server.receive(frame)
    except PqcError:
        pass


def test_mutation_harness_small_budget() -> None:
    """Every target of the harness (HTTP filter, record open, PEM armor, audit log lines,
    compression and broadcast decoders), a few thousand inputs: no crash, no hang."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "fuzz" / "harness.py"
    spec = importlib.util.spec_from_file_location("pqfed_fuzz_harness", path)
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, harness)
    spec.loader.exec_module(harness)
    lines: list[str] = []
    with harness.work_dir() as work:
        results = harness.run_all(6000, 7, work, log=lines.append)
    assert {r.name for r in results} == {"http-filter", "record-open", "pem-armor", "audit-log",
                                         "compression", "broadcast", "signed-update"}
    assert [(r.name, r.crashes[:1]) for r in results if r.crashes] == [], lines
    assert sum(r.inputs for r in results) >= 6000 - len(results)  # shares are rounded
    assert all(r.rejected > 0 for r in results)  # the mutants reach the parsers' checks
