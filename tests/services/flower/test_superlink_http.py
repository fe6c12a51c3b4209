"""The SuperLink's HTTP/1.1 implementation is pinned to the one the sidecar's request filter
was validated against (pqc/sidecar/httpfilter.py UPSTREAM_HTTP_IMPLEMENTATION).

flwr 1.42 starts its Fleet/Control/Runtime API with `uvicorn.run(...)` and no `http=`, so
uvicorn would pick httptools or h11 by what is installed; the two disagree on edge cases the
filter cares about. A request whose lines end in bare LF tells them apart on a real SuperLink:
h11 answers it, httptools (llhttp) refuses it with 400.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pqfed.pqc.sidecar.httpfilter import UPSTREAM_HTTP_IMPLEMENTATION
from pqfed.services import flower as fr
from pqfed.services.flower.patches import pin_uvicorn_http
from pqfed.services.ports import LOCALHOST, free_port
from pqfed.services.procs import ManagedProcess, wait_http_ok

BARE_LF = b"GET /health HTTP/1.1\nHost: superlink\n\n"
CRLF = b"GET /health HTTP/1.1\r\nHost: superlink\r\nConnection: close\r\n\r\n"


def _status(port: int, request: bytes) -> int:
    with socket.create_connection((LOCALHOST, port), timeout=10) as conn:
        conn.sendall(request)
        head = conn.recv(64)
    return int(head.split(b" ", 2)[1])


def test_the_validated_implementation_is_httptools() -> None:
    assert UPSTREAM_HTTP_IMPLEMENTATION == "httptools"
    assert fr.superlink_http_implementation() == UPSTREAM_HTTP_IMPLEMENTATION


@pytest.mark.parametrize("poll_cap", [None, 0.2])
def test_superlink_command_pins_the_http_implementation(tmp_path: Path,
                                                         poll_cap: float | None) -> None:
    cmd = fr.SuperLinkProcess(tmp_path, 9999, tuning=fr.FlowerTuning(poll_cap=poll_cap)).command()
    assert cmd[1:4] == ["-m", "pqfed.services.flower", "exec"]
    assert cmd[cmd.index("--http") + 1] == UPSTREAM_HTTP_IMPLEMENTATION
    assert "flower-superlink" in cmd


def test_pin_overrides_uvicorns_default() -> None:
    import uvicorn

    original = uvicorn.Config.__init__
    try:
        pin_uvicorn_http("h11")
        assert uvicorn.Config(app=None).http == "h11"  # type: ignore[arg-type]
        pin_uvicorn_http("httptools")  # re-pinning wraps the original, not the wrapper
        assert uvicorn.Config(app=None, http="h11").http == "httptools"  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="--http"):
            pin_uvicorn_http("auto")
    finally:
        uvicorn.Config.__init__ = original  # type: ignore[method-assign]


@pytest.mark.slow
def test_real_superlink_runs_the_pinned_parser(tmp_path: Path) -> None:
    """The SuperLink as the aggregator pod starts it refuses a bare-LF request (httptools);
    the same SuperLink pinned to h11 answers it, so the probe tells the two apart."""
    link = fr.SuperLinkProcess(tmp_path / "pinned", free_port())
    other = fr.SuperLinkProcess(tmp_path / "h11", free_port())
    argv = other.command()
    argv[argv.index("--http") + 1] = "h11"  # the same command, pinned the other way
    h11 = ManagedProcess("superlink-h11", argv, tmp_path / "h11" / "superlink.log",
                            other.env(), other.flwr_home)
    try:
        link.start()
        h11.start()
        link.wait_ready(90)
        wait_http_ok(f"http://{other.address}/health", 90, h11)
        assert _status(link.port, CRLF) == 200
        assert _status(link.port, BARE_LF) == 400  # httptools
        assert _status(other.port, CRLF) == 200
        assert _status(other.port, BARE_LF) == 200  # h11 ends a line at a bare LF
    finally:
        link.stop()
        h11.stop()
