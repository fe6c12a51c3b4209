"""A whole emulated Raspberry Pi cluster for the operator end-to-end tests.

Session fixture `testbed`: the real control plane (testbed/cluster/up.sh: etcd, kube-apiserver,
controller-manager, scheduler) in a private state dir on free ports with its own pod bridge and
/16, three `pqfed node-agent` processes (emulated Pis, pods as processes in their own network
namespaces), and the Helm chart installed (helm binary, else helm-python-sdk rendering applied
with the kubernetes client), with the operator running as a pod on one of the Pis. Skips with
the reason when something it needs is missing (root, iproute2, the built binaries, the agent).
PQFED_E2E_HELM=sdk installs through helm-python-sdk even when a helm binary exists. Operator
and pod logs are copied to the session's tmp dir (`e2e*/`) before the cluster is wiped.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from pqfed.cache import cache_dir
from pqfed.services.spec import API_GROUP, API_GROUP_VERSION, API_VERSION, KIND, PLURAL
from pqfed.testbed.testing import cluster_env, free_subnet, wait_for

kubernetes = pytest.importorskip(
    "kubernetes", reason="the kubernetes client is not installed (pip install -e '.[k8s]')")
client = kubernetes.client
ApiException = kubernetes.client.exceptions.ApiException

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "testbed" / "cluster"
CHART = REPO / "charts" / "pqfed"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
RUN_ID = secrets.token_hex(3)
NODES = tuple(f"pqe{RUN_ID}-{i}" for i in range(3))
BRIDGE = f"pqe{RUN_ID}"
RELEASE, OPERATOR_NS = "pqfed", "pqfed-system"


def _free_subnet() -> str:
    subnet = free_subnet(150 + int(RUN_ID, 16) % 50, 250)
    if subnet is None:
        pytest.skip("no free 10.X.0.0/16 for the test pod network")
    return subnet


def _helm_binary() -> str | None:
    cache = cache_dir()
    candidate = cache / "bin" / "helm"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("helm")


def _skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("the emulated Pi nodes need root (network/mount namespaces, veth, cgroups)")
    for tool in ("ip", "nsenter", "openssl", "curl", "setsid"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (needed by testbed/cluster and the node agent)")
    if not (REPO / "testbed" / "nodeagent" / "main.py").is_file():
        pytest.skip("the node agent (testbed/nodeagent, `pqfed node-agent`) is not there")
    help_ = subprocess.run([sys.executable, "-m", "pqfed.cli", "node-agent", "--help"],
                           capture_output=True, text=True, check=False, timeout=60)
    if help_.returncode != 0:
        pytest.skip(f"`pqfed node-agent` does not run: {help_.stderr[-500:]}")
    proc = subprocess.run(["bash", str(SCRIPTS / "build.sh"), "--check", *COMPONENTS],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip("Kubernetes control-plane binaries are not built; run "
                    f"testbed/cluster/build.sh:\n{proc.stdout.strip()}")
    if _helm_binary() is None:
        try:
            import helm_python  # noqa: F401
        except (ImportError, OSError) as exc:
            pytest.skip(f"neither a helm binary nor helm-python-sdk ({exc})")


@dataclass
class Testbed:
    dir: Path
    env: dict[str, str]
    kubeconfig: str
    api: Any
    core: Any
    custom: Any
    networking: Any
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    namespace: str = "fl-e2e"
    timings: dict[str, float] = field(default_factory=dict)
    operator_namespace: str = OPERATOR_NS

    # Helpers for the test modules (conftest is not importable with --import-mode=importlib).
    wait_for = staticmethod(wait_for)

    @staticmethod
    def unique_name(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:5]}"

    # ---- FederationJobs ----
    def create_job(self, name: str, spec: dict[str, Any], *, namespace: str | None = None,
                   strict: bool = True) -> dict[str, Any]:
        body = {"apiVersion": API_GROUP_VERSION, "kind": KIND,
                "metadata": {"name": name}, "spec": spec}
        kwargs = {"field_validation": "Strict"} if strict else {}
        obj: dict[str, Any] = self.custom.create_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace or self.namespace, PLURAL, body, **kwargs)
        return obj

    def job(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace or self.namespace, PLURAL, name)
        return obj

    def status(self, name: str) -> dict[str, Any]:
        st: dict[str, Any] = self.job(name).get("status") or {}
        return st

    def delete_job(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace, PLURAL, name)

    def wait_phase(self, name: str, phases: tuple[str, ...], timeout: float) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            st = self.status(name)
            return st if st.get("phase") in phases else None

        return dict(wait_for(reached, timeout, f"job {name} to reach {phases}", 1.0,
                             lambda: self.diagnose(name)))

    # ---- pods ----
    def pods(self, selector: str, namespace: str | None = None) -> list[Any]:
        return list(self.core.list_namespaced_pod(namespace or self.namespace,
                                                  label_selector=selector).items)

    def operator_pods(self) -> list[Any]:
        return self.pods("app.kubernetes.io/component=operator", OPERATOR_NS)

    def ready_operator(self, exclude: set[str] | None = None) -> Any:
        for pod in self.operator_pods():
            if pod.metadata.name in (exclude or set()) or pod.metadata.deletion_timestamp:
                continue
            if any(c.type == "Ready" and c.status == "True"
                   for c in pod.status.conditions or []):
                return pod
        return None

    def operator_log(self, tail: int = 4000) -> str:
        """The logs of every operator pod so far (the agents keep logs of deleted pods)."""
        logs = sorted((self.dir / "cluster" / "agents").glob(
            f"*/pods/{OPERATOR_NS}_*/operator*.log"), key=lambda p: p.stat().st_mtime)
        return "\n".join(f"== {p.parent.name}/{p.name}\n"
                         f"{p.read_text(errors='replace')[-tail:]}" for p in logs)

    def stored_anywhere(self, text: str) -> list[str]:
        """The Secrets and ConfigMaps of the job and operator namespaces that hold `text`
        (e.g. a site's private key, which the operator must never see)."""
        found = []
        for ns in (self.namespace, self.operator_namespace):
            for sec in self.core.list_namespaced_secret(ns).items:
                if any(text in base64.b64decode(v).decode(errors="replace")
                       for v in (sec.data or {}).values()):
                    found.append(f"Secret {ns}/{sec.metadata.name}")
            for cm in self.core.list_namespaced_config_map(ns).items:
                if any(text in v for v in (cm.data or {}).values()):
                    found.append(f"ConfigMap {ns}/{cm.metadata.name}")
        return found

    def diagnose(self, name: str) -> str:
        lines = []
        try:
            st = self.status(name)
            lines.append(json.dumps({k: v for k, v in st.items() if k != "rounds"}, indent=1))
        except ApiException as exc:
            lines.append(f"job {name}: {exc.status}")
        for pod in self.pods(f"pqfed.io/job={name}"):
            lines.append(f"pod {pod.metadata.name} on {pod.spec.node_name}: {pod.status.phase}")
        lines.append(self.operator_log())
        return "\n".join(lines)


def _install_chart(env: dict[str, str], kubeconfig: str, api: Any, values: dict[str, Any],
                   tmp: Path) -> None:
    values_file = tmp / "values.json"  # JSON is YAML
    values_file.write_text(json.dumps(values))
    helm = None if os.environ.get("PQFED_E2E_HELM") == "sdk" else _helm_binary()
    if helm:
        proc = subprocess.run(
            [helm, "install", RELEASE, str(CHART), "-n", OPERATOR_NS, "--create-namespace",
             "--kubeconfig", kubeconfig, "-f", str(values_file)],
            env={**env, "HOME": str(tmp)}, capture_output=True, text=True, timeout=180,
            check=False)
        assert proc.returncode == 0, f"helm install failed:\n{proc.stderr}"
        return
    import helm_python
    from kubernetes import utils

    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=OPERATOR_NS)))
    for crd in sorted((CHART / "crds").glob("*.yaml")):
        utils.create_from_yaml(api, str(crd))
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values=values, name=RELEASE, namespace=OPERATOR_NS,
                                 is_install=True)
    order = ["ServiceAccount", "ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding"]
    docs = [doc for path, text in sorted(manifests.items())
            if not path.endswith("NOTES.txt") and "/tests/" not in path
            for doc in yaml.safe_load_all(text) if doc]
    docs.sort(key=lambda d: order.index(d["kind"]) if d["kind"] in order else len(order))
    for doc in docs:
        utils.create_from_dict(api, doc, namespace=OPERATOR_NS)


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    _skip_unless_possible()
    t0 = time.monotonic()
    artifacts = tmp_path_factory.mktemp("e2e")
    # Not below /tmp: the chart mounts an emptyDir at the operator pod's /tmp, which would
    # hide the sources of its later volume mounts if the cluster state lived there.
    base = Path(tempfile.mkdtemp(prefix=f"pqfed-e2e-{RUN_ID}-", dir="/var/tmp"))
    cluster_dir = base / "cluster"
    env = cluster_env(cluster_dir, NODES, bridge=BRIDGE, pod_subnet=_free_subnet())
    env.pop("KUBECONFIG", None)
    agents: list[subprocess.Popen[bytes]] = []
    bed: Testbed | None = None
    try:
        up = subprocess.run(["bash", str(SCRIPTS / "up.sh")], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
        assert up.returncode == 0, f"up.sh failed ({up.returncode}):\n{up.stderr}"
        kubeconfig = str(cluster_dir / "kubeconfig")
        for node in NODES:
            log = open(base / f"agent-{node}.log", "wb")  # noqa: SIM115
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "pqfed.cli", "node-agent", "--name", node,
                 "--restart-backoff", "1", "--shutdown-grace", "5"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
        bed = Testbed(base, env, kubeconfig, api, client.CoreV1Api(api),
                      client.CustomObjectsApi(api), client.NetworkingV1Api(api), agents)

        def nodes_ready() -> bool:
            for proc in agents:
                assert proc.poll() is None, _agent_logs(base)
            ready = [n for n in bed.core.list_node().items if any(
                c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])]
            return len(ready) == len(NODES)

        wait_for(nodes_ready, 90, "three emulated Pi nodes Ready")
        _install_chart(env, kubeconfig, api, {"operator": {"logLevel": "info"}}, artifacts)
        wait_for(bed.ready_operator, 120, "the operator pod (Helm release) to be Ready", 1.0,
                 bed.operator_log)
        bed.core.create_namespace(client.V1Namespace(
            metadata=client.V1ObjectMeta(name=bed.namespace)))
        wait_for(lambda: bed.core.list_namespaced_service_account(
            bed.namespace, field_selector="metadata.name=default").items, 60,
            "service account default")
        bed.timings["setup"] = time.monotonic() - t0
        yield bed
    finally:
        if bed is not None:
            (artifacts / "operator.log").write_text(bed.operator_log(tail=2_000_000))
            pod_logs = base / "cluster" / "agents"
            with contextlib.suppress(OSError, shutil.Error):
                shutil.copytree(pod_logs, artifacts / "agents", dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("volumes", "*.sock", "netns"),
                                ignore_dangling_symlinks=True)
            (artifacts / "timings.json").write_text(json.dumps(bed.timings, indent=1))
        for log in base.glob("agent-*.log"):
            shutil.copy(log, artifacts / log.name)
        down = subprocess.run(["bash", str(SCRIPTS / "down.sh"), "--wipe"], env=env,
                              capture_output=True, text=True, timeout=240, check=False)
        for proc in agents:  # down.sh stops them by their pidfiles; this is a safety net
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        assert down.returncode == 0, f"down.sh failed:\n{down.stderr}"


def _agent_logs(base: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:]
                     for p in sorted(base.glob("agent-*.log")))
