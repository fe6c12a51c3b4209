"""The sidecar's data plane.

Inbound (aggregator side): remote sidecar --channel--> listen --plaintext--> upstream.
Outbound (client side): app --plaintext--> route.listen --channel--> remote sidecar.

Plaintext only ever crosses loopback inside the pod; the config refuses anything else.

The channel is pqfed1 or TLS 1.3 (`SidecarConfig.protocol`); what differs between them (file
formats, trust store, handshakes) is a `ChannelProtocol` (protocols.py), everything else is
this module's, for both.

Identity and revocation are reloaded while running (`_watch`): a newer CA-signed revocation
list (truststore.py) cuts every established channel whose peer it revokes and refuses their
new handshakes; a renewed certificate and key (same CA) are used for the next handshakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
from typing import Any

from pqfed.pqc.errors import CertificateError, ChannelClosed, PqcError, RecordError
from pqfed.pqc.identity import Role
from pqfed.pqc.sidecar.config import OPERATOR_PATHS, ConfigError, Endpoint, Route, SidecarConfig
from pqfed.pqc.sidecar.httpfilter import HttpRequestFilter, RequestRejected, forbidden_response
from pqfed.pqc.sidecar.metrics import SidecarMetrics
from pqfed.pqc.sidecar.protocols import Channel, ChannelProtocol, Peer, make_protocol
from pqfed.pqc.sidecar.pump import PumpCapacity, PumpPair
from pqfed.pqc.tls13 import TlsChannel, take_socket

log = logging.getLogger("pqfed.sidecar")
PUMP_CHUNK = 1 << 16


def _reset(writer: asyncio.StreamWriter) -> None:
    """Ends a TCP connection with RST (SO_LINGER 0), not FIN: the peer sees an error."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _finished(task: asyncio.Future[Any]) -> bool:
    """Done without being cancelled or raising."""
    return task.done() and not task.cancelled() and task.exception() is None


class Sidecar:
    def __init__(self, config: SidecarConfig, metrics: SidecarMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or SidecarMetrics()
        self.protocol: ChannelProtocol = make_protocol(config, self.metrics)
        # Established channels and their two pump tasks: what a revocation cuts.
        self._channels: dict[Channel, tuple[asyncio.Future[Any], ...]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self.cut = 0  # channels cut because their peer was revoked
        self._note_crl()
        self._servers: list[asyncio.Server] = []
        self._pending = 0  # inbound handshakes in progress (not yet authenticated)
        self.ready = False
        self.bound: dict[str, int] = {}
        self._pumps = (PumpCapacity(config.max_pump_channels, self.metrics)
                       if config.pump_threads else None)

    @property
    def crl_number(self) -> int | None:
        """The number of the revocation list in force (None: none yet)."""
        return self.protocol.crl_number

    def reload(self) -> None:
        """Re-reads the revocation list and this node's certificate and key; cuts channels of
        peers the list now revokes. Called by the watcher every `reload_interval_s`."""
        if self.protocol.reload():
            self._note_crl()
            self.enforce_revocation()

    def _note_crl(self) -> None:
        number = self.crl_number
        self.metrics.crl_number.set(-1 if number is None else number)

    def channel_peers(self) -> list[Peer]:
        """The authenticated peers of every established channel."""
        return [channel.peer for channel in self._channels]

    def enforce_revocation(self) -> int:
        """Cuts (aborts, no authenticated close) every channel whose peer certificate the
        current list revokes, or that no longer verifies; returns how many."""
        doomed = []
        for channel in self._channels:
            try:
                self.protocol.verify(channel.peer)
            except CertificateError as exc:
                doomed.append((channel, exc))
        for channel, err in doomed:
            log.warning("cutting channel to %s (%s): %s", channel.peer.node_id,
                        channel.peername, err)
            self.metrics.failures.labels("revoked", err.field).inc()
            channel.abort()
            for task in self._channels.pop(channel, ()):
                task.cancel()
            self.cut += 1
        return len(doomed)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval_s)
            try:
                self.reload()
            except Exception:  # never let the watcher die: it is what enforces revocation
                log.exception("reload failed")

    async def start(self) -> None:
        c = self.config
        if c.listen is not None:
            srv = await asyncio.start_server(self._inbound, c.listen.host, c.listen.port)
            self._servers.append(srv)
            self.bound["listen"] = srv.sockets[0].getsockname()[1]
        for i, route in enumerate(c.routes):
            srv = await asyncio.start_server(
                functools.partial(self._outbound, route), route.listen.host, route.listen.port)
            self._servers.append(srv)
            self.bound[f"route{i}"] = srv.sockets[0].getsockname()[1]
        self._watcher = asyncio.ensure_future(self._watch())
        self.ready = True
        log.info("sidecar %s (%s) ready: %s", self.protocol.identity.node_id,
                 self.protocol.name.value, self.bound)

    async def stop(self) -> None:
        self.ready = False
        if self._watcher is not None:
            self._watcher.cancel()
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        self.protocol.close()

    async def _secure(self, side: str, coro: Any) -> Channel | None:
        try:
            channel: Channel = await coro
        except CertificateError as exc:  # TLS 1.3: the verification callback's finding
            self.metrics.failures.labels("handshake", f"certificate.{exc.field}").inc()
            return None
        except (PqcError, ConfigError) as exc:  # a HandshakeError, a malformed frame, ...
            self.metrics.failures.labels("handshake",
                                         getattr(exc, "field", type(exc).__name__)).inc()
            return None
        except (ConnectionError, OSError) as exc:
            log.warning("%s connection failed: %s", side, exc)
            self.metrics.failures.labels("handshake", "connect").inc()
            return None
        try:
            # The list may have changed while the handshake ran on the old anchor.
            self.protocol.verify(channel.peer)
        except CertificateError as exc:
            self.metrics.failures.labels("handshake", f"certificate.{exc.field}").inc()
            channel.abort()
            return None
        self.metrics.handshake_seconds.labels(side).observe(channel.handshake.seconds)
        version, group = self.protocol.negotiated(channel)
        self.metrics.negotiated.labels(version, group).inc()
        log.info("%s channel with %s (%s) up in %.1f ms: %s, %s", side, channel.peer.node_id,
                 channel.peername, channel.handshake.seconds * 1e3, version, group)
        return channel

    async def _inbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.config.upstream is not None
        self.metrics.connections.labels("inbound").inc()
        if self._pending >= self.config.max_pending_handshakes:
            self.metrics.failures.labels("handshake", "capacity").inc()
            writer.transport.abort()
            return
        self._pending += 1
        try:
            channel = await self._secure("server", self.protocol.server(reader, writer))
        finally:
            self._pending -= 1
        if channel is None:
            return
        upstream, http = self._inbound_target(channel.peer)
        try:
            app_r, app_w = await asyncio.open_connection(upstream.host, upstream.port)
        except OSError as exc:
            log.warning("upstream %s unreachable: %s", upstream, exc)
            await channel.close()
            return
        await self._splice(channel, app_r, app_w, http)

    def _inbound_target(self, peer: Peer) -> tuple[Endpoint, HttpRequestFilter | None]:
        """Where an authenticated peer's requests go, and what it may ask there: an operator
        reads the status API (GET only), everyone else the upstream under its allow-list."""
        c = self.config
        if peer.role is Role.OPERATOR and c.operator_upstream is not None:
            return c.operator_upstream, HttpRequestFilter(OPERATOR_PATHS, methods=("GET",))
        assert c.upstream is not None
        return c.upstream, (HttpRequestFilter(c.allow_path_prefixes, peer=peer.node_id)
                            if c.allow_path_prefixes else None)

    async def _outbound(self, route: Route, app_r: asyncio.StreamReader,
                        app_w: asyncio.StreamWriter) -> None:
        self.metrics.connections.labels("outbound").inc()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(route.peer.host, route.peer.port),
                self.config.handshake_timeout_s)
        except (OSError, TimeoutError) as exc:
            log.warning("peer %s unreachable: %s", route.peer, exc)
            self.metrics.failures.labels("connect", "peer").inc()
            _reset(app_w)  # the app sees an error, never an empty answer
            return
        channel = await self._secure("client", self.protocol.client(reader, writer, route))
        if channel is None:
            _reset(app_w)
            return
        await self._splice(channel, app_r, app_w)

    async def _splice(self, channel: Channel, app_r: asyncio.StreamReader,
                      app_w: asyncio.StreamWriter, http: HttpRequestFilter | None = None
                      ) -> None:
        if (self._pumps is not None and isinstance(channel, TlsChannel)
                and self._pumps.take()):
            try:
                if await self._splice_threads(channel, app_r, app_w, http):
                    return
            finally:
                self._pumps.give()
        self.metrics.active.inc()
        up = asyncio.ensure_future(self._app_to_channel(app_r, channel))
        down = asyncio.ensure_future(self._channel_to_app(channel, app_w, http))
        self._channels[channel] = (up, down)
        clean = False
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            # The app sees a clean end (FIN) only after an authenticated close from the peer
            # or its own close; a channel cut or broken mid-stream resets the app connection,
            # so a truncated response is never taken for a whole one.
            clean = (_finished(down) and bool(down.result())) or (
                _finished(up) and not down.done())
        finally:
            self._channels.pop(channel, None)
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            await channel.close()
            if clean:
                app_w.close()
            else:
                _reset(app_w)
            self.metrics.bytes.labels("tx").inc(channel.bytes_sent)
            self.metrics.bytes.labels("rx").inc(channel.bytes_received)
            self.metrics.active.dec()

    async def _splice_threads(self, channel: TlsChannel, app_r: asyncio.StreamReader,
                              app_w: asyncio.StreamWriter, http: HttpRequestFilter | None
                              ) -> bool:
        """`_splice` on two pump threads (pump.py), with the same outcome rules; False (and
        nothing changed) if the channel cannot leave the event loop now."""
        stream = channel.detach()
        if stream is None:
            return False
        taken = take_socket(app_r, app_w)
        if taken is None:  # the app connection is gone already
            self.metrics.failures.labels("record", "connection").inc()
            stream.abort()
            stream.release()
            _reset(app_w)
            return True
        app, buffered = taken
        self.metrics.active.inc()
        pair = PumpPair(stream, app, buffered, http, self.metrics, channel.peer.node_id)
        self._channels[channel] = (pair.up, pair.down)
        clean = False
        try:
            pair.start()
            await asyncio.wait({pair.up, pair.down}, return_when=asyncio.FIRST_COMPLETED)
            clean = (_finished(pair.down) and pair.down.result()) or (
                _finished(pair.up) and pair.up.result() and not pair.down.done())
        finally:
            self._channels.pop(channel, None)
            await pair.finish(clean, self.config.handshake_timeout_s)
            self.metrics.bytes.labels("tx").inc(stream.bytes_sent)
            self.metrics.bytes.labels("rx").inc(stream.bytes_received)
            self.metrics.active.dec()
        return True

    async def _app_to_channel(self, app_r: asyncio.StreamReader, channel: Channel) -> None:
        while data := await app_r.read(PUMP_CHUNK):
            await channel.send(data)

    async def _channel_to_app(self, channel: Channel, app_w: asyncio.StreamWriter,
                              http: HttpRequestFilter | None = None) -> bool:
        """Pumps channel -> app; True only when the peer closed the channel cleanly."""
        try:
            while True:
                data = await channel.recv()
                if http is not None:
                    data = http.feed(data)
                app_w.write(data)
                await app_w.drain()
        except ChannelClosed:
            return True
        except RequestRejected as exc:
            log.warning("closing channel to %s (%s): %s", channel.peer.node_id,
                        channel.peername, exc)
            self.metrics.failures.labels("http", exc.field).inc()
            with contextlib.suppress(PqcError, ConnectionError):
                await channel.send(forbidden_response(exc.reason))
        except RecordError as exc:
            self.metrics.failures.labels("record", exc.field).inc()
        except PqcError as exc:
            self.metrics.failures.labels("record", type(exc).__name__).inc()
        except (ConnectionError, OSError):
            self.metrics.failures.labels("record", "connection").inc()
        return False
