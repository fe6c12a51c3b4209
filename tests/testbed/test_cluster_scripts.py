"""End-to-end check of testbed/cluster/{up,down}.sh against a real control plane.

Starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built
by testbed/cluster/build.sh) in a private state directory on free loopback
ports, so it never touches a developer's own cluster, then talks to it with the
official ``kubernetes`` Python client. Skips when the binaries are not built.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pqfed.testbed.testing import cluster_env, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

kubernetes = pytest.importorskip(
    "kubernetes", reason="the kubernetes client is not installed (pip install -e '.[k8s]')"
)
client = kubernetes.client
ApiException = kubernetes.client.rest.ApiException

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "testbed" / "cluster"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def _binaries_built() -> tuple[bool, str]:
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "build.sh"), "--check", *COMPONENTS],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0, proc.stdout.strip()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    built, detail = _binaries_built()
    if not built:
        pytest.skip(
            "Kubernetes control-plane binaries are not built; run testbed/cluster/build.sh "
            f"(cache: ${{PQFED_CACHE:-~/.cache/pqfed}}/bin):\n{detail}"
        )

    cluster_dir = tmp_path_factory.mktemp("cluster")
    env = cluster_env(cluster_dir, ["pqfed-node-0"])
    try:
        up = subprocess.run(
            ["bash", str(SCRIPTS / "up.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert up.returncode == 0, f"up.sh failed ({up.returncode}):\n{up.stderr}"
        kubeconfig = cluster_dir / "kubeconfig"
        assert up.stdout.strip() == f"export KUBECONFIG={kubeconfig}"
        yield {**env, "KUBECONFIG": str(kubeconfig)}
    finally:
        down = subprocess.run(
            ["bash", str(SCRIPTS / "down.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert down.returncode == 0, f"down.sh failed:\n{down.stderr}"
        leftover = [c for c in COMPONENTS if (cluster_dir / "run" / f"{c}.pid").exists()]
        assert not leftover, f"pidfiles left after down.sh: {leftover}"


def _client(kubeconfig: str) -> Any:
    return kubernetes.config.new_client_from_config(config_file=kubeconfig)


@pytest.fixture(scope="module")
def core(cluster: dict[str, str]) -> Any:
    return client.CoreV1Api(_client(cluster["KUBECONFIG"]))


@pytest.fixture
def namespace(core: Any) -> Iterator[str]:
    name = f"pqfed-test-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


def test_up_is_idempotent(cluster: dict[str, str]) -> None:
    again = subprocess.run(
        ["bash", str(SCRIPTS / "up.sh")],
        env=cluster,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    for c in COMPONENTS:
        assert f"{c} already running" in again.stderr
    assert again.stdout.strip() == f"export KUBECONFIG={cluster['KUBECONFIG']}"


def test_configmap_create_and_delete(core: Any, namespace: str) -> None:
    body = client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="pqfed-probe"), data={"round": "1", "kem": "ML-KEM-768"}
    )
    core.create_namespaced_config_map(namespace, body)
    got = core.read_namespaced_config_map("pqfed-probe", namespace)
    assert got.data == {"round": "1", "kem": "ML-KEM-768"}

    core.delete_namespaced_config_map("pqfed-probe", namespace)
    with pytest.raises(ApiException) as err:
        core.read_namespaced_config_map("pqfed-probe", namespace)
    assert err.value.status == 404


def _pod(name: str, node_name: str | None = None) -> Any:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"app": name}),
        spec=client.V1PodSpec(
            node_name=node_name,
            containers=[client.V1Container(name="main", image="registry.invalid/pause:1")],
        ),
    )


def _wait_default_sa(core: Any, namespace: str) -> None:
    """Pods are only admitted once the serviceaccount controller made `default`."""
    wait_for(
        lambda: (
            core.list_namespaced_service_account(
                namespace, field_selector="metadata.name=default"
            ).items
        ),
        60,
        f"service account {namespace}/default (kube-controller-manager)",
    )


def test_pod_bound_to_missing_node_stays_pending(core: Any, namespace: str) -> None:
    _wait_default_sa(core, namespace)
    core.create_namespaced_pod(namespace, _pod("bound", node_name="no-such-node"))
    time.sleep(3)
    pod = core.read_namespaced_pod("bound", namespace)
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name == "no-such-node"
    assert pod.spec.service_account_name == "default"  # ServiceAccount admission ran


def test_scheduler_marks_pod_unschedulable(core: Any, namespace: str) -> None:
    """No nodes exist, so a running kube-scheduler must report the Pod unschedulable."""
    _wait_default_sa(core, namespace)
    core.create_namespaced_pod(namespace, _pod("floating"))

    def unschedulable() -> bool:
        conds = core.read_namespaced_pod("floating", namespace).status.conditions or []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conds)

    wait_for(unschedulable, 60, "PodScheduled=False/Unschedulable from kube-scheduler")


def test_controller_manager_creates_pods_for_deployment(
    cluster: dict[str, str], namespace: str
) -> None:
    apps = client.AppsV1Api(_client(cluster["KUBECONFIG"]))
    core = client.CoreV1Api(apps.api_client)
    labels = {"app": "pqfed-deploy"}
    apps.create_namespaced_deployment(
        namespace,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="pqfed-deploy"),
            spec=client.V1DeploymentSpec(
                replicas=2,
                selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels),
                    spec=_pod("x").spec,
                ),
            ),
        ),
    )

    def two_pods() -> list[Any]:
        items = core.list_namespaced_pod(namespace, label_selector="app=pqfed-deploy").items
        return list(items) if len(items) == 2 else []

    pods = wait_for(two_pods, 90, "2 pods from the deployment and replicaset controllers")
    assert all(p.status.phase == "Pending" for p in pods)


def test_node_agent_identity(cluster: dict[str, str], core: Any) -> None:
    """nodes/<name>.kubeconfig authenticates as system:node:<name> under Node,RBAC."""
    node_kc = Path(cluster["PQFED_CLUSTER_DIR"]) / "nodes" / "pqfed-node-0.kubeconfig"
    assert node_kc.is_file()
    node_core = client.CoreV1Api(_client(str(node_kc)))
    node_core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="pqfed-node-0")))
    try:
        assert node_core.read_node("pqfed-node-0").metadata.name == "pqfed-node-0"
        # The Node authorizer does not let a node list all secrets.
        with pytest.raises(ApiException) as err:
            node_core.list_secret_for_all_namespaces()
        assert err.value.status == 403
    finally:
        core.delete_node("pqfed-node-0")
