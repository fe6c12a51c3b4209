"""Loopback TCP ports for the processes pqfed starts on one host (no Flower, no I/O beyond a
bind): `pqfed run`, the benchmarks and the test clusters pick their ports here."""

from __future__ import annotations

import socket

LOCALHOST = "127.0.0.1"


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """Return ``count`` distinct currently-free TCP ports on ``host`` (all bound at once, so
    no two are the same; another process may still take one before the caller binds it)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = LOCALHOST) -> int:
    """One currently-free TCP port on ``host``."""
    return free_ports(1, host)[0]
