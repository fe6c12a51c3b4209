"""Full pqfed1 handshakes with each backend on each side: identities whose keys were made by
that side's backend, ML-KEM encapsulated by one backend and decapsulated by the other,
CertificateVerify signed by one and verified by the other, in memory and over loopback TCP."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace

import pytest

from pqfed.pqc.algorithms import KEM_SIZES
from pqfed.pqc.backends import BACKENDS, get_backend
from pqfed.pqc.channel import connect, server_channel
from pqfed.pqc.errors import HandshakeError, RecordError
from pqfed.pqc.handshake import RANDOM_LEN, Group, HandshakeConfig
from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.pqc.record import HEADER_LEN

from .handshake_driver import run_handshake

PAIRS = list(itertools.product(BACKENDS, BACKENDS))


def _identity(ca: CertificateAuthority, node: str, role: Role, backend: str) -> Identity:
    key = get_backend(backend).sig_generate("ML-DSA-65")
    return Identity(ca.issue(node, role, key.public_bytes()), key)


def _configs(ca: CertificateAuthority, client_backend: str,
             server_backend: str) -> tuple[HandshakeConfig, HandshakeConfig]:
    cli = _identity(ca, "client-1", Role.CLIENT, client_backend)
    agg = _identity(ca, "aggregator", Role.AGGREGATOR, server_backend)
    return (HandshakeConfig(cli, ca.trust, backend=get_backend(client_backend)),
            HandshakeConfig(agg, ca.trust, backend=get_backend(server_backend)))


@pytest.mark.parametrize(("client_backend", "server_backend"), PAIRS)
@pytest.mark.parametrize("group", [Group.X25519_MLKEM768, Group.X25519_MLKEM1024])
def test_handshake_between_backends(ca: CertificateAuthority, client_backend: str,
                                    server_backend: str, group: Group) -> None:
    c, s = (replace(x, groups=(group,)) for x in _configs(ca, client_backend, server_backend))
    r = run_handshake(c, s)
    cs, ss = r.client.session, r.server.session
    assert cs is not None and ss is not None
    assert cs.group == group
    assert cs.exporter_secret == ss.exporter_secret
    assert cs.peer.node_id == "aggregator" and ss.peer.node_id == "client-1"


@pytest.mark.parametrize(("client_backend", "server_backend"), PAIRS)
def test_tampered_kem_ciphertext_fails_the_handshake(ca: CertificateAuthority,
                                                     client_backend: str,
                                                     server_backend: str) -> None:
    # The ServerHello carries the ML-KEM ciphertext after version, suite, group, random and
    # its length (6 + 32 + 2 bytes of body); FIPS 203 implicit rejection
    # gives the client an unrelated secret, so the server's Finished (or the first encrypted
    # record) no longer authenticates. No plaintext error ever says "bad ciphertext".
    cfgs = _configs(ca, client_backend, server_backend)
    at = HEADER_LEN + 5 + 6 + RANDOM_LEN + 2 + 100  # frame + message header, into the ct
    clean = run_handshake(*cfgs).flights[1]
    ct_len = int.from_bytes(clean[at - 102 : at - 100], "big")
    assert ct_len == KEM_SIZES["ML-KEM-768"].ciphertext

    def tamper(i: int, data: bytes) -> bytes:
        if i != 1:
            return data
        return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]

    with pytest.raises((HandshakeError, RecordError)):
        run_handshake(*cfgs, tamper=tamper)


@pytest.mark.parametrize(("client_backend", "server_backend"), PAIRS)
def test_channel_over_loopback(ca: CertificateAuthority, client_backend: str,
                               server_backend: str) -> None:
    c_cfg, s_cfg = _configs(ca, client_backend, server_backend)

    async def scenario() -> bytes:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ch = await server_channel(r, w, s_cfg)
            got.set_result(await ch.recv())
            await ch.close()

        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        ch = await connect("127.0.0.1", port, c_cfg)
        await ch.send(b"model update")
        out = await asyncio.wait_for(got, 10)
        await ch.close()
        srv.close()
        await srv.wait_closed()
        return out

    assert asyncio.run(scenario()) == b"model update"
