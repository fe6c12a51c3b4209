"""SecureChannel: runs the handshake and the record layer over asyncio streams.

Every failure (timeout, malformed or tampered frame, wrong identity, truncation) closes the
TCP connection, is logged with the peer address and the reason, and surfaces as a typed
error; no byte of a rejected record ever reaches the application.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import NoReturn

from pqfed.pqc.errors import ChannelClosed, HandshakeError, PqcError, RecordError
from pqfed.pqc.handshake import ClientHandshake, HandshakeConfig, ServerHandshake, Session
from pqfed.pqc.identity import Certificate
from pqfed.pqc.pool import parallel_default, shared_crypto
from pqfed.pqc.record import Frame, FrameDecoder, InnerType

log = logging.getLogger("pqfed.pqc.channel")
READ_CHUNK = 1 << 18


@dataclass(frozen=True, slots=True)
class HandshakeStats:
    seconds: float
    bytes_sent: int
    bytes_received: int


class SecureChannel:
    """A mutually authenticated, PQ-secure, ordered byte channel to one peer."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session,
        decoder: FrameDecoder, config: HandshakeConfig, stats: HandshakeStats,
        early: list[Frame] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._session = session
        self._decoder = decoder
        self._config = config
        self._pending: list[Frame] = list(early or [])
        self._closed = False
        self.handshake = stats
        self.bytes_sent = 0
        self.bytes_received = 0
        self.key_updates_sent = 0
        self.key_updates_received = 0

    @property
    def peer(self) -> Certificate:
        return self._session.peer

    @property
    def session(self) -> Session:
        return self._session

    @property
    def peername(self) -> str:
        return _peername(self._writer)

    def _seal_all(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        step = self._config.max_plaintext
        send = self._session.send
        view = memoryview(data)
        for off in range(0, len(data), step):
            if send.seq >= self._config.key_update_after:
                out.append(send.seal(InnerType.KEY_UPDATE, b""))
                send.rotate()
                self.key_updates_sent += 1
            out.append(send.seal(InnerType.DATA, bytes(view[off : off + step])))
        return out

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise ChannelClosed("channel is closed")
        frames = self._seal_all(data)
        self._writer.writelines(frames)
        self.bytes_sent += sum(len(f) for f in frames)
        await self._writer.drain()

    async def recv(self) -> bytes:
        """Next chunk of application data; raises ChannelClosed after the peer's
        authenticated close and RecordError (after closing) on any bad record."""
        while True:
            if not self._pending:
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    if self._decoder.pending:
                        await self._fail(RecordError("stream", "connection ended inside a record"))
                    await self._fail(RecordError(
                        "close", "connection ended without an authenticated close (truncation)"))
                self.bytes_received += len(chunk)
                try:
                    self._pending.extend(self._decoder.feed(chunk))
                except RecordError as exc:
                    await self._fail(exc)
                continue
            frame = self._pending.pop(0)
            try:
                inner_type, data = self._session.recv.open(frame)
            except RecordError as exc:
                await self._fail(exc)
            if inner_type is InnerType.DATA:
                if data:
                    return data
            elif inner_type is InnerType.KEY_UPDATE:
                if data:
                    await self._fail(RecordError("key_update", "non-empty key update"))
                self._session.recv.rotate()
                self.key_updates_received += 1
            elif inner_type is InnerType.CLOSE:
                self._closed = True
                self._writer.close()
                raise ChannelClosed(f"peer {self.peer.node_id} closed the channel")
            else:
                await self._fail(RecordError("inner_type", f"{inner_type.name} after handshake"))

    async def close(self) -> None:
        """Authenticated close (close_notify, RFC 8446 §6.1)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.write(self._session.send.seal(InnerType.CLOSE, b""))
            await self._writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        self._writer.close()

    def abort(self) -> None:
        self._closed = True
        self._writer.transport.abort()

    async def _fail(self, exc: PqcError) -> NoReturn:
        log.warning("closing channel to %s (%s): %s", self.peer.node_id, self.peername, exc)
        self.abort()
        raise exc


def _peername(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


async def _run_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    endpoint: ClientHandshake | ServerHandshake, config: HandshakeConfig,
    first: bytes, executor: Executor | None,
) -> SecureChannel:
    loop = asyncio.get_running_loop()
    decoder = FrameDecoder(config.max_plaintext)
    sent, received = len(first), 0
    early: list[Frame] = []  # records that arrived in the same read as the last flight
    start = time.perf_counter()

    _done = object()

    def step(parts: Iterator[bytes]) -> bytes | object:
        return next(parts, _done)

    async def drive() -> None:
        nonlocal sent, received
        if first:
            writer.write(first)
            await writer.drain()
        while not endpoint.complete:
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                raise HandshakeError("stream", "peer closed the connection during the handshake")
            received += len(chunk)
            for frame in decoder.feed(chunk):
                if endpoint.complete:
                    early.append(frame)
                    continue
                parts = endpoint.receive_pipelined(frame)
                while True:
                    out = (await loop.run_in_executor(executor, step, parts) if executor
                           else step(parts))
                    if out is _done:
                        break
                    assert isinstance(out, bytes)
                    if out:
                        writer.write(out)
                        sent += len(out)
                        await writer.drain()

    try:
        await asyncio.wait_for(drive(), timeout=config.timeout_s)
    except TimeoutError:
        exc: PqcError = HandshakeError("timeout", f"no complete handshake in {config.timeout_s} s")
        log.warning("handshake with %s failed: %s", _peername(writer), exc)
        writer.transport.abort()
        raise exc from None
    except (PqcError, ConnectionError) as err:
        log.warning("handshake with %s failed: %s", _peername(writer), err)
        writer.transport.abort()
        if isinstance(err, PqcError):
            raise
        raise HandshakeError("stream", str(err)) from err
    assert endpoint.session is not None
    stats = HandshakeStats(time.perf_counter() - start, sent, received)
    return SecureChannel(reader, writer, endpoint.session, decoder, config, stats, early)


def _driven(config: HandshakeConfig) -> HandshakeConfig:
    """The driver's choices where the config leaves them open: the process-wide crypto
    threads, and parallel checks where this host has the cores for them."""
    if config.crypto is None:
        config = replace(config, crypto=shared_crypto())
    if config.parallel_auth is None:
        config = replace(config, parallel_auth=parallel_default())
    return config


async def client_channel(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: HandshakeConfig,
    executor: Executor | None = None,
) -> SecureChannel:
    config = _driven(config)
    endpoint = ClientHandshake(config)
    return await _run_handshake(reader, writer, endpoint, config, endpoint.start(), executor)


async def server_channel(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: HandshakeConfig,
    executor: Executor | None = None,
) -> SecureChannel:
    config = _driven(config)
    return await _run_handshake(reader, writer, ServerHandshake(config), config, b"", executor)


async def connect(
    host: str, port: int, config: HandshakeConfig, executor: Executor | None = None,
) -> SecureChannel:
    reader, writer = await asyncio.open_connection(host, port)
    return await client_channel(reader, writer, config, executor)

