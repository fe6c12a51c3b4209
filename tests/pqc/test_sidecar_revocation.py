"""Two real sidecars: a revocation list published mid-stream cuts the revoked peer's channel
(either direction) and refuses its reconnection; a renewed identity is hot-reloaded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.pqc.revocation import RevocationReason
from pqfed.pqc.sidecar import Endpoint, Route, Sidecar, SidecarConfig

RELOAD_S = 0.05


async def _upper_app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data.upper())
        await w.drain()
    w.close()


def _files(tmp: Path, name: str, ident: Identity, ca: CertificateAuthority) -> tuple[Path, Path]:
    d = tmp / name
    d.mkdir(exist_ok=True)
    ident.save(d / "tls.crt", d / "tls.key")
    (d / "ca.crt").write_text(ca.root.to_pem())
    return d, d / "crl.pem"


async def _pair(tmp: Path, ca: CertificateAuthority, agg: Identity, cli: Identity
                ) -> tuple[Sidecar, Sidecar, asyncio.Server]:
    app = await asyncio.start_server(_upper_app, "127.0.0.1", 0)
    d, crl = _files(tmp, "agg", agg, ca)
    server = Sidecar(SidecarConfig(
        cert=d / "tls.crt", key=d / "tls.key", ca=d / "ca.crt", crl=crl,
        listen=Endpoint("127.0.0.1", 0),
        upstream=Endpoint("127.0.0.1", app.sockets[0].getsockname()[1]), admin=None,
        reload_interval_s=RELOAD_S))
    await server.start()
    d, crl = _files(tmp, "cli", cli, ca)
    side = Sidecar(SidecarConfig(
        cert=d / "tls.crt", key=d / "tls.key", ca=d / "ca.crt", crl=crl, admin=None,
        routes=(Route(Endpoint("127.0.0.1", 0),
                      Endpoint("127.0.0.1", server.bound["listen"]), "aggregator"),),
        reload_interval_s=RELOAD_S))
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


def _run(tmp_path: Path, ca: CertificateAuthority, agg: Identity, cli: Identity,
         body: Callable[[Sidecar, Sidecar], Awaitable[None]]) -> None:
    async def main() -> None:
        server, side, app = await _pair(tmp_path, ca, agg, cli)
        try:
            await body(server, side)
        finally:
            await side.stop()
            await server.stop()
            app.close()

    asyncio.run(main())


@pytest.mark.parametrize("revoker", ["aggregator", "client"])
def test_revocation_mid_stream_cuts_channel_and_refuses_reconnection(
        tmp_path: Path, revoker: str) -> None:
    """The aggregator revokes the client (or the client learns that the aggregator is
    revoked): the open channel is cut at once and the next handshake fails."""
    ca = CertificateAuthority.generate("fed-revoke")
    agg = ca.new_identity("aggregator", Role.AGGREGATOR)
    cli = ca.new_identity("client-1", Role.CLIENT)

    async def body(server: Sidecar, side: Sidecar) -> None:
        r, w = await _echo(side.bound["route0"])
        holder, victim = (server, cli) if revoker == "aggregator" else (side, agg)
        assert [p.node_id for p in holder.channel_peers()] == [victim.certificate.node_id]
        crl = ca.revoke(None, victim.certificate.serial, RevocationReason.KEY_COMPROMISE)
        assert holder.config.crl is not None
        holder.config.crl.write_text(crl.to_pem())
        await _until(lambda: holder.cut == 1, "the channel to be cut")
        assert holder.metrics.registry.get_sample_value(
            "pqfed_revocation_list_number") == crl.number
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

    _run(tmp_path, ca, agg, cli, body)


def test_other_peers_keep_their_channels_and_old_lists_are_ignored(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate("fed-revoke")
    agg = ca.new_identity("aggregator", Role.AGGREGATOR)
    cli = ca.new_identity("client-1", Role.CLIENT)

    async def body(server: Sidecar, side: Sidecar) -> None:
        r, w = await _echo(side.bound["route0"])
        assert server.config.crl is not None
        server.config.crl.write_text(ca.sign_crl(5).to_pem())  # someone else's serials: none
        await _until(lambda: server.trust.crl is not None, "the list to load")
        # A lower-numbered list revoking the client: a rollback, ignored.
        server.config.crl.write_text(ca.revoke(None, cli.certificate.serial).to_pem())
        await _until(lambda: server.store.rejected == 1, "the rollback to be refused")
        w.write(b"round 2")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(7), 10) == b"ROUND 2"
        assert server.cut == 0
        w.close()

    _run(tmp_path, ca, agg, cli, body)


def test_renewed_identity_is_hot_reloaded(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate("fed-renew")
    agg = ca.new_identity("aggregator", Role.AGGREGATOR)
    cli = ca.new_identity("client-1", Role.CLIENT)

    async def body(server: Sidecar, side: Sidecar) -> None:
        _, w = await _echo(side.bound["route0"])
        w.close()
        renewed = ca.new_identity("client-1", Role.CLIENT)
        renewed.save(side.config.cert, side.config.key)
        await _until(lambda: side.identity.certificate == renewed.certificate, "renewal")
        # The old certificate can now be revoked without cutting the renewed client off.
        assert server.config.crl is not None
        server.config.crl.write_text(ca.revoke(None, cli.certificate.serial,
                                               RevocationReason.SUPERSEDED).to_pem())
        await _until(lambda: server.trust.crl is not None, "the list to load")
        _r, w = await _echo(side.bound["route0"])
        assert [p.serial for p in server.channel_peers()] == [renewed.certificate.serial]
        w.close()
        # A foreign identity dropped into the directory is not taken.
        other = CertificateAuthority.generate("fed-renew").new_identity("client-1", Role.CLIENT)
        other.save(side.config.cert, side.config.key)
        await _until(lambda: side.metrics.registry.get_sample_value(
            "pqfed_channel_failures_total", {"stage": "identity_reload", "field": "issuer"})
            == 1, "the foreign identity to be refused")
        assert side.identity.certificate == renewed.certificate

    _run(tmp_path, ca, agg, cli, body)


def test_stale_list_refuses_new_handshakes_until_a_fresh_one_arrives(tmp_path: Path) -> None:
    """Past its nextUpdate a list says nothing about revocations since: the sidecar refuses
    peers (fail closed) until the CA publishes the next one."""
    import time

    ca = CertificateAuthority.generate("fed-stale")
    agg = ca.new_identity("aggregator", Role.AGGREGATOR)
    cli = ca.new_identity("client-1", Role.CLIENT)

    async def body(server: Sidecar, side: Sidecar) -> None:
        assert server.config.crl is not None
        now = int(time.time())
        server.config.crl.write_text(ca.sign_crl(1, this_update=now - 100,
                                                 validity_s=50).to_pem())
        await _until(lambda: server.trust.crl is not None, "the stale list to load")
        r, w = await asyncio.open_connection("127.0.0.1", side.bound["route0"])
        w.write(b"round 1")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 10)
        w.close()
        assert server.metrics.registry.get_sample_value(
            "pqfed_channel_failures_total",
            {"stage": "handshake", "field": "client_flight.certificate.crl"}) == 1
        server.config.crl.write_text(ca.sign_crl(2).to_pem())
        await _until(lambda: server.metrics.registry.get_sample_value(
            "pqfed_revocation_list_number") == 2, "the fresh list")
        _, w = await _echo(side.bound["route0"])
        w.close()

    _run(tmp_path, ca, agg, cli, body)
