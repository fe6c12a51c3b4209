from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from pqfed.pqc.errors import DecodeError, HandshakeError, PqcError, RecordError
from pqfed.pqc.handshake import Group, HandshakeConfig, Suite
from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.pqc.record import HEADER_LEN, FrameDecoder, InnerType

from .handshake_driver import run_handshake

# ClientHello layout after the frame header (7) and message header (type 1 + length 4).
CH = HEADER_LEN + 5
CH_FIELDS = {  # field -> offset inside the ClientHello body
    "version": 0,
    "suites.length": 2,
}


@pytest.fixture
def cfgs(ca: CertificateAuthority, client: Identity,
         aggregator: Identity) -> tuple[HandshakeConfig, HandshakeConfig]:
    return HandshakeConfig(client, ca.trust), HandshakeConfig(aggregator, ca.trust)


def flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    return data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1 :]


def test_handshake_completes_with_matching_keys(cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    r = run_handshake(*cfgs)
    assert r.client.complete and r.server.complete
    cs, ss = r.client.session, r.server.session
    assert cs is not None and ss is not None
    assert cs.peer.node_id == "aggregator" and ss.peer.node_id == "client-1"
    assert cs.transcript_hash == ss.transcript_hash
    assert cs.exporter_secret == ss.exporter_secret
    frame = next(FrameDecoder().feed(cs.send.seal(InnerType.DATA, b"weights")))
    assert ss.recv.open(frame) == (InnerType.DATA, b"weights")


@pytest.mark.parametrize("suite", list(Suite))
@pytest.mark.parametrize("group", [Group.X25519_MLKEM768, Group.X25519_MLKEM1024])
def test_every_pq_suite_and_group(cfgs: tuple[HandshakeConfig, HandshakeConfig], suite: Suite,
                                  group: Group) -> None:
    c, s = (replace(x, suites=(suite,), groups=(group,)) for x in cfgs)
    r = run_handshake(c, s)
    assert r.client.session is not None and r.client.session.suite == suite
    assert r.client.session.group == group


def _fails(cfgs: tuple[HandshakeConfig, HandshakeConfig], tamper) -> PqcError:  # type: ignore[no-untyped-def]
    with pytest.raises((HandshakeError, RecordError, DecodeError)) as err:
        run_handshake(*cfgs, tamper=tamper)
    return err.value


def test_every_byte_of_client_hello_is_protected(cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    """Any single changed byte of the ClientHello (every field, including the random and the
    key shares) makes the handshake fail on one side or the other."""
    n = len(run_handshake(*cfgs).flights[0])
    for pos in range(n):
        _fails(cfgs, lambda i, b, pos=pos: flip(b, pos) if i == 0 else b)


def test_every_byte_of_server_hello_is_protected(cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    flights = run_handshake(*cfgs).flights
    sh_len = HEADER_LEN + struct.unpack(">I", flights[1][3:7])[0]
    for pos in range(sh_len):
        _fails(cfgs, lambda i, b, pos=pos: flip(b, pos) if i == 1 else b)


@pytest.mark.parametrize("flight", [1, 2])
def test_encrypted_flights_are_protected(cfgs: tuple[HandshakeConfig, HandshakeConfig],
                                         flight: int) -> None:
    flights = run_handshake(*cfgs).flights
    start = HEADER_LEN + struct.unpack(">I", flights[1][3:7])[0] if flight == 1 else 0
    for pos in range(start, len(flights[flight]), 97):
        err = _fails(cfgs, lambda i, b, pos=pos: flip(b, pos) if i == flight else b)
        assert isinstance(err, (HandshakeError, RecordError))


def _ch_offset(cfgs: tuple[HandshakeConfig, HandshakeConfig], field: str) -> int:
    """Offset of a ClientHello field in flight 0 (computed from the layout)."""
    c = cfgs[0]
    n_suites, n_groups = len(c.suites) * 2, len(c.groups) * 2
    fed = len(c.identity.certificate.federation)
    offsets = {
        "version": 0,
        "suites": 2,
        "groups": 3 + n_suites,
        "random": 4 + n_suites + n_groups,
        "federation": 36 + n_suites + n_groups,
        "key_share.group": 37 + n_suites + n_groups + fed,
        "key_share.kem_public": 39 + n_suites + n_groups + fed,
    }
    return CH + offsets[field]


@pytest.mark.parametrize(
    ("field", "mask", "expected"),
    [
        ("version", 0x02, "client_hello.version"),
        ("suites", 0x01, "client_hello"),           # odd length list
        ("groups", 0x10, "client_hello"),
        ("federation", 0x40, "client_hello.federation"),
        ("key_share.group", 0x01, "client_hello.key_share.group"),
        ("key_share.kem_public", 0x01, "client_hello.key_share.kem_public"),
    ],
)
def test_client_hello_fields_rejected_by_name(
    cfgs: tuple[HandshakeConfig, HandshakeConfig], field: str, mask: int, expected: str
) -> None:
    pos = _ch_offset(cfgs, field)
    err = _fails(cfgs, lambda i, b: flip(b, pos, mask) if i == 0 else b)
    assert getattr(err, "field", "").startswith(expected)


def test_client_hello_random_change_breaks_the_key_schedule(
        cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    """The handshake traffic keys are derived from Transcript-Hash(ClientHello..ServerHello)
    (RFC 8446 §7.1), so a modified hello already fails authenticated decryption of the
    server's flight, before the signature is even reached."""
    pos = _ch_offset(cfgs, "random") + 5
    err = _fails(cfgs, lambda i, b: flip(b, pos) if i == 0 else b)
    assert err.field == "server_flight.tag"  # type: ignore[attr-defined]


def test_downgrade_by_stripping_offers_is_detected(ca: CertificateAuthority, client: Identity,
                                                   aggregator: Identity) -> None:
    """A MITM that removes the client's preferred suite from the ClientHello makes the server
    pick the other one; the hello is bound into the handshake keys and the server's signed
    transcript, so the client refuses (RFC 8446 §4.1.3's goal, achieved by the transcript)."""
    c = HandshakeConfig(client, ca.trust, suites=(Suite.AES_256_GCM_SHA384,
                                                  Suite.CHACHA20_POLY1305_SHA384))
    s = HandshakeConfig(aggregator, ca.trust)
    body_suites = CH + 3

    def strip(i: int, b: bytes) -> bytes:
        if i != 0:
            return b
        # swap the two offered suites: the server now chooses ChaCha20 first
        return b[:body_suites] + b[body_suites + 2 : body_suites + 4] + \
            b[body_suites : body_suites + 2] + b[body_suites + 4 :]

    err = _fails((c, s), strip)
    assert err.field == "server_flight.tag"  # type: ignore[attr-defined]


def test_no_common_suite_or_group(ca: CertificateAuthority, client: Identity,
                                  aggregator: Identity) -> None:
    c = HandshakeConfig(client, ca.trust, suites=(Suite.CHACHA20_POLY1305_SHA384,))
    s = HandshakeConfig(aggregator, ca.trust, suites=(Suite.AES_256_GCM_SHA384,))
    with pytest.raises(HandshakeError, match="no suite in common"):
        run_handshake(c, s)
    c = HandshakeConfig(client, ca.trust, groups=(Group.X25519_MLKEM1024,))
    s = HandshakeConfig(aggregator, ca.trust, groups=(Group.X25519_MLKEM768,))
    with pytest.raises(HandshakeError, match="not accepted"):
        run_handshake(c, s)


def test_classical_group_refused_unless_configured(ca: CertificateAuthority, client: Identity,
                                                   aggregator: Identity) -> None:
    c = HandshakeConfig(client, ca.trust, groups=(Group.X25519,))
    with pytest.raises(HandshakeError, match="key_share.group"):
        run_handshake(c, HandshakeConfig(aggregator, ca.trust))


def test_classical_certificate_refused_by_default(ca: CertificateAuthority,
                                                  client: Identity) -> None:
    ed_agg = ca.new_identity("aggregator", Role.AGGREGATOR, algorithm="Ed25519")
    with pytest.raises(HandshakeError, match="sig_algorithm"):
        run_handshake(HandshakeConfig(client, ca.trust), HandshakeConfig(ed_agg, ca.trust))


def test_wrong_peer_identity(ca: CertificateAuthority, client: Identity,
                             aggregator: Identity) -> None:
    c = HandshakeConfig(client, ca.trust, peer_node_id="aggregator-2")
    with pytest.raises(HandshakeError, match="node_id"):
        run_handshake(c, HandshakeConfig(aggregator, ca.trust))


def test_client_cannot_pose_as_aggregator(ca: CertificateAuthority, client: Identity) -> None:
    other_client = ca.new_identity("client-2", Role.CLIENT)
    with pytest.raises(HandshakeError, match="role"):
        run_handshake(HandshakeConfig(client, ca.trust), HandshakeConfig(other_client, ca.trust))


def test_aggregator_refuses_aggregator_as_client(ca: CertificateAuthority,
                                                 aggregator: Identity) -> None:
    agg2 = ca.new_identity("aggregator-2", Role.AGGREGATOR)
    with pytest.raises(HandshakeError, match="client_flight.certificate.role"):
        run_handshake(HandshakeConfig(agg2, ca.trust), HandshakeConfig(aggregator, ca.trust))


def test_foreign_ca_rejected_both_ways(ca: CertificateAuthority, other_ca: CertificateAuthority,
                                       client: Identity, aggregator: Identity) -> None:
    stranger = other_ca.new_identity("client-1", Role.CLIENT)
    with pytest.raises(HandshakeError, match="issuer"):
        run_handshake(HandshakeConfig(stranger, other_ca.trust), HandshakeConfig(aggregator, ca.trust))
    rogue_agg = other_ca.new_identity("aggregator", Role.AGGREGATOR)
    with pytest.raises(HandshakeError, match="issuer"):
        run_handshake(HandshakeConfig(client, ca.trust), HandshakeConfig(rogue_agg, other_ca.trust))


def test_expired_peer_certificate(ca: CertificateAuthority, client: Identity) -> None:
    old = ca.issue("aggregator", Role.AGGREGATOR, client.key.public_bytes(),
                   not_before=1_000_000, validity_s=60)
    with pytest.raises(HandshakeError, match="expired"):
        run_handshake(HandshakeConfig(client, ca.trust),
                      HandshakeConfig(Identity(old, client.key), ca.trust))


def test_certificate_without_matching_key_fails_certificate_verify(
        ca: CertificateAuthority, client: Identity, aggregator: Identity) -> None:
    """A stolen certificate is useless without its private key (the CertificateVerify)."""
    thief = Identity(aggregator.certificate, ca.new_identity("x", Role.AGGREGATOR).key)
    with pytest.raises(HandshakeError, match="certificate_verify"):
        run_handshake(HandshakeConfig(client, ca.trust), HandshakeConfig(thief, ca.trust))


def test_replayed_server_flight_is_rejected(cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    """A recorded server flight replayed to a new client session fails (fresh key shares)."""
    old = run_handshake(*cfgs).flights[1]
    err = _fails(cfgs, lambda i, b: old if i == 1 else b)
    assert isinstance(err, HandshakeError)


def test_replayed_client_flight_is_rejected(cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    old = run_handshake(*cfgs).flights[2]
    err = _fails(cfgs, lambda i, b: old if i == 2 else b)
    assert err.field.startswith("client_flight")  # type: ignore[attr-defined]


def test_truncated_and_extended_flights(cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    # a truncated ServerHello frame never completes; feeding it plus garbage fails
    with pytest.raises((HandshakeError, RecordError)):
        run_handshake(*cfgs, tamper=lambda i, b: b[:-1] + b"\x00" * 3 if i == 0 else b)


def test_messages_out_of_order(cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    # sending the ClientHello twice: the second arrives in the wrong state
    with pytest.raises(HandshakeError, match="state|frame.type"):
        run_handshake(*cfgs, tamper=lambda i, b: b + b if i == 0 else b)


def test_state_machine_refuses_a_second_start(cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    r = run_handshake(*cfgs)
    with pytest.raises(HandshakeError, match="already sent"):
        r.client.start()


@pytest.mark.parametrize("parallel", [True, False])
def test_sequential_and_parallel_authentication_agree(
        ca: CertificateAuthority, client: Identity, aggregator: Identity, parallel: bool) -> None:
    c = HandshakeConfig(client, ca.trust, parallel_auth=parallel)
    s = HandshakeConfig(aggregator, ca.trust, parallel_auth=parallel)
    r = run_handshake(c, s)
    assert r.client.session is not None and r.server.session is not None
    assert r.client.session.transcript_hash == r.server.session.transcript_hash
    thief = Identity(aggregator.certificate, ca.new_identity("x", Role.AGGREGATOR).key)
    with pytest.raises(HandshakeError, match="certificate_verify"):
        run_handshake(c, HandshakeConfig(thief, ca.trust, parallel_auth=parallel))


def test_speculative_client_signature_is_not_sent_when_server_fails(
        ca: CertificateAuthority, client: Identity, aggregator: Identity) -> None:
    from pqfed.pqc.handshake import ClientHandshake, ServerHandshake

    thief = Identity(aggregator.certificate, ca.new_identity("x", Role.AGGREGATOR).key)
    cl = ClientHandshake(HandshakeConfig(client, ca.trust))
    sv = ServerHandshake(HandshakeConfig(thief, ca.trust))
    to_s, to_c = FrameDecoder(), FrameDecoder()
    flight = b"".join(sv.receive(f) for f in to_s.feed(cl.start()))
    out: list[bytes] = []
    with pytest.raises(HandshakeError):
        for f in to_c.feed(flight):
            out.append(cl.receive(f))
    assert out == [b""]  # ServerHello only; nothing was emitted for the failed flight
    assert cl.session is None and not cl.complete


def test_precomputed_key_shares_are_used_once(ca: CertificateAuthority, client: Identity,
                                              aggregator: Identity) -> None:
    from pqfed.pqc.pool import KeySharePool

    pool = KeySharePool()
    c = HandshakeConfig(client, ca.trust, key_shares=pool)
    first = run_handshake(c, HandshakeConfig(aggregator, ca.trust)).flights[0]
    second = run_handshake(c, HandshakeConfig(aggregator, ca.trust)).flights[0]
    share = slice(-(1184 + 32), None)  # ML-KEM-768 ek + X25519 key at the end of the hello
    assert first[share] != second[share]
