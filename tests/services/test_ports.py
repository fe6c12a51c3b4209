"""services/ports.py: free loopback ports."""

from __future__ import annotations

import socket

from pqfed.services.ports import LOCALHOST, free_port, free_ports


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    socks = []
    try:
        for port in [*ports, free_port()]:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOCALHOST, port))
            socks.append(s)
    finally:
        for s in socks:
            s.close()
