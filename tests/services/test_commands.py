"""services/commands.py: every command line it builds is one the `pqfed` parser accepts, with
the values where the command reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqfed.cli import build_parser, command_modules
from pqfed.services import (
    FLEET_PATH_PREFIX,
    SidecarRoute,
    aggregator_command,
    client_command,
    edge_command,
    sidecar_command,
)
from pqfed.services.commands import PQFED


def _parse(argv: list[str]):  # type: ignore[no-untyped-def]
    assert argv[: len(PQFED)] == list(PQFED)
    rest = argv[len(PQFED):]
    return build_parser(command_modules(rest)).parse_args(rest)


def test_inbound_sidecar_serves_the_fleet_api_only(tmp_path: Path) -> None:
    args = _parse(sidecar_command(tmp_path, "X25519_MLKEM768", 9001, listen_port=9002,
                                  upstream_port=9003, edge_peers=True))
    assert (args.listen, args.upstream) == ("127.0.0.1:9002", "127.0.0.1:9003")
    assert args.allow_path_prefix == [FLEET_PATH_PREFIX]
    assert args.peer_role == ["edge"]
    assert args.route == []
    assert args.cert == str(tmp_path / "tls.crt") and args.ca == str(tmp_path / "ca.crt")
    assert (args.admin, args.group) == ("127.0.0.1:9001", ["X25519_MLKEM768"])


def test_edge_sidecar_is_inbound_and_routes_out(tmp_path: Path) -> None:
    args = _parse(sidecar_command(tmp_path, "X25519_MLKEM768", 1, listen_port=2,
                                  upstream_port=3,
                                  route=SidecarRoute(4, "127.0.0.1:5", "aggregator")))
    assert args.route == ["127.0.0.1:4=127.0.0.1:5@aggregator"]
    assert args.peer_role == []  # clients only


def test_client_sidecar_only_routes_out(tmp_path: Path) -> None:
    args = _parse(sidecar_command(tmp_path, "X25519_MLKEM1024", 1,
                                  route=SidecarRoute(4, "127.0.0.1:5", "edge-0")))
    assert args.listen is None and args.upstream is None
    assert args.route == ["127.0.0.1:4=127.0.0.1:5@edge-0"]


def test_inbound_sidecar_needs_both_ports(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="listen_port and upstream_port"):
        sidecar_command(tmp_path, "X25519_MLKEM768", 1, listen_port=2)


def test_fl_commands(tmp_path: Path) -> None:
    job, ids, state = tmp_path / "job.yaml", tmp_path / "ids", tmp_path / "state"
    agg = _parse(aggregator_command(job, ids, state, 7000, 7001, poisoning=True))
    assert (agg.fleet_port, agg.status_port, agg.poisoning) == (7000, 7001, True)
    assert not _parse(aggregator_command(job, ids, state, 7000, 7001)).poisoning
    edge = _parse(edge_command(job, 2, ids, state, "127.0.0.1:7002", 7003, 7004))
    assert (edge.index, edge.superlink, edge.fleet_port, edge.runtime_port) == (
        2, "127.0.0.1:7002", 7003, 7004)
    client = _parse(client_command(job, 5, ids, state, "127.0.0.1:7005", 7006,
                                   attack="label-flip"))
    assert (client.index, client.superlink, client.attack) == (5, "127.0.0.1:7005",
                                                               "label-flip")
    assert _parse(client_command(job, 5, ids, state, "x:1", 7006)).attack is None
