"""Two real sidecars: a revocation list published mid-stream cuts the revoked peer's channel
(either direction) and refuses its reconnection; a renewed identity is hot-reloaded. Both
protocols: pqfed1 with pqfed revocation lists, tls13 with X.509 CRLs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pqfed.pqc.identity import Role
from pqfed.pqc.sidecar import Endpoint, Route, Sidecar, SidecarConfig

from .sidecar_pki import Node, Pki, make_pki

RELOAD_S = 0.05
PROTOCOLS = ["pqfed1", "tls13"]


async def _upper_app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data.upper())
        await w.drain()
    w.close()


def _files(tmp: Path, name: str, node: Node, pki: Pki) -> tuple[Path, Path]:
    d = tmp / name
    d.mkdir(exist_ok=True)
    node.save(d / "tls.crt", d / "tls.key")
    (d / "ca.crt").write_bytes(pki.ca_pem())
    return d, d / "crl.pem"


async def _pair(tmp: Path, pki: Pki, agg: Node, cli: Node
                ) -> tuple[Sidecar, Sidecar, asyncio.Server]:
    app = await asyncio.start_server(_upper_app, "127.0.0.1", 0)
    d, crl = _files(tmp, "agg", agg, pki)
    server = Sidecar(SidecarConfig(
        cert=d / "tls.crt", key=d / "tls.key", ca=d / "ca.crt", crl=crl,
        listen=Endpoint("127.0.0.1", 0),
        upstream=Endpoint("127.0.0.1", app.sockets[0].getsockname()[1]), admin=None,
        reload_interval_s=RELOAD_S, protocol=pki.protocol))
    await server.start()
    d, crl = _files(tmp, "cli", cli, pki)
    side = Sidecar(SidecarConfig(
        cert=d / "tls.crt", key=d / "tls.key", ca=d / "ca.crt", crl=crl, admin=None,
        routes=(Route(Endpoint("127.0.0.1", 0),
                      Endpoint("127.0.0.1", server.bound["listen"]), "aggregator"),),
        reload_interval_s=RELOAD_S, protocol=pki.protocol))
    await side.start()
    return server, side, app


async def _echo(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"round 1")
    await w.drain()
    assert await asyncio.wait_for(r.readexactly(7), 10) == b"ROUND 1"
    return r, w


async def _until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(RELOAD_S)
    raise AssertionError(f"timed out waiting for {what}")


def _federation(protocol: str, name: str) -> tuple[Pki, Node, Node]:
    pki = make_pki(protocol, name)
    return pki, pki.node("aggregator", Role.AGGREGATOR), pki.node("client-1", Role.CLIENT)


def _run(tmp_path: Path, pki: Pki, agg: Node, cli: Node,
         body: Callable[[Sidecar, Sidecar], Awaitable[None]]) -> None:
    async def main() -> None:
        server, side, app = await _pair(tmp_path, pki, agg, cli)
        try:
            await body(server, side)
        finally:
            await side.stop()
            await server.stop()
            app.close()

    asyncio.run(main())


def _crl_file(sidecar: Sidecar) -> Path:
    assert sidecar.config.crl is not None
    return sidecar.config.crl


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("revoker", ["aggregator", "client"])
def test_revocation_mid_stream_cuts_channel_and_refuses_reconnection(
        tmp_path: Path, revoker: str, protocol: str) -> None:
    """The aggregator revokes the client (or the client learns that the aggregator is
    revoked): the open channel is cut at once and the next handshake fails."""
    pki, agg, cli = _federation(protocol, "fed-revoke")

    async def body(server: Sidecar, side: Sidecar) -> None:
        r, w = await _echo(side.bound["route0"])
        holder, victim = (server, cli) if revoker == "aggregator" else (side, agg)
        assert [p.node_id for p in holder.channel_peers()] == [victim.node_id]
        _crl_file(holder).write_bytes(pki.crl(1, (victim.serial,)))
        await _until(lambda: holder.cut == 1, "the channel to be cut")
        assert holder.metrics.registry.get_sample_value("pqfed_revocation_list_number") == 1
        # The app sees an error, never a clean end it could take for a complete answer.
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 10)
        w.close()
        assert holder.channel_peers() == []
        r2, w2 = await asyncio.open_connection("127.0.0.1", side.bound["route0"])
        w2.write(b"again")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r2.read(), 10)
        w2.close()
        failures = holder.metrics.registry.get_sample_value(
            "pqfed_channel_failures_total", {"stage": "revoked", "field": "serial"})
        assert failures == 1

    _run(tmp_path, pki, agg, cli, body)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_other_peers_keep_their_channels_and_old_lists_are_ignored(
        tmp_path: Path, protocol: str) -> None:
    pki, agg, cli = _federation(protocol, "fed-revoke")

    async def body(server: Sidecar, side: Sidecar) -> None:
        r, w = await _echo(side.bound["route0"])
        crl = _crl_file(server)
        crl.write_bytes(pki.crl(5, (12345,)))  # someone else's serial
        await _until(lambda: server.crl_number == 5, "the list to load")
        # A lower-numbered list revoking the client: a rollback, ignored.
        crl.write_bytes(pki.crl(4, (cli.serial,)))
        await _until(lambda: server.protocol.store.rejected == 1, "the rollback to be refused")
        # The same number with other content: refused too.
        crl.write_bytes(pki.crl(5, (cli.serial,)))
        await _until(lambda: server.protocol.store.rejected == 2, "the conflict to be refused")
        # Deleting the file is no un-revocation: the list in force stays.
        crl.unlink()
        server.reload()
        assert server.crl_number == 5
        w.write(b"round 2")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(7), 10) == b"ROUND 2"
        assert server.cut == 0
        assert server.metrics.registry.get_sample_value(
            "pqfed_revocation_list_number") == 5
        w.close()

    _run(tmp_path, pki, agg, cli, body)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_renewed_identity_is_hot_reloaded(tmp_path: Path, protocol: str) -> None:
    pki, agg, cli = _federation(protocol, "fed-renew")

    async def body(server: Sidecar, side: Sidecar) -> None:
        _, w = await _echo(side.bound["route0"])
        w.close()
        renewed = pki.node("client-1", Role.CLIENT)
        renewed.save(side.config.cert, side.config.key)
        await _until(lambda: side.protocol.identity.serial == renewed.serial, "renewal")
        # The old certificate can now be revoked without cutting the renewed client off.
        _crl_file(server).write_bytes(pki.crl(1, (cli.serial,)))
        await _until(lambda: server.crl_number == 1, "the list to load")
        _r, w = await _echo(side.bound["route0"])
        assert [p.serial for p in server.channel_peers()] == [renewed.serial]
        w.close()
        # A foreign identity dropped into the directory is not taken.
        pki.other().node("client-1", Role.CLIENT).save(side.config.cert, side.config.key)
        await _until(lambda: side.metrics.registry.get_sample_value(
            "pqfed_channel_failures_total", {"stage": "identity_reload", "field": "issuer"})
            == 1, "the foreign identity to be refused")
        assert side.protocol.identity.serial == renewed.serial

    _run(tmp_path, pki, agg, cli, body)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stale_list_refuses_new_handshakes_until_a_fresh_one_arrives(
        tmp_path: Path, protocol: str) -> None:
    """Past its nextUpdate a list says nothing about revocations since: the sidecar refuses
    peers (fail closed) until the CA publishes the next one."""
    pki, agg, cli = _federation(protocol, "fed-stale")

    async def body(server: Sidecar, side: Sidecar) -> None:
        crl = _crl_file(server)
        crl.write_bytes(pki.crl(1, issued=int(time.time()) - 100, validity_s=50))
        await _until(lambda: server.crl_number == 1, "the stale list to load")
        r, w = await asyncio.open_connection("127.0.0.1", side.bound["route0"])
        w.write(b"round 1")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 10)
        w.close()
        assert server.metrics.registry.get_sample_value(
            "pqfed_channel_failures_total",
            {"stage": "handshake", "field": pki.handshake_field("server", "crl")}) == 1
        crl.write_bytes(pki.crl(2))
        await _until(lambda: server.metrics.registry.get_sample_value(
            "pqfed_revocation_list_number") == 2, "the fresh list")
        _, w = await _echo(side.bound["route0"])
        w.close()

    _run(tmp_path, pki, agg, cli, body)
