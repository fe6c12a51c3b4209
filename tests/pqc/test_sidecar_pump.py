"""The TLS 1.3 sidecar's data path on pump threads (pqc/sidecar/pump.py, `TlsStream`): bulk
transfers both ways, end of stream, a channel cut mid-stream, the HTTP allow-list, the
thread cap, and no thread or descriptor left behind. Two real sidecars, real TLS 1.3."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import threading
from pathlib import Path

import pytest

from pqfed.cli import build_parser
from pqfed.pqc.cli import sidecar_config
from pqfed.pqc.identity import Role
from pqfed.pqc.sidecar import Endpoint, Route, Sidecar, SidecarConfig
from pqfed.pqc.sidecar.config import ChannelProtocolName, ConfigError, DataPath
from pqfed.pqc.sidecar.pump import THREAD_NAME

from .cuttable_relay import cuttable_relay
from .sidecar_pki import X509Pki

TLS13 = ChannelProtocolName.TLS13
MIB = 1 << 20


@pytest.fixture(scope="module")
def pki() -> X509Pki:
    return X509Pki("fed-test")


def _files(tmp: Path, pki: X509Pki, name: str, role: Role) -> dict[str, Path]:
    pki.node(name, role).save(tmp / f"{name}.crt", tmp / f"{name}.key")
    (tmp / "ca.crt").write_bytes(pki.ca_pem())
    return {"cert": tmp / f"{name}.crt", "key": tmp / f"{name}.key", "ca": tmp / "ca.crt"}


def _server(tmp: Path, pki: X509Pki, app_port: int, **extra: object) -> Sidecar:
    """An aggregator sidecar forwarding to the app at `app_port`."""
    return Sidecar(SidecarConfig(
        **_files(tmp, pki, "aggregator", Role.AGGREGATOR), listen=Endpoint("127.0.0.1", 0),
        upstream=Endpoint("127.0.0.1", app_port), admin=None, protocol=TLS13,
        **extra))  # type: ignore[arg-type]


def _client(tmp: Path, pki: X509Pki, peer_port: int, **extra: object) -> Sidecar:
    """A client sidecar routed to the sidecar at `peer_port`, pinning node id aggregator."""
    return Sidecar(SidecarConfig(
        **_files(tmp, pki, "client-1", Role.CLIENT), admin=None, protocol=TLS13,
        routes=(Route(Endpoint("127.0.0.1", 0), Endpoint("127.0.0.1", peer_port),
                      "aggregator"),), **extra))  # type: ignore[arg-type]


async def _start_pair(tmp: Path, pki: X509Pki, app_port: int, **extra: object
                      ) -> tuple[Sidecar, Sidecar, int]:
    """Both sidecars started (`extra` for both; allow_path_prefixes for the aggregator's
    only); returns them and the client's plaintext entry port."""
    server = _server(tmp, pki, app_port, **extra)
    await server.start()
    client = _client(tmp, pki, server.bound["listen"],
                     **{k: v for k, v in extra.items() if k != "allow_path_prefixes"})
    await client.start()
    return server, client, client.bound["route0"]


def app_port(app: asyncio.Server) -> int:
    return int(app.sockets[0].getsockname()[1])


def _sample(sidecar: Sidecar, name: str, labels: dict[str, str] | None = None) -> float:
    return sidecar.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def _pump_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _echo_app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(1 << 18):
        w.write(data)
        await w.drain()
    w.close()


def test_large_transfers_both_ways_are_byte_exact(tmp_path: Path, pki: X509Pki) -> None:
    """24 MiB up and the same back (an echo app), at once, through two sidecars whose channel
    runs on pump threads: every byte arrives, in order."""
    payload = os.urandom(24 * MIB)

    async def main() -> None:
        app = await asyncio.start_server(_echo_app, "127.0.0.1", 0)
        server, client, entry = await _start_pair(tmp_path, pki, app_port(app))
        r, w = await asyncio.open_connection("127.0.0.1", entry)

        async def upload() -> None:
            view = memoryview(payload)
            for off in range(0, len(payload), 100_003):  # odd sizes: records split anywhere
                w.write(view[off : off + 100_003])
                await w.drain()

        up = asyncio.ensure_future(upload())
        got = await asyncio.wait_for(r.readexactly(len(payload)), 120)
        await up
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        for sidecar in (server, client):  # the channel was on pump threads at both ends
            assert _sample(sidecar, "pqfed_pump_channels") == 1
        w.close()
        assert await asyncio.wait_for(r.read(), 10) == b""  # clean end: FIN, no reset
        await asyncio.sleep(0.3)
        assert _sample(server, "pqfed_channel_bytes_total", {"direction": "rx"}) > len(payload)
        assert _sample(server, "pqfed_channel_failures_total",
                       {"stage": "record", "field": "close"}) == 0
        for sidecar in (client, server):
            await sidecar.stop()
        app.close()

    asyncio.run(main())


def test_end_of_stream_reaches_the_app_after_every_byte(tmp_path: Path, pki: X509Pki) -> None:
    """The client app sends 5 MiB and ends its stream: the upstream app reads all 5 MiB and
    then a clean end (close_notify became FIN), never a reset; the client app too."""
    payload = os.urandom(5 * MIB + 17)
    seen: list[bytes] = []
    ended = asyncio.Event

    async def main() -> None:
        done = ended()

        async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                seen.append(await r.read(-1))  # until EOF; a reset raises instead
            finally:
                done.set()
                w.close()

        app = await asyncio.start_server(sink, "127.0.0.1", 0)
        server, client, entry = await _start_pair(tmp_path, pki, app_port(app))
        r, w = await asyncio.open_connection("127.0.0.1", entry)
        w.write(payload)
        await w.drain()
        w.write_eof()  # half-close: no more data from the client app
        await asyncio.wait_for(done.wait(), 60)
        assert seen and seen[0] == payload
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
        for sidecar in (client, server):
            await sidecar.stop()
        app.close()

    asyncio.run(main())


def test_a_channel_cut_mid_upload_resets_the_upstream_app(tmp_path: Path,
                                                          pki: X509Pki) -> None:
    """The network cuts the channel while a bulk upload is under way: the aggregator's
    sidecar reports the truncation and resets the upstream app's connection, so the app
    never takes the partial upload for a whole one (a FIN here would)."""
    async def main() -> None:
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        received = 0

        async def app_fn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal received
            try:
                while data := await r.read(1 << 18):
                    received += len(data)
                outcome.set_result("eof")
            except ConnectionResetError:
                outcome.set_result("reset")

        app = await asyncio.start_server(app_fn, "127.0.0.1", 0)
        server = _server(tmp_path, pki, app_port(app))
        await server.start()
        mitm = await cuttable_relay(server.bound["listen"])
        client = _client(tmp_path, pki, mitm.port)
        await client.start()
        _, w = await asyncio.open_connection("127.0.0.1", client.bound["route0"])
        block = os.urandom(1 << 18)
        while received < 4 * MIB:
            w.write(block)
            await w.drain()
        mitm.links[0][1].transport.abort()  # FIN towards the aggregator's sidecar, no close_notify
        assert await asyncio.wait_for(outcome, 30) == "reset"
        assert _sample(server, "pqfed_channel_failures_total",
                       {"stage": "record", "field": "close"}) == 1
        w.close()
        for sidecar in (client, server):
            await sidecar.stop()
        mitm.close()
        app.close()

    asyncio.run(main())


def _request(method: str, path: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode()
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_the_http_allow_list_sees_every_request_on_the_threads(tmp_path: Path,
                                                               pki: X509Pki) -> None:
    """A 2 MiB allowed request with a disallowed one right behind it, in the same write (so in
    the same pump-thread chunk): the disallowed one gets a 403 from the sidecar and not one
    byte of it reaches the app. (What the filter had passed of the chunk that held the
    refused request is dropped with it, and the app's connection is reset: as on the event
    loop, the same filter code.)"""
    body = os.urandom(2 * MIB)
    seen = bytearray()

    async def main() -> None:
        async def app_fn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(1 << 18):
                seen.extend(data)
            w.close()

        app = await asyncio.start_server(app_fn, "127.0.0.1", 0)
        server, client, entry = await _start_pair(tmp_path, pki, app_port(app),
                                                  allow_path_prefixes=("/v1/fleet/",))
        r, w = await asyncio.open_connection("127.0.0.1", entry)
        w.write(_request("POST", "/v1/fleet/pull", b"first"))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if seen.endswith(b"first"):
                break
        assert _sample(server, "pqfed_pump_channels") == 1  # the channel is on the threads
        w.write(_request("POST", "/v1/fleet/push", body)
                + _request("POST", "/v1/control/start-run", b"evil"))
        await w.drain()
        answer = await asyncio.wait_for(r.read(), 30)
        assert answer.startswith(b"HTTP/1.1 403 Forbidden") and b"outside" in answer
        await asyncio.sleep(0.3)
        assert body[:MIB] in seen and len(seen) < len(body) + 300
        assert b"/v1/control" not in seen and b"evil" not in seen
        assert b"X-Pqfed-Peer: client-1" in seen
        assert _sample(server, "pqfed_channel_failures_total",
                       {"stage": "http", "field": "path"}) == 1
        w.close()
        for sidecar in (client, server):
            await sidecar.stop()
        app.close()

    asyncio.run(main())


def test_no_thread_or_descriptor_outlives_its_channel(tmp_path: Path, pki: X509Pki) -> None:
    """Channels closed by the app, by the upstream and cut by the network: afterwards no pump
    thread is alive and the process holds as many descriptors as before."""
    async def main() -> None:
        app = await asyncio.start_server(_echo_app, "127.0.0.1", 0)
        server, client, entry = await _start_pair(tmp_path, pki, app_port(app))
        before = 0
        held: list[object] = []
        for i in range(6):  # the first one warms up what lives on (the loop's executor)
            if i == 1:
                gc.collect()
                before = _fds()
            r, w = await asyncio.open_connection("127.0.0.1", entry)
            w.write(b"x" * 300_000)
            assert await asyncio.wait_for(r.readexactly(300_000), 30) == b"x" * 300_000
            assert len(_pump_threads()) == 4  # two per channel, each sidecar
            # Held here, the channels cannot take their sockets with them when collected:
            # what is closed below was closed by the sidecar.
            held.extend([*server._channels, *client._channels])
            w.close()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if not _pump_threads():
                    break
        assert _pump_threads() == []
        assert _sample(server, "pqfed_pump_channels") == 0
        assert _sample(client, "pqfed_pump_channels") == 0
        await asyncio.sleep(0.2)
        assert _fds() == before  # closed, not left to the garbage collector
        assert len(held) == 12
        for sidecar in (client, server):
            await sidecar.stop()
        app.close()

    asyncio.run(main())
    assert _pump_threads() == []


def test_channels_past_the_thread_cap_stay_on_the_event_loop(tmp_path: Path,
                                                             pki: X509Pki) -> None:
    """max_pump_channels=1: the first channel runs on threads, the second on the event loop
    (counted as an overflow), both carry their bytes."""
    async def main() -> None:
        app = await asyncio.start_server(_echo_app, "127.0.0.1", 0)
        server, client, entry = await _start_pair(tmp_path, pki, app_port(app),
                               max_pump_channels=1)
        conns = [await asyncio.open_connection("127.0.0.1", entry) for _ in range(2)]
        for i, (r, w) in enumerate(conns):
            w.write(bytes([i]) * 1_000_000)
            assert await asyncio.wait_for(r.readexactly(1_000_000), 30) == bytes([i]) * 1_000_000
        for sidecar in (client, server):
            assert _sample(sidecar, "pqfed_pump_channels") == 1
            assert _sample(sidecar, "pqfed_pump_overflow_total") == 1
        assert len(_pump_threads()) == 4
        for _, w in conns:
            w.close()
        await asyncio.sleep(0.5)
        for sidecar in (client, server):
            await sidecar.stop()
        app.close()

    asyncio.run(main())


def test_the_event_loop_path_stays_selectable(tmp_path: Path, pki: X509Pki) -> None:
    async def main() -> None:
        app = await asyncio.start_server(_echo_app, "127.0.0.1", 0)
        server, client, entry = await _start_pair(tmp_path, pki, app_port(app),
                               data_path=DataPath.EVENT_LOOP)
        r, w = await asyncio.open_connection("127.0.0.1", entry)
        w.write(b"y" * 500_000)
        assert await asyncio.wait_for(r.readexactly(500_000), 30) == b"y" * 500_000
        assert _pump_threads() == [] and _sample(server, "pqfed_pump_channels") == 0
        w.close()
        for sidecar in (client, server):
            await sidecar.stop()
        app.close()

    asyncio.run(main())


def test_data_path_config_names_the_field() -> None:
    base = {"cert": "a", "key": "k", "ca": "c", "routes": ["127.0.0.1:1=h:2"]}
    assert not SidecarConfig.from_mapping(base).pump_threads  # pqfed1: the event loop
    tls = SidecarConfig.from_mapping({**base, "protocol": "tls13"})
    assert tls.pump_threads and tls.max_pump_channels == 64
    assert not SidecarConfig.from_mapping({**base, "protocol": "tls13",
                                           "dataPath": "asyncio"}).pump_threads
    for bad, fld in (({"dataPath": "threads"}, "dataPath"),  # with pqfed1
                     ({"protocol": "tls13", "dataPath": "fibres"}, "dataPath"),
                     ({"protocol": "tls13", "maxPumpChannels": -1}, "maxPumpChannels")):
        with pytest.raises(ConfigError) as err:
            SidecarConfig.from_mapping({**base, **bad})
        assert err.value.field == fld
    args = build_parser().parse_args(["sidecar", "--protocol", "tls13", "--data-path",
                                      "asyncio", "--max-pump-channels", "3", "--route",
                                      "127.0.0.1:1=h:2"])
    cfg = sidecar_config(args)
    assert cfg.data_path is DataPath.EVENT_LOOP and cfg.max_pump_channels == 3
    with pytest.raises(ConfigError) as err:
        sidecar_config(build_parser().parse_args(["sidecar", "--data-path", "threads",
                                                  "--route", "127.0.0.1:1=h:2"]))
    assert err.value.field == "dataPath" and "protocol tls13" in str(err.value)
