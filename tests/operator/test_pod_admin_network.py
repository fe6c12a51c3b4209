"""The sidecar's admin API is unreachable from the pod network; the kubelet's probes are not.

Runs the sidecar exactly as the operator's aggregator pod runs it (`pods.aggregator_pod`),
inside a network namespace of its own (the pod), and connects from a second namespace over a
veth pair (the kubelet, or another pod, reaching the pod IP): the probes answer there,
/identity and /metrics do not, and inside the pod they do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqfed.operator import pods
from pqfed.pqc.identity import CertificateAuthority, Identity
from pqfed.services import node_defaults
from pqfed.services.spec import parse_spec

# --- two network namespaces: the pod, and someone on the pod network --------------------------

_GET = """
import json, sys, urllib.request, urllib.error
out = {}
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            out[url] = [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        out[url] = [e.code, e.read().decode()]
    except OSError as e:
        out[url] = ["unreachable", type(getattr(e, "reason", e)).__name__]
print(json.dumps(out))
"""


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def _pod_network() -> Iterator[tuple[str, str, str]]:
    """Namespaces `pod` (10.213.x.2, like a pod IP) and `peer` (10.213.x.1) joined by a veth
    pair; nothing is added to this host's own network namespace."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = f"{os.getpid() % 100000}"
    pod, peer = f"pqfed-pod-{tag}", f"pqfed-peer-{tag}"
    subnet = f"10.213.{os.getpid() % 250}"
    try:
        _run("ip", "netns", "add", pod)
        _run("ip", "netns", "add", peer)
        _run("ip", "link", "add", f"vp{tag}", "netns", pod, "type", "veth",
             "peer", "name", f"vq{tag}", "netns", peer)
        for ns, dev, ip in ((pod, f"vp{tag}", f"{subnet}.2"), (peer, f"vq{tag}", f"{subnet}.1")):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield pod, peer, f"{subnet}.2"
    finally:
        for ns in (pod, peer):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)


def _get(ns: str, *urls: str) -> dict[str, list[object]]:
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _GET, *urls],
                          capture_output=True, text=True, timeout=60, check=True)
    result: dict[str, list[object]] = json.loads(proc.stdout)
    return result


def _sidecar_command(tmp: Path) -> list[str]:
    """The aggregator pod's sidecar command, identity paths pointed at `tmp`."""
    pod = pods.aggregator_pod(pods.JobRef("demo", "fl", "uid-1"), parse_spec({}))
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["readinessProbe"]["httpGet"]["port"] == pods.PROBE_PORT
    cmd = [str(c).replace(node_defaults.IDENTITY_DIR, str(tmp)) for c in sidecar["command"]]
    assert cmd[:2] == ["pqfed", "sidecar"]
    return [sys.executable, "-m", "pqfed.cli", *cmd[1:], "--log-level", "warning"]


def test_admin_api_unreachable_from_the_pod_network(tmp_path: Path, ca: CertificateAuthority,
                                                    aggregator: Identity) -> None:
    aggregator.save(tmp_path / "tls.crt", tmp_path / "tls.key")
    (tmp_path / "ca.crt").write_text(ca.root.to_pem())
    cmd = _sidecar_command(tmp_path)
    with _pod_network() as (pod, peer, pod_ip):
        # The SuperLink stand-in the sidecar's readiness waits for (its upstream port).
        upstream = subprocess.Popen(
            ["ip", "netns", "exec", pod, sys.executable, "-c",
             "import socket,time; s=socket.create_server(('127.0.0.1', "
             f"{node_defaults.FLEET_PORT})); time.sleep(120)"])
        sidecar = subprocess.Popen(["ip", "netns", "exec", pod, *cmd],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            inside = f"http://127.0.0.1:{pods.ADMIN_PORT}"
            deadline = time.monotonic() + 60
            while True:
                got = _get(pod, f"{inside}/readyz")[f"{inside}/readyz"]
                if got[0] == 200 or time.monotonic() > deadline or sidecar.poll() is not None:
                    break
                time.sleep(0.3)
            assert got[0] == 200, (got, sidecar.poll())
            # Inside the pod the admin API answers with data ...
            ident = _get(pod, f"{inside}/identity")[f"{inside}/identity"]
            assert ident[0] == 200 and json.loads(str(ident[1]))["nodeId"] == "aggregator"
            # ... from the pod network, only the probes answer, and with no data.
            admin, probes = f"http://{pod_ip}:{pods.ADMIN_PORT}", f"http://{pod_ip}:{pods.PROBE_PORT}"
            seen = _get(peer, f"{admin}/identity", f"{admin}/metrics", f"{admin}/readyz",
                        f"{probes}/readyz", f"{probes}/healthz", f"{probes}/identity",
                        f"{probes}/metrics")
            assert seen[f"{admin}/identity"][0] == "unreachable"
            assert seen[f"{admin}/metrics"][0] == "unreachable"
            assert seen[f"{admin}/readyz"][0] == "unreachable"
            assert seen[f"{probes}/readyz"] == [200, "ready\n"]
            assert seen[f"{probes}/healthz"] == [200, "ok\n"]
            assert seen[f"{probes}/identity"][0] == 404
            assert seen[f"{probes}/metrics"][0] == 404
        finally:
            for proc in (sidecar, upstream):
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
