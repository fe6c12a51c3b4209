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
                pod_subnet: str | None = None) -> dict[str, str]:
    """Environment for testbed/cluster/up.sh and down.sh giving a test its own cluster: own
    state dir and free ports and, when pods get network namespaces, its own bridge and
    subnet, so it never touches a developer's cluster or a concurrently running suite."""
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
    return env
