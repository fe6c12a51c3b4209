"""The TLS 1.3 sidecar's bulk data path off the event loop: two pump threads per channel.

After the handshake (on the event loop and its crypto threads) a TLS 1.3 channel's socket and
OpenSSL connection go to a `TlsStream` (pqfed.pqc.tls13) and the app connection's socket to a
blocking socket; one thread pumps app -> channel, one channel -> app, each with a
preallocated BULK_CHUNK buffer. OpenSSL (through cffi) and the socket calls release the GIL,
so the two sidecar processes of a route and both directions run in parallel, and a chunk
costs one Python round trip instead of an event-loop round per 64 KiB (docs/BENCHMARKS.md,
"Sidecar throughput").

What the event-loop path does stays the same here: the HTTP allow-list (`HttpRequestFilter`,
the same object, fed every byte from the channel before it is forwarded), the 403 answer to a
refused request, the metrics, and the close semantics the proxy decides from how each
direction ended (proxy.py, `Sidecar._splice`).

`PumpCapacity` bounds the threads: a channel past `max_pump_channels` stays on the event
loop (counted in pqfed_pump_overflow_total).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable

from pqfed.pqc.errors import ChannelClosed, PqcError, RecordError
from pqfed.pqc.sidecar.httpfilter import HttpRequestFilter, RequestRejected, forbidden_response
from pqfed.pqc.sidecar.metrics import SidecarMetrics
from pqfed.pqc.tls13 import BULK_CHUNK, TlsStream

log = logging.getLogger("pqfed.sidecar")
THREAD_NAME = "pqfed-pump"


class PumpCapacity:
    """How many channels may run on pump threads (two threads each); used from the event
    loop only."""

    def __init__(self, max_channels: int, metrics: SidecarMetrics) -> None:
        self.max_channels = max_channels
        self.active = 0
        self._metrics = metrics

    def take(self) -> bool:
        if self.active >= self.max_channels:
            self._metrics.pump_overflow.inc()
            log.warning("%d channels on pump threads (max_pump_channels): this one stays on "
                        "the event loop", self.active)
            return False
        self.active += 1
        self._metrics.pump_channels.set(self.active)
        return True

    def give(self) -> None:
        self.active -= 1
        self._metrics.pump_channels.set(self.active)


def _app_to_channel(app: socket.socket, buffered: bytes, stream: TlsStream) -> bool:
    """Pumps app -> channel; True when the app ended its stream (EOF) and all of it was
    sent."""
    buf = bytearray(BULK_CHUNK)
    view = memoryview(buf)
    try:
        if buffered:
            stream.send(buffered)
        while n := app.recv_into(buf):
            stream.send(view[:n])
    except (PqcError, OSError):
        return False
    return True


def _channel_to_app(stream: TlsStream, app: socket.socket, http: HttpRequestFilter | None,
                    metrics: SidecarMetrics, peer: str) -> bool:
    """Pumps channel -> app; True only when the peer closed the channel cleanly. The same
    outcomes and metrics as the event-loop pump (proxy.py, `Sidecar._channel_to_app`)."""
    try:
        while True:
            data: bytes | memoryview = stream.recv()
            if http is not None:
                data = http.feed(data)
            app.sendall(data)
    except ChannelClosed:
        return True
    except RequestRejected as exc:
        log.warning("closing channel to %s: %s", peer, exc)
        metrics.failures.labels("http", exc.field).inc()
        with contextlib.suppress(PqcError, OSError):
            stream.send(forbidden_response(exc.reason))
    except RecordError as exc:
        if exc.field not in ("stopped", "aborted"):  # those two: ended from outside
            metrics.failures.labels("record", exc.field).inc()
    except PqcError as exc:
        metrics.failures.labels("record", type(exc).__name__).inc()
    except OSError:
        if not stream.stopped:
            metrics.failures.labels("record", "connection").inc()
    return False


def reset_socket(sock: socket.socket) -> None:
    """Closes with RST (SO_LINGER 0), not FIN: the app sees an error."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class PumpPair:
    """The two pump threads of one channel and the futures the event loop awaits.

    `up` and `down` resolve to each direction's outcome (True: app EOF, resp. the peer's
    close_notify) and may be cancelled (a revocation cuts the channel); `finish` wakes and
    waits for both threads, closes the channel and the app connection, and releases the
    sockets: no thread and no descriptor outlives it."""

    def __init__(self, stream: TlsStream, app: socket.socket, buffered: bytes,
                 http: HttpRequestFilter | None, metrics: SidecarMetrics, peer: str) -> None:
        self._loop = asyncio.get_running_loop()
        self.stream = stream
        self.app = app
        self.up: asyncio.Future[bool] = self._loop.create_future()
        self.down: asyncio.Future[bool] = self._loop.create_future()
        self._ended = [self._loop.create_future(), self._loop.create_future()]
        self._threads = [
            threading.Thread(target=self._run, name=f"{THREAD_NAME}-up-{peer}", daemon=True,
                             args=(lambda: _app_to_channel(app, buffered, stream), self.up,
                                   self._ended[0])),
            threading.Thread(target=self._run, name=f"{THREAD_NAME}-down-{peer}", daemon=True,
                             args=(lambda: _channel_to_app(stream, app, http, metrics, peer),
                                   self.down, self._ended[1])),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _run(self, pump: Callable[[], bool], result: asyncio.Future[bool],
             ended: asyncio.Future[None]) -> None:
        outcome = False
        try:
            outcome = pump()
        except Exception:
            log.exception("pump thread failed")
        finally:
            # A closed loop has nobody left to tell (the process is ending).
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._done, result, ended, outcome)

    @staticmethod
    def _done(result: asyncio.Future[bool], ended: asyncio.Future[None], outcome: bool) -> None:
        if not result.done():
            result.set_result(outcome)
        ended.set_result(None)

    def _wake(self) -> None:
        """Ends the threads' blocking reads, the channel's and the app's. Not its writes:
        shutting the app's side for writing would send a FIN, which must follow only a clean
        end (a broken channel resets the app connection)."""
        self.stream.stop_reading()
        with contextlib.suppress(OSError):
            self.app.shutdown(socket.SHUT_RD)

    async def finish(self, clean: bool, timeout_s: float) -> None:
        """Both threads stopped and joined, close_notify sent (unless the channel was aborted
        or broken), the app connection ended with FIN if `clean` else RST, sockets closed. A
        thread still blocked in a write after `timeout_s` (a peer or app that stopped reading)
        is released by aborting the channel."""
        self._wake()
        _, pending = await asyncio.wait(self._ended, timeout=timeout_s)
        if pending:
            log.warning("pump threads still blocked after %.0f s: aborting the channel",
                        timeout_s)
            self.stream.abort()
            with contextlib.suppress(OSError):
                if not clean:  # the RST at close then follows this FIN at once
                    self.app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                self.app.shutdown(socket.SHUT_RDWR)
            await asyncio.wait(pending)
        for thread in self._threads:
            thread.join()  # they have returned: this only reaps them
        try:
            await asyncio.to_thread(self.stream.close, timeout_s)
        finally:
            self.stream.release()
            if clean:
                self.app.close()
            else:
                reset_socket(self.app)
