"""TLS 1.3 channel (pqc/tls13.py) over loopback: a real OpenSSL 4 handshake on both sides with
ML-DSA-65 certificates and X25519MLKEM768, and every way a peer must be refused.

Foreign peers (a client offering only X25519, classical certificates) are plain pyOpenSSL
endpoints on blocking sockets in a thread, not built with our module's settings."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import threading
import time
import warnings
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa
from OpenSSL import SSL, crypto

from pqfed.pqc.errors import (
    CertificateError,
    ChannelClosed,
    HandshakeError,
    PqcError,
    RecordError,
)
from pqfed.pqc.identity import Role
from pqfed.pqc.pki import NodeURI, Usage, X509CertificateAuthority
from pqfed.pqc.pki.profile import private_key_pem, subject_name
from pqfed.pqc.tls13 import (
    TlsChannel,
    TlsConfig,
    TlsContext,
    set_groups,
    tls_connect,
    tls_server_channel,
)

FED = "fed-tls"
Node = tuple[x509.Certificate, mldsa.MLDSA65PrivateKey]


@pytest.fixture(scope="module")
def ca() -> X509CertificateAuthority:
    return X509CertificateAuthority.generate(FED)


@pytest.fixture(scope="module")
def agg(ca: X509CertificateAuthority) -> Node:
    return ca.new_node(NodeURI(FED, Role.AGGREGATOR, "agg-1"))


@pytest.fixture(scope="module")
def cli(ca: X509CertificateAuthority) -> Node:
    return ca.new_node(NodeURI(FED, Role.CLIENT, "hosp-a"))


def server_ctx(ca: X509CertificateAuthority, node: Node, **kw: object) -> TlsContext:
    cfg = TlsConfig(node[0], node[1], kw.pop("trust", ca.trust),  # type: ignore[arg-type]
                    peer_roles=(Role.CLIENT, Role.EDGE), **kw)  # type: ignore[arg-type]
    return TlsContext(cfg, Usage.SERVER)


def client_ctx(ca: X509CertificateAuthority, node: Node, **kw: object) -> TlsContext:
    kw.setdefault("peer_roles", (Role.AGGREGATOR,))
    cfg = TlsConfig(node[0], node[1], kw.pop("trust", ca.trust), **kw)  # type: ignore[arg-type]
    return TlsContext(cfg, Usage.CLIENT)


@dataclass
class Outcome:
    client: TlsChannel | None = None
    client_error: PqcError | None = None
    server: TlsChannel | None = None
    server_error: PqcError | None = None
    echoed: bytes = b""


async def _exchange(sctx: TlsContext, cctx: TlsContext, payload: bytes = b"ping",
                    pin: str | None = None) -> Outcome:
    """Server echoes what it gets, reversed, then closes; errors of each side are kept."""
    out = Outcome()
    done = asyncio.Event()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            out.server = await tls_server_channel(r, w, sctx)
            got = b""
            while len(got) < len(payload):
                got += await out.server.recv()
            await out.server.send(got[::-1])
            await out.server.close()
        except PqcError as exc:
            out.server_error = exc
        finally:
            done.set()

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        out.client = await tls_connect("127.0.0.1", port, cctx, pin)
        await out.client.send(payload)
        while len(out.echoed) < len(payload):
            out.echoed += await out.client.recv()
    except PqcError as exc:
        out.client_error = exc
    await asyncio.wait_for(done.wait(), 20)
    srv.close()
    return out


def run(coro: object) -> Outcome:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_happy_path_mutual_pq(ca: X509CertificateAuthority, agg: Node, cli: Node) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB: many 16 KiB records
    out = run(_exchange(server_ctx(ca, agg), client_ctx(ca, cli, peer_node_id="agg-1"),
                        payload))
    assert out.client_error is None and out.server_error is None
    assert out.client is not None and out.server is not None
    assert out.echoed == payload[::-1]
    for ch in (out.client, out.server):
        assert ch.group == "X25519MLKEM768"
        assert ch.version == "TLSv1.3"
        assert ch.cipher == "TLS_AES_256_GCM_SHA384"
    assert (out.client.peer.role, out.client.peer.node_id) == (Role.AGGREGATOR, "agg-1")
    assert (out.server.peer.role, out.server.peer.node_id) == (Role.CLIENT, "hosp-a")
    assert out.server.peer.serial == cli[0].serial_number
    assert out.client.peer.federation == FED
    # one leaf each way, no CA certificate sent: well under two ML-DSA-65 certificates each
    assert out.client.handshake.bytes_sent < 12_000


def test_close_notify_ends_the_stream(ca: X509CertificateAuthority, agg: Node,
                                      cli: Node) -> None:
    async def go() -> None:
        out = await _exchange(server_ctx(ca, agg), client_ctx(ca, cli))
        assert out.client is not None
        with pytest.raises(ChannelClosed):
            await out.client.recv()
    asyncio.run(go())


def test_wrong_ca_is_refused(ca: X509CertificateAuthority, agg: Node, cli: Node) -> None:
    other = X509CertificateAuthority.generate(FED)  # same federation and names, another key
    out = run(_exchange(server_ctx(ca, agg), client_ctx(ca, cli, trust=other.trust)))
    assert isinstance(out.client_error, CertificateError)
    assert out.client_error.field == "issuer"
    assert out.server_error is not None


def test_wrong_role_is_refused_on_both_sides(ca: X509CertificateAuthority, agg: Node,
                                             cli: Node) -> None:
    edge = ca.new_node(NodeURI(FED, Role.EDGE, "edge-1"))  # serverAuth too, but not a role
    out = run(_exchange(server_ctx(ca, edge), client_ctx(ca, cli)))
    assert isinstance(out.client_error, CertificateError)
    assert out.client_error.field == "role"
    operator = ca.new_node(NodeURI(FED, Role.OPERATOR, "op"))
    out = run(_exchange(server_ctx(ca, agg), client_ctx(ca, operator)))
    assert isinstance(out.server_error, CertificateError)
    assert out.server_error.field == "role"
    # TLS 1.3: the client's handshake completed first; it learns from the alert
    assert isinstance(out.client_error, HandshakeError)
    assert out.client_error.field == "peer_alert"


def test_client_certificate_cannot_act_as_server(ca: X509CertificateAuthority,
                                                 cli: Node) -> None:
    other_client = ca.new_node(NodeURI(FED, Role.CLIENT, "hosp-b"))
    out = run(_exchange(server_ctx(ca, other_client),
                        client_ctx(ca, cli, peer_roles=(Role.AGGREGATOR, Role.CLIENT))))
    assert isinstance(out.client_error, CertificateError)
    assert out.client_error.field == "extended_key_usage"  # clientAuth only


def test_wrong_pinned_node_id_is_refused(ca: X509CertificateAuthority, agg: Node,
                                         cli: Node) -> None:
    out = run(_exchange(server_ctx(ca, agg), client_ctx(ca, cli), pin="agg-2"))
    assert isinstance(out.client_error, CertificateError)
    assert out.client_error.field == "node_id"
    out = run(_exchange(server_ctx(ca, agg), client_ctx(ca, cli), pin="agg-1"))
    assert out.client_error is None


def test_expired_certificates_are_refused(ca: X509CertificateAuthority, agg: Node,
                                          cli: Node) -> None:
    past = time.time() - 10 * 86400
    expired_agg = (ca.issue(NodeURI(FED, Role.AGGREGATOR, "agg-1"), agg[1].public_key(),
                            validity_s=86400, not_before=past), agg[1])
    out = run(_exchange(server_ctx(ca, expired_agg), client_ctx(ca, cli)))
    assert isinstance(out.client_error, CertificateError)
    assert out.client_error.field == "not_after"
    expired_cli = (ca.issue(NodeURI(FED, Role.CLIENT, "hosp-a"), cli[1].public_key(),
                            validity_s=86400, not_before=past), cli[1])
    out = run(_exchange(server_ctx(ca, agg), client_ctx(ca, expired_cli)))
    assert isinstance(out.server_error, CertificateError)
    assert out.server_error.field == "not_after"


def test_revoked_serial_is_refused(ca: X509CertificateAuthority, agg: Node, cli: Node) -> None:
    trust = ca.trust.with_crl(ca.revocation_list([cli[0].serial_number], 1))
    sctx = server_ctx(ca, agg, trust=trust)
    out = run(_exchange(sctx, client_ctx(ca, cli)))
    assert isinstance(out.server_error, CertificateError)
    assert out.server_error.field == "serial"
    assert out.client_error is not None
    # a newer CRL without the serial, swapped in on the running context, lets it back in
    sctx.trust = trust.with_crl(ca.revocation_list([], 2))
    assert run(_exchange(sctx, client_ctx(ca, cli))).server_error is None


def test_config_refuses_classical_groups(ca: X509CertificateAuthority, cli: Node) -> None:
    with pytest.raises(HandshakeError) as err:
        TlsConfig(cli[0], cli[1], ca.trust, groups=("X25519",))
    assert err.value.field == "groups"


# --- foreign peers: plain pyOpenSSL on blocking sockets --------------------------------------

def _raw_context(cert: x509.Certificate, key: object, groups: str | None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate(cert)
    if isinstance(key, mldsa.MLDSA65PrivateKey):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, private_key_pem(key)))
    else:
        ctx.use_privatekey(key)  # type: ignore[arg-type]
    if groups:
        set_groups(ctx, tuple(groups.split(":")))
    ctx.set_verify(SSL.VERIFY_NONE)
    return ctx


def _raw_client(port: int, ctx: SSL.Context, result: list[object]) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:  # blocking: pyOpenSSL retries
        conn = SSL.Connection(ctx, s)
        conn.set_connect_state()
        try:
            conn.do_handshake()
            conn.sendall(b"ping")
            result.append(conn.recv(16))
        except SSL.Error as exc:
            result.append(exc)


async def _our_server_vs_raw_client(sctx: TlsContext, ctx: SSL.Context
                                    ) -> tuple[PqcError | None, object]:
    errors: list[PqcError | None] = []
    done = asyncio.Event()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ch = await tls_server_channel(r, w, sctx)
            errors.append(None)
            with contextlib.suppress(ConnectionError):  # the raw client may hang up first
                await ch.send(await ch.recv())
                await ch.close()
        except PqcError as exc:
            errors.append(exc)
        finally:
            done.set()

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    result: list[object] = []
    await asyncio.to_thread(_raw_client, port, ctx, result)
    await asyncio.wait_for(done.wait(), 20)
    srv.close()
    return errors[0], result[0]


def test_raw_client_harness_succeeds_with_pq_settings(ca: X509CertificateAuthority,
                                                      agg: Node, cli: Node) -> None:
    """The foreign-client harness itself works when it offers the hybrid group: the refusals
    below come from the group / the certificate, not from the harness."""
    server_error, client_result = asyncio.run(_our_server_vs_raw_client(
        server_ctx(ca, agg), _raw_context(cli[0], cli[1], "X25519MLKEM768")))
    assert server_error is None
    assert client_result == b"ping"


def test_client_offering_only_x25519_is_refused(ca: X509CertificateAuthority, agg: Node,
                                                cli: Node) -> None:
    server_error, client_result = asyncio.run(_our_server_vs_raw_client(
        server_ctx(ca, agg), _raw_context(cli[0], cli[1], "X25519")))
    assert isinstance(server_error, HandshakeError)
    assert server_error.field == "groups"
    assert isinstance(client_result, SSL.Error)


def _classical(ca: X509CertificateAuthority, uri: NodeURI, key: object) -> x509.Certificate:
    """A certificate our CA signs (ML-DSA-65) over a classical key, otherwise on profile."""
    real, _ = ca.new_node(uri)
    b = (x509.CertificateBuilder().subject_name(subject_name(uri))
         .issuer_name(ca.certificate.subject)
         .public_key(key.public_key())  # type: ignore[attr-defined]
         .serial_number(x509.random_serial_number())
         .not_valid_before(real.not_valid_before_utc).not_valid_after(real.not_valid_after_utc))
    for ext in real.extensions:
        if not isinstance(ext.value, x509.SubjectKeyIdentifier):
            b = b.add_extension(ext.value, ext.critical)
    return b.sign(ca.key, None)


def test_classical_client_certificate_is_refused(ca: X509CertificateAuthority,
                                                 agg: Node) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    cert = _classical(ca, NodeURI(FED, Role.CLIENT, "hosp-a"), key)
    server_error, client_result = asyncio.run(_our_server_vs_raw_client(
        server_ctx(ca, agg), _raw_context(cert, key, "X25519MLKEM768")))
    # the CertificateRequest lists ML-DSA-65 only, so OpenSSL's client withholds its Ed25519
    # certificate and the server finds none
    assert isinstance(server_error, HandshakeError)
    assert server_error.field == "certificate"
    assert client_result != b"ping"


def test_classical_server_certificate_is_refused(ca: X509CertificateAuthority,
                                                 cli: Node) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _classical(ca, NodeURI(FED, Role.AGGREGATOR, "agg-1"), key)
    ctx = _raw_context(cert, key, "X25519MLKEM768")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server_result: list[object] = []

    def serve() -> None:
        s, _ = listener.accept()
        with s:
            conn = SSL.Connection(ctx, s)
            conn.set_accept_state()
            try:
                conn.do_handshake()
                server_result.append(conn.recv(16))
            except SSL.Error as exc:
                server_result.append(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    async def go() -> PqcError | None:
        try:
            ch = await tls_connect("127.0.0.1", port, client_ctx(ca, cli))
        except PqcError as exc:
            return exc
        ch.abort()
        return None

    err = asyncio.run(go())
    t.join(10)
    listener.close()
    # the server finds no ML-DSA-65 signature algorithm for its ECDSA key and aborts
    assert isinstance(err, HandshakeError)
    assert err.field == "peer_alert"
    assert isinstance(server_result[0], SSL.Error)


def test_our_policy_refuses_a_classical_key_even_if_tls_accepted_it(
        ca: X509CertificateAuthority) -> None:
    """Second layer behind the ML-DSA-only signature algorithms: the leaf check."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _classical(ca, NodeURI(FED, Role.AGGREGATOR, "agg-1"), key)
    with pytest.raises(CertificateError) as err:
        ca.trust.verify(cert, usage=Usage.SERVER)
    assert err.value.field == "public_key"


def test_pem_round_trip_of_the_identity_files(ca: X509CertificateAuthority, cli: Node) -> None:
    pem = cli[0].public_bytes(serialization.Encoding.PEM)
    assert x509.load_pem_x509_certificate(pem) == cli[0]
    assert cli[0].not_valid_after_utc > datetime.datetime.now(datetime.UTC)


def test_tls12_client_is_refused(ca: X509CertificateAuthority, agg: Node, cli: Node) -> None:
    ctx = _raw_context(cli[0], cli[1], None)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    server_error, client_result = asyncio.run(_our_server_vs_raw_client(server_ctx(ca, agg), ctx))
    assert isinstance(server_error, HandshakeError)
    assert server_error.field == "version"
    assert isinstance(client_result, SSL.Error)


def test_mlkem1024_group_when_both_sides_choose_it(ca: X509CertificateAuthority, agg: Node,
                                                   cli: Node) -> None:
    groups = ("SecP384r1MLKEM1024",)
    out = run(_exchange(server_ctx(ca, agg, groups=groups), client_ctx(ca, cli, groups=groups)))
    assert out.client is not None and out.client.group == "SecP384r1MLKEM1024"
    # a server that allows only X25519MLKEM768 refuses that client
    out = run(_exchange(server_ctx(ca, agg), client_ctx(ca, cli, groups=groups)))
    assert isinstance(out.server_error, HandshakeError)
    assert out.server_error.field == "groups"


async def _relay_pair(sctx: TlsContext, cctx: TlsContext, tamper: bool
                      ) -> tuple[TlsChannel, TlsChannel, asyncio.Event]:
    """client -> relay -> server; once `armed` is set, the relay flips one bit of the next
    client-to-server chunk (a network attacker inside an established channel)."""
    armed = asyncio.Event()
    server_ch: asyncio.Future[TlsChannel] = asyncio.get_running_loop().create_future()

    async def on_server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        server_ch.set_result(await tls_server_channel(r, w, sctx))

    srv = await asyncio.start_server(on_server, "127.0.0.1", 0)
    sport = srv.sockets[0].getsockname()[1]

    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, flip: bool) -> None:
        while data := await r.read(1 << 16):
            if flip and tamper and armed.is_set():
                data = data[:-1] + bytes([data[-1] ^ 0x01])
                flip = False
            w.write(data)
            await w.drain()
        w.close()  # pass the end of the stream on

    async def on_relay(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", sport)
        await asyncio.gather(pump(cr, sw, True), pump(sr, cw, False), return_exceptions=True)

    relay = await asyncio.start_server(on_relay, "127.0.0.1", 0)
    client = await tls_connect("127.0.0.1", relay.sockets[0].getsockname()[1], cctx)
    server = await asyncio.wait_for(server_ch, 10)
    return client, server, armed


def test_tampered_record_is_refused(ca: X509CertificateAuthority, agg: Node, cli: Node) -> None:
    async def go() -> None:
        client, server, armed = await _relay_pair(server_ctx(ca, agg), client_ctx(ca, cli), True)
        await client.send(b"first")
        assert await server.recv() == b"first"
        armed.set()
        await client.send(b"x" * 1000)
        with pytest.raises(RecordError) as err:
            await server.recv()
        assert err.value.field == "tls"
    asyncio.run(go())


def test_truncation_without_close_notify_is_reported(ca: X509CertificateAuthority, agg: Node,
                                                     cli: Node) -> None:
    async def go() -> None:
        client, server, _ = await _relay_pair(server_ctx(ca, agg), client_ctx(ca, cli), False)
        await server.send(b"partial")
        assert await client.recv() == b"partial"
        server.abort()  # TCP ends, no close_notify
        with pytest.raises(RecordError) as err:
            await client.recv()
        assert err.value.field == "close"
    asyncio.run(go())


@dataclass
class _ThreadRecordingTrust:
    """The real trust anchor, noting which thread judged each peer (and how often)."""

    inner: object
    threads: list[str]

    @property
    def root(self) -> x509.Certificate:
        return self.inner.root  # type: ignore[attr-defined, no-any-return]

    def verify(self, cert: x509.Certificate, **kw: object) -> object:
        self.threads.append(threading.current_thread().name)
        return self.inner.verify(cert, **kw)  # type: ignore[attr-defined]


def test_handshake_steps_run_on_the_executor_and_signatures_are_timed(
        ca: X509CertificateAuthority, agg: Node, cli: Node) -> None:
    """With an executor, OpenSSL's handshake work (here: our leaf check inside it) runs off
    the event loop's thread, in parallel for parallel handshakes; `on_sign` sees each side's
    CertificateVerify signature."""
    from concurrent.futures import ThreadPoolExecutor

    seen: list[str] = []
    signed: list[float] = []
    trust = _ThreadRecordingTrust(ca.trust, seen)
    cfg = TlsConfig(agg[0], agg[1], trust, peer_roles=(Role.CLIENT,))  # type: ignore[arg-type]
    sctx = TlsContext(cfg, Usage.SERVER, on_sign=signed.append)
    cctx = TlsContext(TlsConfig(cli[0], cli[1], ca.trust, peer_roles=(Role.AGGREGATOR,)),
                      Usage.CLIENT, on_sign=signed.append)
    pool = ThreadPoolExecutor(2, "tls-test")

    async def main() -> None:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ch = await tls_server_channel(r, w, sctx, executor=pool)
            await ch.close()

        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        chans = await asyncio.gather(*(tls_connect("127.0.0.1", port, cctx, executor=pool)
                                       for _ in range(4)))
        for ch in chans:
            with contextlib.suppress(ChannelClosed):
                await ch.recv()
        srv.close()

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()
    assert len(seen) == 4 and all(name.startswith("tls-test") for name in seen)
    assert len(signed) == 8 and all(0 < s < 10 for s in signed)  # 4 server + 4 client
