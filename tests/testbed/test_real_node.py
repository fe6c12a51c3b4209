"""The real node of the test cluster (testbed/cluster/node.sh): kubelet + containerd + runc +
CNI bridge + kube-proxy + CoreDNS, all real, beside the real control plane of up.sh.

One private cluster for the session (tests/testbed/conftest.py: own state dir, free ports, own
bridges and subnets, no emulated node agents), started with PQFED_REAL_NODE=1. Pods run from
images that reach the node only by import, the k3s air-gap way: the node's busybox test image,
an archive dropped into the air-gap directory before start, and one imported with
`node.sh import` afterwards. The built images run the operator (installed by `helm install`)
and FederationJobs, also through a lost client, a restarted operator and a lost aggregator.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pqfed.operator import pods as m
from pqfed.testbed.testing import (
    aggregator_round,
    assert_every_round_once,
    assert_resumed_from_checkpoint,
    busybox_image_archive,
    checkpointed_rounds,
    condition,
    job_leftovers,
    real_node_run_id,
    stored_checkpoint,
    wait_for,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.real_node, pytest.mark.images]

kubernetes = pytest.importorskip(
    "kubernetes", reason="the kubernetes client is not installed (pip install -e '.[k8s]')")
client = kubernetes.client
ApiException = kubernetes.client.rest.ApiException

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "testbed" / "cluster"
RUN_ID = real_node_run_id()  # the session cluster's (conftest.py)
NODE = f"pqfed-real-{RUN_ID}"
AIRGAP_IMAGE = f"localhost/pqfed/airgap-probe:{RUN_ID}"
IMPORTED_IMAGE = f"localhost/pqfed/import-probe:{RUN_ID}"


@pytest.fixture(scope="module")
def cluster(real_cluster: dict[str, str]) -> dict[str, str]:
    """The session's real-node cluster (tests/testbed/conftest.py)."""
    return real_cluster


@pytest.fixture(scope="module")
def api(real_api: Any) -> Any:
    return real_api


@pytest.fixture(scope="module")
def core(api: Any) -> Any:
    return client.CoreV1Api(api)


@pytest.fixture
def namespace(core: Any) -> Iterator[str]:
    name = f"real-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_for(lambda: _has_default_sa(core, name), 60, f"service account {name}/default")
    yield name
    core.delete_namespace(name)


def _has_default_sa(core: Any, ns: str) -> bool:
    try:
        core.read_namespaced_service_account("default", ns)
    except ApiException:
        return False
    return True


def _pod(name: str, image: str, script: str, *, policy: str = "Never",
         restart: str = "Never", labels: dict[str, str] | None = None,
         security: Any = None) -> Any:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels or {"app": name}),
        spec=client.V1PodSpec(
            node_name=NODE, restart_policy=restart, termination_grace_period_seconds=2,
            containers=[client.V1Container(
                name="main", image=image, image_pull_policy=policy,
                command=["/bin/sh", "-c", script], security_context=security)]))


def _phase(core: Any, ns: str, name: str) -> str:
    return str(core.read_namespaced_pod(name, ns).status.phase)


def _diagnose(core: Any, ns: str, name: str) -> str:
    pod = core.read_namespaced_pod(name, ns)
    events = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}")
    return (f"status: {pod.status}\nevents: "
            + "; ".join(f"{e.reason}: {e.message}" for e in events.items))


def _wait_phase(core: Any, ns: str, name: str, phases: tuple[str, ...], timeout: float = 120
                ) -> str:
    return str(wait_for(lambda: _phase(core, ns, name) in phases and _phase(core, ns, name),
                        timeout, f"pod {ns}/{name} in {phases}",
                        diagnose=lambda: _diagnose(core, ns, name)))


def _logs(core: Any, ns: str, name: str) -> str:
    # The kubelet serves logs; the apiserver proxies to it with its kubelet client cert.
    return str(core.read_namespaced_pod_log(name, ns, container="main"))


def _pod_exists(core: Any, ns: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, ns)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _node_ctr(cluster: dict[str, str], *args: str) -> str:
    out = subprocess.run(["bash", str(SCRIPTS / "node.sh"), "ctr", *args], env=cluster,
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout


def _host_pid(cluster: dict[str, str], container_id: str) -> int:
    for line in _node_ctr(cluster, "tasks", "ls").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id:
            return int(fields[1])
    raise AssertionError(f"container {container_id} has no task in the node's containerd")


def test_node_registers_ready(core: Any, cluster: dict[str, str]) -> None:
    node = core.read_node(NODE)
    ready = {c.type: c.status for c in node.status.conditions}
    assert ready.get("Ready") == "True", node.status.conditions
    info = node.status.node_info
    assert info.kubelet_version == "v1.37.2"
    assert info.container_runtime_version.startswith("containerd://2."), info
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    labels = node.metadata.labels
    assert labels["kubernetes.io/arch"] == arch
    assert labels["kubernetes.io/os"] == "linux"
    assert labels["kubernetes.io/hostname"] == NODE
    assert labels["pqfed.io/testbed"] == "real"
    addresses = {a.type: a.address for a in node.status.addresses}
    assert addresses["InternalIP"] == cluster["PQFED_NODE_IP"]


def test_up_again_leaves_the_node_running(cluster: dict[str, str]) -> None:
    again = subprocess.run(["bash", str(SCRIPTS / "up.sh")], env=cluster, capture_output=True,
                           text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-4000:]
    for component in ("containerd", "kubelet", "coredns", "kube-proxy"):
        assert f"{component} already running" in again.stderr, again.stderr[-4000:]
    status = subprocess.run(["bash", str(SCRIPTS / "node.sh"), "status"], env=cluster,
                            capture_output=True, text=True, check=True).stdout
    assert "stopped" not in status, status


def test_pod_is_a_real_container(core: Any, namespace: str, cluster: dict[str, str]) -> None:
    script = ("echo uid=$(id -u) gid=$(id -g); "
              "if touch /probe 2>/dev/null; then echo rootfs=rw; else echo rootfs=ro; fi; "
              "echo pid1=$(tr '\\0' ' ' </proc/1/cmdline); "
              "echo default_routes=$(ip route | grep -c default); echo ready; exec sleep 3600")
    security = client.V1SecurityContext(run_as_user=4321, run_as_group=4321,
                                        read_only_root_filesystem=True,
                                        allow_privilege_escalation=False)
    core.create_namespaced_pod(namespace, _pod("real", cluster["PQFED_TEST_IMAGE"], script,
                                               security=security))
    _wait_phase(core, namespace, "real", ("Running",))
    logs = wait_for(lambda: "ready" in _logs(core, namespace, "real") and
                    _logs(core, namespace, "real"), 60, "the pod's log")
    assert "uid=4321 gid=4321" in logs
    assert "rootfs=ro" in logs
    # PID 1 of the container is its own shell: it has a PID namespace of its own.
    assert "pid1=/bin/sh -c" in logs
    # No default route: the pod reaches the service range and the control plane, nothing else.
    assert "default_routes=0" in logs

    pod = core.read_namespaced_pod("real", namespace)
    assert pod.status.pod_ip.startswith(cluster["PQFED_NODE_IP"].rsplit(".", 2)[0] + ".")
    container_id = pod.status.container_statuses[0].container_id
    assert container_id.startswith("containerd://"), container_id
    pid = _host_pid(cluster, container_id.removeprefix("containerd://"))
    host_ns = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("pid", "net", "mnt")}
    for ns, link in host_ns.items():
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != link, f"the container shares the {ns} ns"
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {"4321"}, status
    cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    assert f"/pqfed-{NODE}/kubepods" in cgroups, cgroups
    assert pod.metadata.uid.replace("-", "_") in cgroups or pod.metadata.uid in cgroups, cgroups

    # Deleting the pod stops the container: the task and its host process go away.
    core.delete_namespaced_pod("real", namespace)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60, f"container process {pid} to exit")
    cid = container_id.removeprefix("containerd://")

    def task_gone() -> bool:
        rows = [r.split() for r in _node_ctr(cluster, "tasks", "ls").splitlines()[1:]]
        return not any(r and r[0] == cid and r[-1] == "RUNNING" for r in rows)

    wait_for(task_gone, 60, f"task {cid} to stop")
    wait_for(lambda: not _pod_exists(core, namespace, "real"), 60, "the pod object to go")


def test_service_by_dns_name_and_cluster_ip(core: Any, namespace: str,
                                           cluster: dict[str, str]) -> None:
    image = cluster["PQFED_TEST_IMAGE"]
    serve = ("mkdir -p /tmp/www && echo hello-from-$(hostname) >/tmp/www/index.html && "
             "exec httpd -f -p 8080 -h /tmp/www")
    core.create_namespaced_pod(namespace, _pod("web", image, serve, labels={"app": "web"}))
    svc = core.create_namespaced_service(namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1ServiceSpec(selector={"app": "web"}, ports=[
            client.V1ServicePort(port=80, target_port=8080, protocol="TCP")])))
    ip = svc.spec.cluster_ip
    _wait_phase(core, namespace, "web", ("Running",))
    fqdn = f"web.{namespace}.svc.cluster.local"
    probe = (f"nslookup {fqdn} && "
             f"echo by-name=$(timeout 10 wget -q -O - http://{fqdn}/) && "
             f"echo by-ip=$(timeout 10 wget -q -O - http://{ip}/) && "
             # The short name resolves through the search path kubelet writes.
             f"echo short=$(timeout 10 wget -q -O - http://web/)")
    core.create_namespaced_pod(namespace, _pod("client", image, probe,
                                               restart="OnFailure"))
    phase = _wait_phase(core, namespace, "client", ("Succeeded",), timeout=180)
    assert phase == "Succeeded"
    logs = _logs(core, namespace, "client")
    assert ip in logs, logs      # nslookup answered with the Service's ClusterIP
    assert "by-name=hello-from-web" in logs, logs
    assert "by-ip=hello-from-web" in logs, logs
    assert "short=hello-from-web" in logs, logs


def test_kubernetes_service_reaches_apiserver_with_token(core: Any, api: Any, namespace: str,
                                                         cluster: dict[str, str]) -> None:
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(namespace, client.V1Role(
        metadata=client.V1ObjectMeta(name="read-pods"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get"])]))
    rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="read-pods"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role",
                                  name="read-pods"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="default",
                                       namespace=namespace)]))
    # The test image's `probe` verifies the apiserver against the pod's CA bundle and sends
    # the pod's token, as an in-cluster client library does; anonymous must be refused.
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    url = ("https://kubernetes.default.svc.cluster.local/api/v1/namespaces/"
           f"$(cat {sa}/namespace)/pods/$(hostname)")
    script = (f"echo anonymous=$(probe -ca {sa}/ca.crt {url} >/dev/null 2>&1 "
              f"&& echo allowed || echo refused); "
              f"probe -ca {sa}/ca.crt -token {sa}/token {url}")
    core.create_namespaced_pod(namespace, _pod("whoami", cluster["PQFED_TEST_IMAGE"], script,
                                               restart="OnFailure"))
    _wait_phase(core, namespace, "whoami", ("Succeeded",), timeout=180)
    first, _, rest = _logs(core, namespace, "whoami").partition("\n")
    assert first == "anonymous=refused"
    body = json.loads(rest)
    assert body["kind"] == "Pod"
    assert body["metadata"]["name"] == "whoami"
    assert body["spec"]["nodeName"] == NODE


def test_images_reach_the_node_by_import(core: Any, namespace: str, cluster: dict[str, str],
                                         tmp_path: Path) -> None:
    # Dropped into the air-gap directory before the node started.
    core.create_namespaced_pod(namespace, _pod("airgap", AIRGAP_IMAGE, "echo from-airgap"))
    # Imported into the running node, as `k3s ctr images import` would.
    archive = busybox_image_archive(tmp_path / "probe.tar", IMPORTED_IMAGE)
    subprocess.run(["bash", str(SCRIPTS / "node.sh"), "import", str(archive)], env=cluster,
                   check=True, capture_output=True, timeout=120)
    assert IMPORTED_IMAGE in _node_ctr(cluster, "images", "ls", "-q")
    core.create_namespaced_pod(namespace, _pod("imported", IMPORTED_IMAGE, "echo from-import",
                                               policy="IfNotPresent"))
    for name, word in (("airgap", "from-airgap"), ("imported", "from-import")):
        _wait_phase(core, namespace, name, ("Succeeded",))
        assert _logs(core, namespace, name).strip() == word


@pytest.mark.parametrize(("policy", "reasons"), [
    ("Never", {"ErrImageNeverPull"}),
    # A pull is tried (localhost only; nothing listens there) and fails for real.
    ("IfNotPresent", {"ErrImagePull", "ImagePullBackOff"}),
])
def test_image_not_imported_fails_with_a_real_reason(core: Any, namespace: str,
                                                     policy: str, reasons: set[str]) -> None:
    image = f"localhost:1/pqfed/not-imported:{RUN_ID}"
    core.create_namespaced_pod(namespace, _pod("absent", image, "true", policy=policy))

    def waiting_reason() -> str | None:
        statuses = core.read_namespaced_pod("absent", namespace).status.container_statuses
        waiting = statuses[0].state.waiting if statuses else None
        return waiting.reason if waiting and waiting.reason in reasons else None

    reason = wait_for(waiting_reason, 120, f"waiting reason in {reasons}",
                      diagnose=lambda: _diagnose(core, namespace, "absent"))
    assert reason in reasons
    assert _phase(core, namespace, "absent") == "Pending"


def test_the_built_sidecar_image_runs_as_a_pod(core: Any, namespace: str,
                                               cluster: dict[str, str]) -> None:
    """What `make images` builds, imported the k3s air-gap way, runs on the real node under
    its exact name: `pqfed selftest` in the sidecar image as uid 10001, read-only root."""
    archive = REPO / "dist" / "images" / "pqfed-sidecar-0.1.0.oci.tar"
    if not archive.is_file():
        pytest.skip(f"{archive} is not built: run `make images` (make test does)")
    image = "localhost/pqfed/sidecar:0.1.0"
    subprocess.run(["bash", str(SCRIPTS / "node.sh"), "import", str(archive)], env=cluster,
                   check=True, capture_output=True, timeout=300)
    assert image in _node_ctr(cluster, "images", "ls", "-q").split()
    security = client.V1SecurityContext(
        run_as_user=10001, run_as_group=10001, run_as_non_root=True,
        read_only_root_filesystem=True, allow_privilege_escalation=False,
        capabilities=client.V1Capabilities(drop=["ALL"]))
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="selftest"),
        spec=client.V1PodSpec(
            node_name=NODE, restart_policy="Never", termination_grace_period_seconds=2,
            volumes=[client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource())],
            containers=[client.V1Container(
                name="main", image=image, image_pull_policy="Never",
                command=["pqfed", "selftest"], security_context=security,
                volume_mounts=[client.V1VolumeMount(name="tmp", mount_path="/tmp")])]))
    core.create_namespaced_pod(namespace, pod)
    _wait_phase(core, namespace, "selftest", ("Succeeded", "Failed"), timeout=300)
    log = _logs(core, namespace, "selftest")
    assert _phase(core, namespace, "selftest") == "Succeeded", log
    assert "pqfed1 handshake + records over loopback" in log and "FAIL" not in log, log
    assert "liboqs 0.13.0 via ctypes" in log, log  # the image carries liboqs


def _built(name: str) -> Path:
    archive = REPO / "dist" / "images" / f"pqfed-{name}-0.1.0.oci.tar"
    if not archive.is_file():
        pytest.skip(f"{archive} is not built: run `make images` (make test does)")
    return archive


def _helm() -> Path:
    helm = Path(os.environ.get("PQFED_CACHE", Path.home() / ".cache" / "pqfed")) / "bin" / "helm"
    if not helm.is_file():
        pytest.skip("no helm binary: run `make cluster-binaries` (make test does)")
    return helm


def _import_built_images(cluster: dict[str, str]) -> None:
    """Imports the built operator, sidecar and fl archives the node does not have yet (another
    module of the session may have imported them already: the fl archive is 2.5 GB)."""
    present = _node_ctr(cluster, "images", "ls", "-q").split()
    for name in ("operator", "sidecar", "fl"):
        archive = _built(name)
        if f"localhost/pqfed/{name}:0.1.0" not in present:
            done = subprocess.run(["bash", str(SCRIPTS / "node.sh"), "import", str(archive)],
                                  env=cluster, capture_output=True, text=True, timeout=600,
                                  check=False)
            assert done.returncode == 0, f"node.sh import {archive} failed:\n{done.stderr}"


@pytest.fixture(scope="module")
def operator(cluster: dict[str, str], api: Any,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The chart installed with its default values on a node that has only the imported
    images (operator, sidecar, fl), as docs/helm.md's air-gapped install does; uninstalled
    at the end of the module (the docs' quickstart installs it again under the same name)."""
    helm = _helm()
    _import_built_images(cluster)
    helm_env = {**cluster, "HOME": str(tmp_path_factory.mktemp("helm"))}
    install = subprocess.run(
        [str(helm), "install", "pqfed", str(REPO / "charts" / "pqfed"), "-n", "pqfed-system",
         "--create-namespace", "--kubeconfig", cluster["KUBECONFIG"], "--wait",
         "--timeout", "240s"],
        env=helm_env, capture_output=True, text=True, timeout=300, check=False)
    if install.returncode != 0:
        pods = client.CoreV1Api(api).list_namespaced_pod("pqfed-system").items
        raise AssertionError(f"helm install failed: {install.stderr}\n"
                             + "\n".join(str(p.status) for p in pods))
    yield {**helm_env, "HELM": str(helm)}
    uninstall = subprocess.run(
        [str(helm), "uninstall", "pqfed", "-n", "pqfed-system", "--kubeconfig",
         cluster["KUBECONFIG"], "--wait", "--timeout", "120s"],
        env=helm_env, capture_output=True, text=True, timeout=180, check=False)
    assert uninstall.returncode == 0, f"helm uninstall failed:\n{uninstall.stderr}"


def test_helm_install_runs_the_built_operator_image(operator: dict[str, str], api: Any) -> None:
    """The operator is a real container that reaches the apiserver through the `kubernetes`
    Service, and `helm test` passes (its pod runs the operator image too)."""
    (dep,) = client.AppsV1Api(api).list_namespaced_deployment("pqfed-system").items
    assert dep.spec.template.spec.containers[0].image == "localhost/pqfed/operator:0.1.0"
    assert dep.status.ready_replicas == 1
    (pod,) = client.CoreV1Api(api).list_namespaced_pod(
        "pqfed-system", label_selector="app.kubernetes.io/component=operator").items
    assert pod.spec.node_name == NODE
    test = subprocess.run([operator["HELM"], "test", "pqfed", "-n", "pqfed-system",
                           "--kubeconfig", operator["KUBECONFIG"], "--timeout", "180s"],
                          env=operator, capture_output=True, text=True, timeout=240,
                          check=False)
    assert test.returncode == 0, f"helm test failed:\n{test.stdout}\n{test.stderr}"


def test_federation_job_succeeds_in_real_containers(operator: dict[str, str], api: Any,
                                                     namespace: str) -> None:
    """A FederationJob with the default images: aggregator and client pods (fl + native PQC
    sidecar) are real containers on the real node, talking over the real pod network through
    ClusterIP Services and cluster DNS; the job reaches Succeeded."""
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    body = {"apiVersion": "pqfed.io/v1alpha1", "kind": "FederationJob",
            "metadata": {"name": "real"},
            "spec": {"task": "breast-cancer", "clients": 2, "minClients": 2, "rounds": 2}}
    custom.create_namespaced_custom_object("pqfed.io", "v1alpha1", namespace,
                                           "federationjobs", body)

    def diagnose() -> str:
        pods = core.list_namespaced_pod(namespace).items
        out = [f"{p.metadata.name}: {p.status.phase} "
               f"{[(c.name, c.state) for c in (p.status.container_statuses or [])]}"
               for p in pods]
        for p in pods:
            for c in ("fl", "sidecar"):
                try:
                    out.append(f"--- {p.metadata.name}/{c}\n" + core.read_namespaced_pod_log(
                        p.metadata.name, namespace, container=c, tail_lines=30))
                except ApiException as exc:
                    out.append(f"--- {p.metadata.name}/{c}: {exc.reason}")
        return "\n".join(out)

    def phase() -> str | None:
        st = custom.get_namespaced_custom_object("pqfed.io", "v1alpha1", namespace,
                                                 "federationjobs", "real").get("status") or {}
        return st.get("phase") if st.get("phase") in ("Succeeded", "Failed") else None

    assert wait_for(phase, 600, "the job to finish", diagnose=diagnose) == "Succeeded", \
        diagnose()
    st = custom.get_namespaced_custom_object("pqfed.io", "v1alpha1", namespace,
                                             "federationjobs", "real")["status"]
    assert [r["round"] for r in st["rounds"]] == [1, 2] and st["accuracy"] > 0.8
    agg = core.read_namespaced_pod("real-aggregator", namespace)
    assert agg.spec.node_name == NODE
    assert {c.image for c in agg.spec.containers} == {"localhost/pqfed/fl:0.1.0"}
    assert {c.image for c in agg.spec.init_containers} == {"localhost/pqfed/sidecar:0.1.0"}


# ---- faults, in real containers ----

# Once the fl containers are up a breast-cancer round takes ~2 s on the real node, while a
# new operator or aggregator pod takes tens of seconds to start: enough rounds that the job is
# still running when each fault is handled.
FAULT_SPEC: dict[str, Any] = {"task": "breast-cancer", "clients": 3, "minClients": 2,
                              "rounds": 30}
OPERATOR_SELECTOR = "app.kubernetes.io/component=operator"


class _Jobs:
    """FederationJobs in one namespace of the real-node cluster."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api, self.ns = api, namespace
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.networking = client.NetworkingV1Api(api)

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": "pqfed.io/v1alpha1", "kind": "FederationJob",
                "metadata": {"name": name}, "spec": spec}
        return dict(self.custom.create_namespaced_custom_object(
            "pqfed.io", "v1alpha1", self.ns, "federationjobs", body,
            field_validation="Strict"))

    def get(self, name: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object("pqfed.io", "v1alpha1", self.ns,
                                                             "federationjobs", name))

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def pods(self, selector: str, namespace: str | None = None) -> list[Any]:
        return list(self.core.list_namespaced_pod(namespace or self.ns,
                                                  label_selector=selector).items)

    def ready_operator(self, exclude: str = "") -> Any:
        for pod in self.pods(OPERATOR_SELECTOR, "pqfed-system"):
            if pod.metadata.name == exclude or pod.metadata.deletion_timestamp:
                continue
            if any(c.type == "Ready" and c.status == "True"
                   for c in pod.status.conditions or []):
                return pod
        return None

    def log(self, pod: str, container: str, namespace: str | None = None,
            tail: int | None = None) -> str:
        try:
            return str(self.core.read_namespaced_pod_log(pod, namespace or self.ns,
                                                         container=container,
                                                         tail_lines=tail))
        except ApiException as exc:
            return f"(no log of {pod}/{container}: {exc.reason})"

    def diagnose(self, name: str) -> str:
        out = []
        try:
            st = self.status(name)
            out.append(json.dumps({k: v for k, v in st.items() if k != "rounds"}, indent=1))
        except ApiException as exc:
            out.append(f"job {name}: {exc.status}")
        for pod in self.pods(f"pqfed.io/job={name}"):
            out.append(f"pod {pod.metadata.name}: {pod.status.phase}")
            for c in ("fl", "sidecar"):
                out.append(f"--- {pod.metadata.name}/{c}\n"
                           + self.log(pod.metadata.name, c, tail=20))
        for pod in self.pods(OPERATOR_SELECTOR, "pqfed-system"):
            out.append(f"--- operator {pod.metadata.name}\n"
                       + self.log(pod.metadata.name, "operator", "pqfed-system", tail=60))
        return "\n".join(out)

    def wait_phase(self, name: str, phases: tuple[str, ...], timeout: float
                   ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            st = self.status(name)
            return st if st.get("phase") in phases else None

        return dict(wait_for(reached, timeout, f"job {name} to reach {phases}", 1.0,
                             lambda: self.diagnose(name)))

    def identities(self, name: str) -> dict[str, str]:
        """The job's CA, revocation list and identity Secrets (name: uid), not its checkpoint."""
        items = self.core.list_namespaced_secret(self.ns,
                                                 label_selector=f"pqfed.io/job={name}").items
        return {s.metadata.name: s.metadata.uid for s in items
                if s.metadata.name != m.checkpoint_secret_name(name)}


def test_job_survives_a_lost_client_a_restarted_operator_and_a_lost_aggregator(
        operator: dict[str, str], api: Any, namespace: str) -> None:
    """One breast-cancer job in real containers through three faults, then deleted:

    1. after round 1 a client pod is killed (no grace) and the operator's pod deleted at the
       same moment; the Deployment starts a new operator, which recreates the client and
       nothing else (same aggregator, same CA and identities);
    2. the aggregator pod is deleted once a checkpoint is stored in `<job>-checkpoint`; the
       operator recreates it with `--restore`, and the new aggregator resumes from the stored
       round (its log says so; the stored rounds keep their completion times), not round 0;
    3. the job reaches Succeeded with every round counted once;
    4. deleting the job removes every child (pods, Services, Secrets, ConfigMaps,
       NetworkPolicies) and the job itself.
    """
    jobs = _Jobs(api, namespace)
    name, rounds = "faults", FAULT_SPEC["rounds"]
    created = jobs.create(name, FAULT_SPEC)
    jobs.wait_phase(name, ("Running", "Succeeded", "Failed"), 300)
    identities = jobs.identities(name)
    assert set(identities) == {f"{name}-ca", m.crl_secret_name(name),
                               f"{name}-aggregator-identity", f"{name}-operator-identity",
                               *(f"{name}-client-{i}-identity" for i in range(3))}
    (agg,) = jobs.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator")
    assert agg.spec.node_name == NODE

    # 1. A client crashes and, at the same time, the operator's pod goes away.
    at = wait_for(lambda: aggregator_round(jobs.core, namespace, name), 300,
                  "round 1 to complete", 0.3, lambda: jobs.diagnose(name))
    assert at < rounds, "the job finished before it could be disrupted"
    old_operator = jobs.ready_operator()
    assert old_operator is not None
    jobs.core.delete_namespaced_pod(f"{name}-client-1", namespace, grace_period_seconds=0)
    jobs.core.delete_namespaced_pod(old_operator.metadata.name, "pqfed-system")
    new_operator = wait_for(lambda: jobs.ready_operator(exclude=old_operator.metadata.name),
                            300, "a new operator pod Ready", 1.0, lambda: jobs.diagnose(name))
    assert new_operator.metadata.uid != old_operator.metadata.uid
    assert new_operator.spec.node_name == NODE

    def client_recreated() -> str | None:
        st = jobs.status(name)
        found = [c for c in st.get("conditions") or [] if c["type"] == "PodsRecreated"]
        return found[0]["message"] if found and "client-1" in found[0]["message"] else None

    message = wait_for(client_recreated, 180, "the new operator to recreate client-1", 1.0,
                       lambda: jobs.diagnose(name))
    assert "aggregator" not in message, message
    assert [p.metadata.uid for p in jobs.pods(
        f"pqfed.io/job={name},pqfed.io/role=aggregator")] == [agg.metadata.uid]
    assert jobs.identities(name) == identities  # nothing issued twice by the new operator

    # 2. The aggregator is lost once the operator stored a checkpoint.
    ckpt = wait_for(lambda: stored_checkpoint(api, jobs.core, namespace, name), 300,
                    "a checkpoint in the Secret", 0.5, lambda: jobs.diagnose(name))
    kept, before = m.checkpoint_round(ckpt), checkpointed_rounds(ckpt)
    assert kept < rounds, "the job finished before the aggregator could be lost"
    jobs.core.delete_namespaced_pod(m.aggregator_pod_name(name), namespace)

    def resumed() -> int | None:
        for pod in jobs.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator"):
            if pod.metadata.uid != agg.metadata.uid and pod.status.phase in (
                    "Running", "Succeeded"):
                found = re.search(rf"restored job {name} at round (\d+)",
                                  jobs.log(pod.metadata.name, "fl"))
                return int(found.group(1)) if found else None
        return None

    restored = wait_for(resumed, 300, "the new aggregator to restore the checkpoint", 1.0,
                        lambda: jobs.diagnose(name))
    assert kept <= restored < rounds, (kept, restored)

    # 3. Succeeded, every round once, the stored rounds restored rather than trained again.
    st = jobs.wait_phase(name, ("Succeeded", "Failed", "Cancelled"), 600)
    assert st["phase"] == "Succeeded", jobs.diagnose(name)
    assert_every_round_once(st, rounds)
    assert_resumed_from_checkpoint(st, before, kept)
    recreated = condition(st, "PodsRecreated")["message"]
    assert "client-1" in recreated and f"resumes from checkpoint round {restored}" in recreated
    assert st["accuracy"] > 0.9
    assert st["observedGeneration"] == created["metadata"]["generation"]
    (new_agg,) = jobs.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator")
    assert new_agg.metadata.uid != agg.metadata.uid
    assert new_agg.spec.containers[0].command[-2:] == ["--restore", m.RESTORE_DIR]
    assert jobs.identities(name) == identities

    # 4. Deleting the job removes everything it created.
    jobs.custom.delete_namespaced_custom_object("pqfed.io", "v1alpha1", namespace,
                                                "federationjobs", name)
    wait_for(lambda: not job_leftovers(jobs.core, jobs.networking, jobs.custom, namespace),
             120, "every child and the job to be gone", 1.0,
             lambda: f"left: {job_leftovers(jobs.core, jobs.networking, jobs.custom, namespace)}"
                     f"\n{jobs.diagnose(name)}")


# ---- a registry instead of imports ----


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_node_pulls_the_pushed_images_from_a_registry(core: Any, namespace: str,
                                                      cluster: dict[str, str],
                                                      tmp_path: Path) -> None:
    """docs/helm.md's registry route: `make images-push` into Debian's docker-registry on
    loopback, then the node's containerd pulls the sidecar image from it (plain HTTP: a
    loopback registry, as containerd allows for localhost) and it runs under that name."""
    if shutil.which("docker-registry") is None or shutil.which("skopeo") is None:
        pytest.skip("docker-registry and skopeo are not installed (images/prereqs.sh)")
    _built("sidecar")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {tmp_path / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    registry = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "config.yml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(port), 30, "the registry to listen")
        target = f"127.0.0.1:{port}/pqfed"
        push = subprocess.run(["make", "-C", str(REPO), "images-push", f"REGISTRY={target}",
                               "PUSH_FLAGS=--dest-tls-verify=false",
                               f"VENV={Path(sys.executable).parent.parent}"],
                              capture_output=True, text=True, timeout=1800, check=False)
        assert push.returncode == 0, push.stdout[-2000:] + push.stderr[-3000:]
        image = f"{target}/sidecar:0.1.0"
        assert image not in _node_ctr(cluster, "images", "ls", "-q").split()
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(name="pulled"),
            spec=client.V1PodSpec(
                node_name=NODE, restart_policy="Never", termination_grace_period_seconds=2,
                containers=[client.V1Container(
                    name="main", image=image, image_pull_policy="Always",
                    command=["pqfed", "--help"],
                    security_context=client.V1SecurityContext(run_as_user=10001))]))
        core.create_namespaced_pod(namespace, pod)
        _wait_phase(core, namespace, "pulled", ("Succeeded", "Failed"), timeout=300)
        assert _phase(core, namespace, "pulled") == "Succeeded", _diagnose(core, namespace,
                                                                           "pulled")
        assert "sidecar" in _logs(core, namespace, "pulled")
        status = core.read_namespaced_pod("pulled", namespace).status.container_statuses[0]
        built = json.loads((REPO / "dist" / "images" / "images.json").read_text())
        assert status.image_id.endswith(built["images"]["sidecar"]["index_digest"]), status
        assert image in _node_ctr(cluster, "images", "ls", "-q").split()
    finally:
        registry.terminate()
        registry.wait(timeout=30)
