"""Helpers for tests that run against the local control plane and emulated Pi nodes
(shared by tests/testbed and tests/e2e, like kopf.testing for operators)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class WaitTimeout(AssertionError):
    """A condition did not hold in time (an AssertionError, so pytest reports it as a
    failure with the message)."""


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.5,
             diagnose: Callable[[], str] | None = None) -> Any:
    """Polls `cond` until it returns something truthy; raises WaitTimeout naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            extra = f"\n{diagnose()}" if diagnose else ""
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def free_subnet(first: int, last: int) -> str | None:
    """A 10.X.0.0/16 with first <= X < last that no route on this host overlaps, or None.
    Callers pick disjoint ranges so concurrently running suites never collide."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                            text=True, check=False).stdout
    used = {int(m.group(1)) for m in re.finditer(r"\b10\.(\d+)\.", routes)}
    return next((f"10.{x}.0.0/16" for x in range(first, last) if x not in used), None)


def cluster_env(cluster_dir: Path, nodes: Sequence[str], *, bridge: str | None = None,
                pod_subnet: str | None = None, real_node: str | None = None,
                node_bridge: str | None = None, node_subnet: str | None = None) -> dict[str, str]:
    """Environment for testbed/cluster/up.sh and down.sh giving a test its own cluster: own
    state dir and free ports and, when pods get network namespaces, its own bridge and
    subnet, so it never touches a developer's cluster or a concurrently running suite.

    A real node (testbed/cluster/node.sh: kubelet + containerd) is started only when
    `real_node` names it; it then needs `node_bridge` and `node_subnet` of its own and gets
    free ports for the kubelet, kube-proxy and CoreDNS. Otherwise PQFED_REAL_NODE=0, whatever
    the caller's environment says."""
    from pqfed.services.flower_runtime import free_ports

    etcd_client, etcd_peer, api, kcm, sched = free_ports(5)
    env = {
        **os.environ,
        "PQFED_CLUSTER_DIR": str(cluster_dir),
        "PQFED_ETCD_CLIENT_PORT": str(etcd_client),
        "PQFED_ETCD_PEER_PORT": str(etcd_peer),
        "PQFED_APISERVER_PORT": str(api),
        "PQFED_KCM_PORT": str(kcm),
        "PQFED_SCHEDULER_PORT": str(sched),
        "PQFED_NODE_NAMES": " ".join(nodes),
    }
    if bridge is not None and pod_subnet is not None:
        env.update({"PQFED_POD_NETWORK": "on", "PQFED_BRIDGE": bridge,
                    "PQFED_POD_SUBNET": pod_subnet})
    env["PQFED_REAL_NODE"] = "0"
    if real_node is not None:
        if node_bridge is None or node_subnet is None:
            raise ValueError("cluster_env: a real node needs node_bridge and node_subnet "
                             "(a bridge and 10.X.0.0/16 of its own)")
        kubelet, kubelet_health, proxy_health, proxy_metrics, dns_health, dns_ready = (
            free_ports(6))
        env.update({
            "PQFED_REAL_NODE": "1",
            "PQFED_REAL_NODE_NAME": real_node,
            "PQFED_NODE_BRIDGE": node_bridge,
            "PQFED_NODE_POD_SUBNET": node_subnet,
            "PQFED_KUBELET_PORT": str(kubelet),
            "PQFED_KUBELET_HEALTHZ_PORT": str(kubelet_health),
            "PQFED_KUBE_PROXY_HEALTHZ_PORT": str(proxy_health),
            "PQFED_KUBE_PROXY_METRICS_PORT": str(proxy_metrics),
            "PQFED_COREDNS_HEALTH_PORT": str(dns_health),
            "PQFED_COREDNS_READY_PORT": str(dns_ready),
        })
    return env
