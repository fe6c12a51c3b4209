"""Two real sidecars (client and aggregator) carrying an app's TCP stream, plus the admin API.

Every test that concerns the channel runs over both protocols (`pki` fixture: pqfed1 with
pqfed certificates, tls13 with X.509 ones); the config checks are protocol-independent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pqfed.pqc.identity import Role
from pqfed.pqc.sidecar import Endpoint, Route, Sidecar, SidecarConfig
from pqfed.pqc.sidecar.admin import build_admin_app
from pqfed.pqc.sidecar.config import ConfigError

from .cuttable_relay import cuttable_relay
from .sidecar_pki import Node, Pki, dial, make_pki


@pytest.fixture(scope="module", params=["pqfed1", "tls13"])
def pki(request: pytest.FixtureRequest) -> Pki:
    return make_pki(request.param)


@pytest.fixture(scope="module")
def aggregator(pki: Pki) -> Node:
    return pki.node("aggregator", Role.AGGREGATOR)


@pytest.fixture(scope="module")
def client(pki: Pki) -> Node:
    return pki.node("client-1", Role.CLIENT)


def _write(tmp: Path, name: str, node: Node, pki: Pki) -> SidecarConfig:
    node.save(tmp / f"{name}.crt", tmp / f"{name}.key")
    (tmp / f"{name}-ca.crt").write_bytes(pki.ca_pem())
    return SidecarConfig(cert=tmp / f"{name}.crt", key=tmp / f"{name}.key",
                         ca=tmp / f"{name}-ca.crt",
                         routes=(Route(Endpoint("127.0.0.1", 0), Endpoint("127.0.0.1", 1)),),
                         admin=None, protocol=pki.protocol)


def _outbound(tmp: Path, pki: Pki, node: Node, port: int, name: str = "cli") -> Sidecar:
    """A client-side sidecar whose route pins the peer node id 'aggregator'."""
    base = _write(tmp, name, node, pki)
    return Sidecar(SidecarConfig(
        cert=base.cert, key=base.key, ca=base.ca, admin=None, protocol=pki.protocol,
        routes=(Route(Endpoint("127.0.0.1", 0), Endpoint("127.0.0.1", port), "aggregator"),)))


def _inbound(tmp_path: Path, pki: Pki, aggregator: Node, app_port: int,
             **extra: object) -> Sidecar:
    base = _write(tmp_path, "agg", aggregator, pki)
    return Sidecar(SidecarConfig(cert=base.cert, key=base.key, ca=base.ca,
                                 listen=Endpoint("127.0.0.1", 0),
                                 upstream=Endpoint("127.0.0.1", app_port), admin=None,
                                 protocol=pki.protocol, **extra))  # type: ignore[arg-type]


def _failures(sidecar: Sidecar, stage: str, field: str) -> float | None:
    return sidecar.metrics.registry.get_sample_value(
        "pqfed_channel_failures_total", {"stage": stage, "field": field})


async def _upper_app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data.upper())
        await w.drain()
    w.close()


def test_app_traffic_flows_through_two_sidecars(tmp_path: Path, pki: Pki, client: Node,
                                                aggregator: Node) -> None:
    async def main() -> None:
        app = await asyncio.start_server(_upper_app, "127.0.0.1", 0)
        server = _inbound(tmp_path, pki, aggregator, app.sockets[0].getsockname()[1])
        await server.start()
        side = _outbound(tmp_path, pki, client, server.bound["listen"])
        await side.start()
        r, w = await asyncio.open_connection("127.0.0.1", side.bound["route0"])
        payload = b"weights " * 50000
        w.write(payload)
        await w.drain()
        got = await r.readexactly(len(payload))
        assert got == payload.upper()
        w.close()
        await asyncio.sleep(0.1)
        metrics = server.metrics.registry
        assert metrics.get_sample_value("pqfed_handshake_seconds_count", {"side": "server"}) == 1
        assert (metrics.get_sample_value("pqfed_verify_seconds_count") or 0) >= 1
        for node in (side, server):  # both protocols; TLS 1.3 times OpenSSL's signature
            assert node.metrics.registry.get_sample_value("pqfed_sign_seconds_count") == 1
            assert (node.metrics.registry.get_sample_value("pqfed_sign_seconds_sum") or 0) > 0
        assert (metrics.get_sample_value("pqfed_channel_bytes_total", {"direction": "rx"})
                or 0) > len(payload)
        await side.stop()
        await server.stop()
        app.close()

    asyncio.run(main())


def test_wrong_aggregator_identity_never_reaches_app(
        tmp_path: Path, pki: Pki, client: Node, caplog: pytest.LogCaptureFixture) -> None:
    """The client's route pins node id 'aggregator'; an impostor with a valid certificate for
    another aggregator name is refused and the app connection is closed."""
    impostor = pki.node("aggregator-evil", Role.AGGREGATOR)
    caplog.set_level(logging.WARNING)

    async def main() -> None:
        reached: list[bytes] = []

        async def app_fn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            reached.append(await r.read(100))

        app = await asyncio.start_server(app_fn, "127.0.0.1", 0)
        server = _inbound(tmp_path, pki, impostor, app.sockets[0].getsockname()[1])
        await server.start()
        side = _outbound(tmp_path, pki, client, server.bound["listen"])
        await side.start()
        r, w = await asyncio.open_connection("127.0.0.1", side.bound["route0"])
        w.write(b"secret update")
        with pytest.raises(ConnectionResetError):  # an error, not an empty answer
            await asyncio.wait_for(r.read(), 10)
        await asyncio.sleep(0.1)
        assert reached == []
        assert _failures(side, "handshake", pki.handshake_field("client", "node_id")) == 1
        await side.stop()
        await server.stop()
        app.close()

    asyncio.run(main())
    assert "aggregator-evil" in caplog.text


@pytest.mark.parametrize(("case", "fields"), [
    # A client of a second CA with the same federation name.
    ("other_ca", {"pqfed1": "client_flight.certificate.issuer", "tls13": "certificate.issuer"}),
    # A client offering the classical X25519 group only (no ML-KEM share).
    ("classical", {"pqfed1": "client_hello.key_share.group", "tls13": "groups"}),
    # A client whose certificate expired.
    ("expired", {"pqfed1": "client_flight.certificate.not_after",
                 "tls13": "certificate.not_after"}),
])
def test_the_aggregator_refuses_a_bad_client(tmp_path: Path, pki: Pki, aggregator: Node,
                                             case: str, fields: dict[str, str]) -> None:
    """Bare clients (no sidecar would run with such an identity): each is refused by the
    aggregator's sidecar, counted under its field, and never reaches the app."""
    from pqfed.pqc.errors import PqcError

    trust = pki
    if case == "other_ca":
        trust = pki.other()
        node = trust.node("client-1", Role.CLIENT)
    else:
        node = pki.node("client-1", Role.CLIENT, expired=case == "expired")

    async def main() -> None:
        reached: list[bytes] = []

        async def app_fn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            reached.append(await r.read(100))

        app = await asyncio.start_server(app_fn, "127.0.0.1", 0)
        server = _inbound(tmp_path, pki, aggregator, app.sockets[0].getsockname()[1])
        await server.start()
        # The bare client trusts the aggregator's CA: only the aggregator's check stops it.
        try:
            channel = await dial(pki, server.bound["listen"], node, trust=pki,
                                 classical=case == "classical")
            await channel.send(b"POST /v1/fleet/push-messages HTTP/1.1\r\n\r\n")
            # TLS 1.3: the client's handshake ends before the server's verdict (RFC 8446
            # §4.4.2); the refusal arrives as an alert on its first read.
            await asyncio.wait_for(channel.recv(), 10)
            accepted = True
        except (PqcError, ConnectionError):
            accepted = False
        await asyncio.sleep(0.1)
        failed = {s.labels["field"]: s.value for m in server.metrics.registry.collect()
                  for s in m.samples if s.name == "pqfed_channel_failures_total" and s.value}
        assert not accepted and reached == [], failed
        assert failed == {fields[pki.protocol.value]: 1}
        await server.stop()
        app.close()

    asyncio.run(main())


def test_admin_endpoints(tmp_path: Path, pki: Pki, client: Node) -> None:
    sidecar = Sidecar(_write(tmp_path, "cli", client, pki))
    api = TestClient(build_admin_app(sidecar))
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").status_code == 503  # listeners not started yet
    sidecar.ready = True
    assert api.get("/readyz").status_code == 200
    ident = api.get("/identity").json()
    assert ident["nodeId"] == "client-1" and ident["signatureAlgorithm"] == "ML-DSA-65"
    assert ident["protocol"] == pki.protocol.value and ident["serial"] == client.serial
    assert ident["role"] == "client" and ident["groups"]
    assert ident["backends"] == {"pyca": "ok", "liboqs": "ok"}
    assert ident["backend"]["backend"] == "liboqs"  # auto: the faster one, built by make
    text = api.get("/metrics").text
    assert "pqfed_handshake_seconds_bucket" in text and "pqfed_channel_bytes_total" in text


def test_sidecar_refuses_foreign_identity(tmp_path: Path, pki: Pki) -> None:
    from pqfed.pqc.errors import CertificateError

    stranger = pki.other().node("client-1", Role.CLIENT)
    with pytest.raises(CertificateError, match="issuer"):
        Sidecar(_write(tmp_path, "x", stranger, pki))


def test_sidecar_refuses_its_own_expired_certificate(tmp_path: Path, pki: Pki) -> None:
    from pqfed.pqc.errors import CertificateError

    with pytest.raises(CertificateError, match="expired") as err:
        Sidecar(_write(tmp_path, "x", pki.node("client-1", Role.CLIENT, expired=True), pki))
    assert err.value.field == "not_after"

@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"key": "k", "ca": "c", "routes": ["127.0.0.1:1=h:2"]}, "cert"),
        ({"cert": "a", "key": "k", "ca": "c", "routes": ["10.0.0.1:1=h:2"]}, "routes.listen"),
        ({"cert": "a", "key": "k", "ca": "c", "routes": ["nope"]}, "routes"),
        ({"cert": "a", "key": "k", "ca": "c", "listen": "0.0.0.0:7443"}, "listen"),
        ({"cert": "a", "key": "k", "ca": "c", "listen": "0.0.0.0:1", "upstream": "10.1.1.1:2"},
         "upstream"),
        ({"cert": "a", "key": "k", "ca": "c", "routes": ["127.0.0.1:1=h:2"], "grups": []},
         "grups"),
        ({"cert": "a", "key": "k", "ca": "c", "routes": ["127.0.0.1:1=h:2"], "groups": ["P256"]},
         "groups"),
        ({"cert": "a", "key": "k", "ca": "c", "listen": "0.0.0.0:99999", "upstream": "x:1"},
         "listen"),
    ],
)
def test_bad_config_names_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        SidecarConfig.from_mapping(data)
    assert err.value.field == field


def test_malformed_handshake_frames_are_counted_not_raised(
        tmp_path: Path, pki: Pki, aggregator: Node,
        caplog: pytest.LogCaptureFixture) -> None:
    """A garbage frame used to escape the sidecar's error handling: a traceback per
    connection and nothing in the metrics."""
    caplog.set_level(logging.ERROR)

    async def main() -> None:
        server = _inbound(tmp_path, pki, aggregator, 1)
        await server.start()
        for garbage in (b"\xff" * 64, b"\x00\x00\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n"):
            r, w = await asyncio.open_connection("127.0.0.1", server.bound["listen"])
            w.write(garbage)
            await w.drain()
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
        await asyncio.sleep(0.2)
        samples = [s for m in server.metrics.registry.collect() for s in m.samples
                   if s.name == "pqfed_channel_failures_total" and s.labels["stage"] ==
                   "handshake"]
        assert sum(s.value for s in samples) == 3, samples
        await server.stop()

    asyncio.run(main())
    assert "Traceback" not in caplog.text and "exception" not in caplog.text.lower()


def test_unauthenticated_handshakes_are_capped(tmp_path: Path, pki: Pki,
                                               aggregator: Node) -> None:
    async def main() -> None:
        server = _inbound(tmp_path, pki, aggregator, 1, max_pending_handshakes=2)
        await server.start()
        idle = [await asyncio.open_connection("127.0.0.1", server.bound["listen"])
                for _ in range(2)]  # they never send a ClientHello
        await asyncio.sleep(0.2)
        r, w = await asyncio.open_connection("127.0.0.1", server.bound["listen"])
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(r.read(), 5) == b""  # refused at once
        assert server.metrics.registry.get_sample_value(
            "pqfed_channel_failures_total", {"stage": "handshake", "field": "capacity"}) == 1
        for _, iw in idle:
            iw.close()
        w.close()
        await server.stop()

    asyncio.run(main())


def test_a_channel_cut_mid_response_resets_the_app_connection(
        tmp_path: Path, pki: Pki, client: Node, aggregator: Node) -> None:
    """The client app must not take a truncated response for a whole one: a channel that
    breaks (no authenticated close) ends its connection with a reset, not a FIN."""
    async def main() -> None:
        async def app_fn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read(100)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\npartial")
            await w.drain()
            await asyncio.sleep(30)

        app = await asyncio.start_server(app_fn, "127.0.0.1", 0)
        server = _inbound(tmp_path, pki, aggregator, app.sockets[0].getsockname()[1])
        await server.start()

        # A TCP relay in front of the aggregator's sidecar that we can cut.
        mitm = await cuttable_relay(server.bound["listen"])
        side = _outbound(tmp_path, pki, client, mitm.port)
        await side.start()
        r, w = await asyncio.open_connection("127.0.0.1", side.bound["route0"])
        w.write(b"GET /v1/fleet/x HTTP/1.1\r\n\r\n")
        await w.drain()
        assert (await r.readuntil(b"partial")).endswith(b"partial")
        mitm.links[0][0].transport.abort()  # the network cuts the channel mid-response
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 10)
        w.close()
        await side.stop()
        await server.stop()
        mitm.close()
        app.close()

    asyncio.run(main())


def test_edge_only_sidecar_refuses_a_client(tmp_path: Path, pki: Pki, client: Node,
                                            aggregator: Node) -> None:
    async def main() -> None:
        server = _inbound(tmp_path, pki, aggregator, 1, allowed_client_roles=(Role.EDGE,))
        await server.start()
        side = _outbound(tmp_path, pki, client, server.bound["listen"])
        await side.start()
        r, w = await asyncio.open_connection("127.0.0.1", side.bound["route0"])
        w.write(b"POST /v1/fleet/push-messages HTTP/1.1\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 10)
        await asyncio.sleep(0.1)
        assert _failures(server, "handshake", pki.handshake_field("server", "role")) == 1
        await side.stop()
        await server.stop()

    asyncio.run(main())


def _request(method: str, path: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode()
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def _recording_app(seen: list[bytes], answer: bytes) -> asyncio.Server:
    async def app_fn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            seen.append(data)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            await w.drain()
        w.close()

    return await asyncio.start_server(app_fn, "127.0.0.1", 0)


async def _ask(port: int, request: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(request)
    await w.drain()
    try:
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        return head + await asyncio.wait_for(r.readexactly(length), 10)
    except (ConnectionResetError, asyncio.IncompleteReadError):
        return b"reset"
    finally:
        w.close()


def test_http_allow_list_refuses_other_paths(tmp_path: Path, pki: Pki, client: Node,
                                             aggregator: Node) -> None:
    """Inbound, a peer may send HTTP/1.1 requests under the allowed prefixes only: anything
    else gets a 403 from the sidecar and never reaches the app."""
    async def main() -> None:
        seen: list[bytes] = []
        app = await _recording_app(seen, b"fleet")
        server = _inbound(tmp_path, pki, aggregator, app.sockets[0].getsockname()[1],
                          allow_path_prefixes=("/v1/fleet/",))
        await server.start()
        side = _outbound(tmp_path, pki, client, server.bound["listen"])
        await side.start()
        r, w = await asyncio.open_connection("127.0.0.1", side.bound["route0"])
        w.write(_request("POST", "/v1/fleet/pull-messages", b"abc"))
        assert (await r.readuntil(b"fleet")).startswith(b"HTTP/1.1 200 OK")
        w.write(_request("POST", "/v1/control/start-run", b"evil"))
        answer = await asyncio.wait_for(r.read(), 10)
        assert answer.startswith(b"HTTP/1.1 403 Forbidden") and b"outside" in answer
        w.close()
        assert len(seen) == 1 and b"evil" not in b"".join(seen)
        assert b"X-Pqfed-Peer: client-1" in seen[0]  # the sidecar names the peer
        assert _failures(server, "http", "path") == 1
        await side.stop()
        await server.stop()
        app.close()

    asyncio.run(main())


def test_operator_reaches_only_get_status_and_checkpoint(tmp_path: Path, pki: Pki,
                                                         aggregator: Node) -> None:
    """An operator identity is routed to the status API, GET /status and /checkpoint only;
    an aggregator sidecar without an operator upstream refuses it at the handshake."""
    operator = pki.node("operator", Role.OPERATOR)

    async def main() -> None:
        fleet: list[bytes] = []
        status: list[bytes] = []
        fleet_app = await _recording_app(fleet, b"fleet")
        status_app = await _recording_app(status, b"status")
        server = _inbound(
            tmp_path, pki, aggregator, fleet_app.sockets[0].getsockname()[1],
            allow_path_prefixes=("/v1/fleet/",),
            operator_upstream=Endpoint("127.0.0.1", status_app.sockets[0].getsockname()[1]))
        await server.start()
        side = _outbound(tmp_path, pki, operator, server.bound["listen"], name="op")
        await side.start()
        port = side.bound["route0"]
        assert (await _ask(port, _request("GET", "/status"))).endswith(b"status")
        assert (await _ask(port, _request("GET", "/checkpoint"))).endswith(b"status")
        for refused in (_request("POST", "/status", b"x"), _request("GET", "/v1/fleet/x"),
                        _request("GET", "/metrics")):
            assert (await _ask(port, refused)).startswith(b"HTTP/1.1 403"), refused
        assert len(status) == 2 and fleet == []
        await server.stop()
        # Without an operator upstream the operator role is not admitted at all.
        closed = _inbound(tmp_path, pki, aggregator, fleet_app.sockets[0].getsockname()[1])
        await closed.start()
        side2 = _outbound(tmp_path, pki, operator, closed.bound["listen"], name="op2")
        await side2.start()
        assert await _ask(side2.bound["route0"], _request("GET", "/status")) == b"reset"
        await asyncio.sleep(0.1)
        assert _failures(closed, "handshake", pki.handshake_field("server", "role")) == 1
        assert fleet == [] and len(status) == 2
        for sc in (side, side2, closed):
            await sc.stop()
        fleet_app.close()
        status_app.close()

    asyncio.run(main())
