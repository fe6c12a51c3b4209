"""The command lines of the processes a federation on one machine runs: the PQC sidecars,
the aggregator, the edges and the clients, as `pqfed run` (services/runner.py) starts them.

One builder for every caller, so the capacity benchmark (testbed/bench/capacity.py) starts
the aggregator and the edges exactly as `pqfed run` does, and a flag added here reaches both.
Each function returns an argv list; ports are numbers on 127.0.0.1, identities are the
directories `pqfed.services.identity_dir` writes (tls.crt, tls.key, ca.crt).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from pqfed.services.node_defaults import FLEET_PATH_PREFIX

PQFED: tuple[str, ...] = (sys.executable, "-m", "pqfed.cli")
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class SidecarRoute:
    """An outbound channel of a sidecar: plaintext in on ``local_port``, PQC out to
    ``peer`` (host:port), whose certificate must name the node ``peer_id``."""

    local_port: int
    peer: str
    peer_id: str

    def to_arg(self) -> str:
        return f"{LOOPBACK}:{self.local_port}={self.peer}@{self.peer_id}"


def sidecar_command(identity_dir: Path, group: str, admin_port: int, *,
                    listen_port: int | None = None, upstream_port: int | None = None,
                    route: SidecarRoute | None = None, edge_peers: bool = False) -> list[str]:
    """`pqfed sidecar`: inbound (``listen_port`` → the Fleet API on ``upstream_port``,
    Fleet paths only), outbound (``route``), or both, as an edge's sidecar is.
    ``edge_peers``: the inbound side serves edges, not clients."""
    if (listen_port is None) != (upstream_port is None):
        raise ValueError("sidecar: listen_port and upstream_port go together")
    argv = [*PQFED, "sidecar", "--cert", str(identity_dir / "tls.crt"),
            "--key", str(identity_dir / "tls.key"), "--ca", str(identity_dir / "ca.crt"),
            "--group", group]
    if listen_port is not None:
        argv += ["--listen", f"{LOOPBACK}:{listen_port}",
                 "--upstream", f"{LOOPBACK}:{upstream_port}",
                 "--allow-path-prefix", FLEET_PATH_PREFIX]
    if edge_peers:
        argv += ["--peer-role", "edge"]
    if route is not None:
        argv += ["--route", route.to_arg()]
    return [*argv, "--admin", f"{LOOPBACK}:{admin_port}", "--log-level", "warning"]


def aggregator_command(job_file: Path, identity_dir: Path, state_dir: Path, fleet_port: int,
                       status_port: int, *, poisoning: bool = False) -> list[str]:
    """`pqfed fl aggregator`: SuperLink, ServerApp and the status endpoint."""
    return [*PQFED, "fl", "aggregator", "--spec", str(job_file),
            "--identity-dir", str(identity_dir), "--state-dir", str(state_dir),
            "--fleet-port", str(fleet_port), "--status-port", str(status_port),
            *(["--poisoning"] if poisoning else [])]


def edge_command(job_file: Path, index: int, identity_dir: Path, state_dir: Path,
                 superlink: str, fleet_port: int, runtime_port: int) -> list[str]:
    """`pqfed fl edge` number ``index``, reaching the aggregator at ``superlink``."""
    return [*PQFED, "fl", "edge", "--spec", str(job_file), "--index", str(index),
            "--identity-dir", str(identity_dir), "--state-dir", str(state_dir),
            "--superlink", superlink, "--fleet-port", str(fleet_port),
            "--runtime-port", str(runtime_port)]


def client_command(job_file: Path, index: int, identity_dir: Path, state_dir: Path,
                   superlink: str, runtime_port: int, *, attack: str | None = None) -> list[str]:
    """`pqfed fl client` number ``index``, reaching its aggregator or edge at ``superlink``."""
    return [*PQFED, "fl", "client", "--spec", str(job_file), "--index", str(index),
            "--identity-dir", str(identity_dir), "--state-dir", str(state_dir),
            "--superlink", superlink, "--runtime-port", str(runtime_port),
            *(["--attack", attack] if attack else [])]
