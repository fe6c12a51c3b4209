"""Drives a client and a server handshake in memory, with a hook to alter any flight."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pqfed.pqc.errors import HandshakeError
from pqfed.pqc.handshake import ClientHandshake, HandshakeConfig, ServerHandshake
from pqfed.pqc.record import FrameDecoder

Tamper = Callable[[int, bytes], bytes]  # (flight number 0..2, bytes) -> bytes


@dataclass
class Result:
    client: ClientHandshake
    server: ServerHandshake
    flights: list[bytes]


def run_handshake(client_cfg: HandshakeConfig, server_cfg: HandshakeConfig,
                  tamper: Tamper | None = None) -> Result:
    """Flights: 0 = ClientHello, 1 = ServerHello + server flight, 2 = client flight.
    Raises whatever the endpoints raise."""
    t = tamper or (lambda _i, b: b)
    client, server = ClientHandshake(client_cfg), ServerHandshake(server_cfg)
    to_server, to_client = FrameDecoder(), FrameDecoder()
    flights: list[bytes] = []
    f0 = t(0, client.start())
    flights.append(f0)
    f1 = t(1, b"".join(server.receive(f) for f in to_server.feed(f0)))
    flights.append(f1)
    f2 = t(2, b"".join(client.receive(f) for f in to_client.feed(f1)))
    flights.append(f2)
    for frame in to_server.feed(f2):
        server.receive(frame)
    if not (client.complete and server.complete):
        # Over a socket this is a stalled handshake, ended by the handshake timeout.
        raise HandshakeError("timeout", "handshake did not complete")
    return Result(client, server, flights)
