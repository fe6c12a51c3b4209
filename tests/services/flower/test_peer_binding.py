"""One Flower node per certificate: an enrolled client that registers two SuperNodes through
its own PQC route holds one live node at the SuperLink, so it cannot count twice in sampling,
`min_available_nodes` or Krum's f. Real SuperLink, real SuperNodes, real PQC sidecars (the
aggregator's injects the channel's certified node id, services/flower/patches.py binds)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pqfed.pqc.identity import CertificateAuthority, Role
from pqfed.services import flower as fr
from pqfed.services.ports import free_port


def _sidecar(tmp: Path, ca: CertificateAuthority, node: str, role: Role,
             *args: str) -> subprocess.Popen[bytes]:
    d = tmp / node
    d.mkdir(parents=True, exist_ok=True)
    ca.new_identity(node, role).save(d / "tls.crt", d / "tls.key")
    (d / "ca.crt").write_text(ca.root.to_pem())
    log = (tmp / f"sidecar-{node}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "pqfed.cli", "sidecar", "--cert", str(d / "tls.crt"),
         "--key", str(d / "tls.key"), "--ca", str(d / "ca.crt"),
         "--admin", f"127.0.0.1:{free_port()}", "--log-level", "warning", *args],
        stdout=log, stderr=subprocess.STDOUT)


def _online(control: str) -> int:
    return sum(st == "online" for st in fr.list_nodes(control).values())


@pytest.mark.slow
def test_two_supernodes_of_one_certificate_hold_one_node(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate("fed-bind")
    link = fr.SuperLinkProcess(tmp_path / "link", free_port(), tuning=fr.FlowerTuning(poll_cap=0.5))
    secure = free_port()
    routes = {f"client-{i}": free_port() for i in range(2)}
    procs = [
        _sidecar(tmp_path, ca, "aggregator", Role.AGGREGATOR, "--listen",
                 f"127.0.0.1:{secure}", "--upstream", link.address,
                 "--allow-path-prefix", "/v1/fleet/"),
        *(_sidecar(tmp_path, ca, node, Role.CLIENT, "--route",
                   f"127.0.0.1:{port}=127.0.0.1:{secure}@aggregator")
          for node, port in routes.items()),
    ]
    # client-0 registers two SuperNodes through its route; client-1 one (the control)
    nodes = [fr.SuperNodeProcess(tmp_path / f"node-{i}", i, f"127.0.0.1:{routes[c]}",
                                 free_port(), tuning=fr.FlowerTuning(poll_cap=0.5))
             for i, c in enumerate(("client-0", "client-0", "client-1"))]
    try:
        link.start()
        link.wait_ready(60)
        nodes[0].start()
        nodes[2].start()
        fr.wait_nodes(link.address, 2, 90, [n.proc for n in nodes if n.proc])
        nodes[1].start()  # client-0's second SuperNode
        deadline = time.monotonic() + 60
        while len(fr.list_nodes(link.address)) < 3:  # until the third registration is in
            assert time.monotonic() < deadline, "client-0's second registration never came"
            time.sleep(0.5)
        nodes[1].wait_ready(60)
        time.sleep(3)  # heartbeats: a node that still counts is online by now
        print(fr.list_nodes(link.address))
        assert _online(link.address) == 2  # client-0 once, client-1 once
    finally:
        for n in nodes:
            n.stop()
        link.stop()
        for p in procs:
            p.terminate()
            p.wait(10)
