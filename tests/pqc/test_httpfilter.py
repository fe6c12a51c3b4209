"""The sidecar's HTTP/1.1 allow-list: only Fleet API requests pass; smuggling shapes fail."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pqfed.pqc.identity import CertificateAuthority, Identity
from pqfed.pqc.sidecar import Endpoint, Route, Sidecar, SidecarConfig
from pqfed.pqc.sidecar.httpfilter import HttpRequestFilter, RequestRejected

FLEET = ("/v1/fleet/",)


def req(path: str = "/v1/fleet/pull-messages", body: bytes = b"abc",
        extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode() + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_allowed_requests_pass_unchanged_even_byte_by_byte() -> None:
    stream = req() + req("/v1/fleet/push-messages", b"x" * 1000) + (
        b"POST /v1/fleet/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n") + b"GET /v1/fleet/get-run?x=1 HTTP/1.1\r\nHost: y\r\n\r\n"
    whole = HttpRequestFilter(FLEET)
    assert whole.feed(stream) == stream and whole.requests == 4
    bytewise = HttpRequestFilter(FLEET)
    assert b"".join(bytewise.feed(stream[i:i + 1]) for i in range(len(stream))) == stream


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (req("/v1/control/start-run"), "path"),
        (req("/v1/fleet/../control/start-run"), "path"),
        (req("/v1/fleet/%2e%2e/control/x"), "path"),
        (req("/v1/fleet//x"), "path"),
        (req("/v1/fleet/x", extra=b"Transfer-Encoding: chunked\r\n"), "transfer-encoding"),
        (req("/v1/fleet/x", extra=b"Content-Length: 5\r\n"), "content-length"),
        (req("/v1/fleet/x", extra=b" folded\r\n"), "header"),
        (req("/v1/fleet/x", extra=b"Upgrade: h2c\r\n"), "upgrade"),
        (b"POST /v1/fleet/x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
         "transfer-encoding"),
        (b"POST /v1/fleet/x HTTP/1.0\r\n\r\n", "version"),
        (b"DELETE /v1/fleet/x HTTP/1.1\r\n\r\n", "method"),
        (b"POST http://evil/v1/fleet/x HTTP/1.1\r\n\r\n", "path"),
        (b"POST /v1/fleet/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk"),
        (b"POST /v1/fleet/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX", "chunk"),
        (b"GET /v1/fleet/x HTTP/1.1\r\n" + b"A: " + b"b" * 70000, "head"),
    ],
)
def test_disallowed_or_ambiguous_requests_are_rejected(data: bytes, field: str) -> None:
    with pytest.raises(RequestRejected) as err:
        HttpRequestFilter(FLEET).feed(data)
    assert err.value.field == field


CHUNKED = b"POST /v1/fleet/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        # Parsers disagree on these: an h11 upstream ends a line at a bare LF.
        (req(extra=b"X: a\nTransfer-Encoding: chunked\r\n"), "header"),
        (req(extra=b"X: a\rb\r\n"), "header"),
        (req(extra=b"X: a\x00b\r\n"), "header"),
        (req(extra=b"X: a\x7fb\r\n"), "header"),
        (req(extra=b"X\n: a\r\n"), "header"),
        (b"GET /v1/fleet/x\n HTTP/1.1\r\n\r\n", "request-line"),
        (b"GET /v1/fleet/x\nGET /v1/control/x HTTP/1.1\r\n\r\n", "request-line"),
        (CHUNKED + b"3;x=\n\r\nabc\r\n0\r\n\r\n", "chunk"),
        (CHUNKED + b"3\nGET /v1/control/x HTTP/1.1\r\nabc\r\n", "chunk"),
        (CHUNKED + b"3\r\nabc\r\n0\r\nX: a\nGET /v1/control/stop-run HTTP/1.1\r\n\r\n",
         "trailer"),
        (CHUNKED + b"0\r\nnot a field\r\n\r\n", "trailer"),
        (CHUNKED + b"0\r\n" + b"X: y\r\n" * 2000 + b"\r\n", "trailer"),
        (CHUNKED + b"f" * 2000, "chunk"),
        # A whole oversized head in one read is refused too (the limit was soft).
        (b"GET /v1/fleet/x HTTP/1.1\r\nA: " + b"b" * 70000 + b"\r\n\r\n", "head"),
    ],
)
def test_control_bytes_and_oversize_anywhere_are_refused(data: bytes, field: str) -> None:
    with pytest.raises(RequestRejected) as err:
        HttpRequestFilter(FLEET).feed(data)
    assert err.value.field == field


def test_requests_are_reserialised_not_passed_through() -> None:
    f = HttpRequestFilter(FLEET)
    got = f.feed(b"POST /v1/fleet/x HTTP/1.1\r\nHost:   a \t\r\nTransfer-Encoding: chunked\r\n"
                 b"\r\n0003;ext=1\r\nabc\r\n0\r\nTrailer-Field: x\r\n\r\n")
    assert got == (b"POST /v1/fleet/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                   b"\r\n3\r\nabc\r\n0\r\n\r\n")
    assert f.requests == 1


def test_second_pipelined_request_is_checked_too() -> None:
    f = HttpRequestFilter(FLEET)
    with pytest.raises(RequestRejected, match="outside"):
        f.feed(req() + req("/v1/control/stop-run"))


def test_sidecar_blocks_control_api_and_answers_403(tmp_path: Path, ca: CertificateAuthority,
                                                   client: Identity,
                                                   aggregator: Identity) -> None:
    async def main() -> None:
        seen: list[bytes] = []

        async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                seen.append(data)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await w.drain()

        app = await asyncio.start_server(upstream, "127.0.0.1", 0)
        for name, ident in (("agg", aggregator), ("cli", client)):
            ident.save(tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        (tmp_path / "ca.crt").write_text(ca.root.to_pem())
        server = Sidecar(SidecarConfig(
            cert=tmp_path / "agg.crt", key=tmp_path / "agg.key", ca=tmp_path / "ca.crt",
            listen=Endpoint("127.0.0.1", 0),
            upstream=Endpoint("127.0.0.1", app.sockets[0].getsockname()[1]), admin=None,
            allow_path_prefixes=FLEET))
        await server.start()
        side = Sidecar(SidecarConfig(
            cert=tmp_path / "cli.crt", key=tmp_path / "cli.key", ca=tmp_path / "ca.crt",
            admin=None, routes=(Route(Endpoint("127.0.0.1", 0),
                                      Endpoint("127.0.0.1", server.bound["listen"])),)))
        await side.start()
        r, w = await asyncio.open_connection("127.0.0.1", side.bound["route0"])
        w.write(req())
        assert (await r.readexactly(40)).startswith(b"HTTP/1.1 200 OK")
        w.write(req("/v1/control/start-run", b"evil"))
        answer = await r.read()
        assert answer.startswith(b"HTTP/1.1 403 Forbidden") and b"outside" in answer
        assert b"evil" not in b"".join(seen) and len(seen) == 1
        fails = server.metrics.registry.get_sample_value(
            "pqfed_channel_failures_total", {"stage": "http", "field": "path"})
        assert fails == 1
        await side.stop()
        await server.stop()
        app.close()

    asyncio.run(main())


def test_the_sidecar_alone_names_the_peer() -> None:
    """With `peer`, each forwarded request says which certificate sent it; a peer's own
    X-Pqfed-Peer header (claiming another node) is dropped, in any case of its name."""
    forged = req(extra=b"x-PQFED-peer: client-9\r\n") + req("/v1/fleet/register-node")
    out = HttpRequestFilter(FLEET, peer="client-1").feed(forged)
    assert out.count(b"X-Pqfed-Peer: client-1\r\n") == 2
    assert b"client-9" not in out
    assert HttpRequestFilter(FLEET).feed(req()) == req()  # off by default
    with pytest.raises(ValueError, match="header value"):
        HttpRequestFilter(FLEET, peer="bad\r\nX: y")
