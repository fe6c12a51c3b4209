"""SecureChannel over real loopback sockets, including a man-in-the-middle that tampers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from pqfed.pqc.channel import SecureChannel, connect, server_channel
from pqfed.pqc.errors import ChannelClosed, HandshakeError, RecordError
from pqfed.pqc.handshake import HandshakeConfig
from pqfed.pqc.identity import CertificateAuthority, Identity

Handler = Callable[[SecureChannel], Awaitable[None]]


async def _serve(cfg: HandshakeConfig, handler: Handler,
                 errors: list[BaseException]) -> asyncio.Server:
    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ch = await server_channel(r, w, cfg)
            await handler(ch)
        except Exception as exc:
            errors.append(exc)

    return await asyncio.start_server(on_conn, "127.0.0.1", 0)


async def _echo(ch: SecureChannel) -> None:
    try:
        while True:
            await ch.send(await ch.recv())
    except ChannelClosed:
        await ch.close()


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


@pytest.fixture
def cfgs(ca: CertificateAuthority, client: Identity,
         aggregator: Identity) -> tuple[HandshakeConfig, HandshakeConfig]:
    return (HandshakeConfig(client, ca.trust, timeout_s=5),
            HandshakeConfig(aggregator, ca.trust, timeout_s=5))


def test_echo_large_payload_with_key_updates(cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    c_cfg = replace(cfgs[0], max_plaintext=4096, key_update_after=8)
    s_cfg = replace(cfgs[1], max_plaintext=4096, key_update_after=8)
    payload = bytes(range(256)) * 1024  # 256 KiB -> 64 records -> 7 key updates each way

    async def main() -> None:
        errors: list[BaseException] = []
        srv = await _serve(s_cfg, _echo, errors)
        ch = await connect("127.0.0.1", _port(srv), c_cfg)
        assert ch.peer.node_id == "aggregator"
        await ch.send(payload)
        got = b""
        while len(got) < len(payload):
            got += await ch.recv()
        assert got == payload
        assert ch.key_updates_sent == 7 and ch.key_updates_received == 7
        await ch.close()
        srv.close()
        await asyncio.sleep(0.05)
        assert not errors

    asyncio.run(main())


class _Mitm:
    """Forwards bytes between client and server, letting a test alter the server-bound ones."""

    def __init__(self, target: int, alter: Callable[[int, bytes], bytes]) -> None:
        self.target, self.alter, self.count = target, alter, 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            while data := await src.read(65536):
                if up:
                    data = self.alter(self.count, data)
                    self.count += len(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(r, uw, True), pipe(ur, w, False), return_exceptions=True)


def _run_with_mitm(cfgs: tuple[HandshakeConfig, HandshakeConfig],
                   alter: Callable[[int, bytes], bytes],
                   client_action: Callable[[SecureChannel], Awaitable[None]]) -> list[BaseException]:
    async def main() -> list[BaseException]:
        errors: list[BaseException] = []
        received: list[bytes] = []

        async def collect(ch: SecureChannel) -> None:
            while True:
                received.append(await ch.recv())

        srv = await _serve(cfgs[1], collect, errors)
        mitm = _Mitm(_port(srv), alter)
        proxy = await asyncio.start_server(mitm.handle, "127.0.0.1", 0)
        try:
            ch = await connect("127.0.0.1", _port(proxy), cfgs[0])
            await client_action(ch)
        except HandshakeError as exc:
            errors.append(exc)
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.02)
        srv.close()
        proxy.close()
        assert b"tampered" not in b"".join(received), "a rejected record reached the app"
        return errors

    return asyncio.run(main())


def test_tampered_application_record_closes_with_logged_reason(
        cfgs: tuple[HandshakeConfig, HandshakeConfig], caplog: pytest.LogCaptureFixture) -> None:
    state = {"armed": False}

    def alter(_offset: int, data: bytes) -> bytes:
        if state["armed"]:
            state["armed"] = False
            return data[:-1] + bytes([data[-1] ^ 0x80])
        return data

    async def act(ch: SecureChannel) -> None:
        await asyncio.sleep(0.1)
        state["armed"] = True
        await ch.send(b"tampered payload")

    caplog.set_level(logging.WARNING, "pqfed.pqc.channel")
    errors = _run_with_mitm(cfgs, alter, act)
    assert any(isinstance(e, RecordError) and e.field == "tag" for e in errors), errors
    assert "closing channel to client-1" in caplog.text and "authentication failed" in caplog.text


def test_truncation_without_close_is_an_error(cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    async def act(ch: SecureChannel) -> None:
        await ch.send(b"partial")
        ch.abort()  # TCP FIN/RST without the authenticated close

    errors = _run_with_mitm(cfgs, lambda _o, d: d, act)
    assert any(isinstance(e, RecordError) and e.field in ("close", "stream") for e in errors)


def test_authenticated_close_is_clean(cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    async def act(ch: SecureChannel) -> None:
        await ch.send(b"bye")
        await ch.close()

    errors = _run_with_mitm(cfgs, lambda _o, d: d, act)
    assert len(errors) == 1 and isinstance(errors[0], ChannelClosed)


def test_handshake_timeout(cfgs: tuple[HandshakeConfig, HandshakeConfig],
                           caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await asyncio.sleep(5)

        srv = await asyncio.start_server(silent, "127.0.0.1", 0)
        with pytest.raises(HandshakeError, match="timeout"):
            await connect("127.0.0.1", _port(srv), replace(cfgs[0], timeout_s=0.3))
        srv.close()

    caplog.set_level(logging.WARNING, "pqfed.pqc.channel")
    asyncio.run(main())
    assert "no complete handshake" in caplog.text


def test_oversized_frame_from_peer_closes(cfgs: tuple[HandshakeConfig, HandshakeConfig]) -> None:
    from pqfed.pqc.record import HEADER, WIRE_VERSION, FrameType

    async def main() -> None:
        errors: list[BaseException] = []
        srv = await _serve(cfgs[1], _echo, errors)
        r, w = await asyncio.open_connection("127.0.0.1", _port(srv))
        w.write(HEADER.pack(FrameType.HANDSHAKE, WIRE_VERSION, 1 << 20))
        await w.drain()
        assert await r.read() == b""  # server hung up without answering
        srv.close()
        assert errors and isinstance(errors[0], RecordError) and errors[0].field == "length"

    asyncio.run(main())
