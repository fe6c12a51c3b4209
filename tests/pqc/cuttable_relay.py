"""A TCP relay in front of a sidecar that a test can cut, as a network would: each accepted
connection is pumped both ways and its two writers are kept, the one towards the dialling
side and the one towards the upstream, so either can be aborted mid-stream."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class CuttableRelay:
    server: asyncio.Server
    # Per connection: (writer towards the dialling side, writer towards the upstream).
    links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        self.server.close()


async def cuttable_relay(upstream_port: int) -> CuttableRelay:
    """Listens on a free loopback port and relays every connection to `upstream_port`."""
    links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []

    async def pump(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
        while data := await a.read(65536):
            b.write(data)
            await b.drain()

    async def relay(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", upstream_port)
        links.append((cw, sw))
        await asyncio.gather(pump(cr, sw), pump(sr, cw), return_exceptions=True)

    return CuttableRelay(await asyncio.start_server(relay, "127.0.0.1", 0), links)
