"""The real node of the test cluster, shared by every module that needs it.

Session fixture `real_cluster`: one private cluster (testbed/cluster/up.sh with
PQFED_REAL_NODE=1: own state dir, free ports, own bridges and subnets, no emulated node
agents) for tests/testbed/test_real_node.py and tests/testbed/test_docs_quickstart.py, so the
built images (the fl archive is 2.5 GB) are imported once per run. An archive dropped into
the node's air-gap directory before start proves the k3s air-gap import. Only one real node
can run on a host (kube-proxy's iptables chains): the fixture skips when another owns it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pqfed.testbed.leftovers import DiskTooFull, check_disk
from pqfed.testbed.testing import (
    busybox_image_archive,
    cluster_env,
    free_subnet,
    real_node_run_id,
)

# A measurement, not a test (docs/BENCHMARKS.md): collected only when asked for, by
# `make bench-install` (PQFED_TIME_INSTALL=N), so a plain run lists no skip for it.
collect_ignore = [] if os.environ.get("PQFED_TIME_INSTALL") else ["test_real_node_timing.py"]

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "testbed" / "cluster"
RUN_ID = real_node_run_id()
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
            "kube-proxy", "containerd", "ctr", "containerd-shim-runc-v2", "coredns", "pause",
            "probe")


def _prerequisites() -> None:
    if os.geteuid() != 0:
        pytest.skip("a real node needs root (containers, cgroups, iptables)")
    built = subprocess.run(["bash", str(SCRIPTS / "build.sh"), "--check", *BINARIES],
                           capture_output=True, text=True, check=False)
    if built.returncode != 0:
        pytest.skip("the cluster binaries are not built; run `make cluster-binaries`:\n"
                    + built.stdout)
    missing = subprocess.run(["bash", str(SCRIPTS / "node.sh"), "prereqs"],
                             capture_output=True, text=True, check=False).stdout.strip()
    if missing:
        pytest.skip(f"the real node cannot start here (run `make cluster-binaries`):\n{missing}")
    owner = Path("/run/pqfed/real-node.owner")
    if owner.is_file():
        cluster_dir, _, pid = owner.read_text().strip().partition(" ")
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            pytest.skip(f"another cluster's real node ({cluster_dir}) runs on this host and owns "
                        "kube-proxy's iptables chains; stop it to run these tests")


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of the running cluster (up.sh's and node.sh's variables, KUBECONFIG)."""
    pytest.importorskip("kubernetes",
                        reason="the kubernetes client is not installed (pip install -e '.[k8s]')")
    _prerequisites()
    first = free_subnet(60 + int(RUN_ID, 16) % 20, 100)
    if first is None:
        pytest.skip("no free 10.X.0.0/16 for the control plane's pod bridge")
    x = int(first.split(".")[1])
    node_subnet = free_subnet(x + 1, 100)
    if node_subnet is None:
        pytest.skip("no free 10.X.0.0/16 for the real node's pods")
    cluster_dir = tmp_path_factory.mktemp("realnode")
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    try:
        check_disk(cluster_dir, REPO / "dist" / "images", arch)
    except DiskTooFull as e:
        pytest.fail(str(e), pytrace=False)
    env = cluster_env(cluster_dir, [], bridge=f"pqr{RUN_ID}", pod_subnet=first,
                      real_node=f"pqfed-real-{RUN_ID}", node_bridge=f"pqn{RUN_ID}",
                      node_subnet=node_subnet)
    airgap = cluster_dir / "node" / "agent" / "images"
    airgap.mkdir(parents=True)
    busybox_image_archive(airgap / "airgap-probe.tar", f"localhost/pqfed/airgap-probe:{RUN_ID}")
    try:
        up = subprocess.run(["bash", str(SCRIPTS / "up.sh")], env=env, capture_output=True,
                            text=True, timeout=600, check=False)
        assert up.returncode == 0, f"up.sh failed ({up.returncode}):\n{up.stderr[-6000:]}"
        node_env = dict(line.split("=", 1) for line in
                        (cluster_dir / "node" / "env").read_text().splitlines() if "=" in line)
        yield {**env, **node_env, "KUBECONFIG": str(cluster_dir / "kubeconfig")}
    finally:
        down = subprocess.run(["bash", str(SCRIPTS / "down.sh"), "--wipe"], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        assert down.returncode == 0, f"down.sh failed:\n{down.stderr[-4000:]}"
        assert not cluster_dir.exists(), "down.sh --wipe left the cluster dir"
        links = subprocess.run(["ip", "-o", "link", "show", f"pqn{RUN_ID}"],
                               capture_output=True, text=True, check=False)
        assert links.returncode != 0, "the node bridge survived down.sh --wipe"


@pytest.fixture(scope="session")
def real_api(real_cluster: dict[str, str]) -> Any:
    import kubernetes

    return kubernetes.config.new_client_from_config(config_file=real_cluster["KUBECONFIG"])
