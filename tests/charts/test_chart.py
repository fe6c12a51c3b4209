"""The Helm chart: lints clean, renders with defaults and with peered replicas, least-privilege
RBAC, standard labels everywhere, hardened pods, and values.schema.json refusing bad values.

Renders with helm-python-sdk (`helm_python`, no binary needed); falls back to the helm binary
at ${PQFED_CACHE:-~/.cache/pqfed}/bin/helm; skips when neither is available.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "pqfed"
KUBE_VERSION = "v1.37.0"  # `helm template` otherwise assumes an old cluster (kubeVersion)
RELEASE, NAMESPACE = "fl", "pqfed-system"
STANDARD_LABELS = ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                   "app.kubernetes.io/version", "app.kubernetes.io/managed-by",
                   "app.kubernetes.io/part-of")
# Everything the operator may do, per (apiGroup, resource). Nothing else may appear.
ALLOWED: dict[tuple[str, str], set[str]] = {
    ("pqfed.io", "federationjobs"): {"get", "list", "watch", "patch", "update"},
    ("pqfed.io", "federationjobs/status"): {"get", "patch", "update"},
    ("pqfed.io", "federationjobs/finalizers"): {"get", "patch", "update"},
    ("", "pods"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "pods/log"): {"get"},
    ("", "services"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "secrets"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "configmaps"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "events"): {"create", "patch"},
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "create", "delete"},
}
PEERING_VERBS = {"get", "list", "watch", "patch"}


class Helm(Protocol):
    def render(self, values: dict[str, Any]) -> list[dict[str, Any]]: ...
    def lint_problems(self, values: dict[str, Any]) -> list[str]: ...
    def schema_error(self, values: dict[str, Any]) -> str | None: ...


class SdkHelm:
    """helm-python-sdk: Helm's Go SDK through its C ABI."""

    def __init__(self) -> None:
        import helm_python

        self.helm = helm_python

    def render(self, values: dict[str, Any]) -> list[dict[str, Any]]:
        with self.helm.Chart.load(CHART) as chart:
            chart.validate_schema(values)  # as `helm install` does before rendering
            manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE,
                                     is_install=True)
        texts = [text for path, text in sorted(manifests.items())
                 if not path.endswith("NOTES.txt")]
        return _docs("\n---\n".join(texts))

    def lint_problems(self, values: dict[str, Any]) -> list[str]:
        report = self.helm.lint(CHART, values, strict=True, kube_version=KUBE_VERSION)
        return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]

    def schema_error(self, values: dict[str, Any]) -> str | None:
        with self.helm.Chart.load(CHART) as chart:
            try:
                chart.validate_schema(values)
            except self.helm.HelmValuesError as exc:
                return str(exc)
        return None


class BinaryHelm:
    """The helm CLI, for when the SDK's native library cannot load."""

    def __init__(self, binary: str) -> None:
        self.binary = binary

    def _run(self, *args: str, values: dict[str, Any],
             tmp: Path) -> subprocess.CompletedProcess[str]:
        vals = tmp / "values.json"  # JSON is YAML
        vals.write_text(json.dumps(values))
        return subprocess.run([self.binary, *args, "-f", str(vals)], capture_output=True,
                              text=True, check=False, timeout=120)

    def render(self, values: dict[str, Any]) -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory() as tmp:
            proc = self._run("template", RELEASE, str(CHART), "-n", NAMESPACE,
                             "--kube-version", KUBE_VERSION, values=values, tmp=Path(tmp))
        assert proc.returncode == 0, proc.stderr
        return _docs(proc.stdout)

    def lint_problems(self, values: dict[str, Any]) -> list[str]:
        with tempfile.TemporaryDirectory() as tmp:
            proc = self._run("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION,
                             values=values, tmp=Path(tmp))
        out = proc.stdout + proc.stderr
        return [] if proc.returncode == 0 and "[WARNING]" not in out else [out]

    def schema_error(self, values: dict[str, Any]) -> str | None:
        with tempfile.TemporaryDirectory() as tmp:
            proc = self._run("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION,
                             values=values, tmp=Path(tmp))
        return None if proc.returncode == 0 else proc.stderr


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _binary() -> str | None:
    cache = Path(os.environ.get("PQFED_CACHE", Path.home() / ".cache" / "pqfed"))
    candidate = cache / "bin" / "helm"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("helm")


@pytest.fixture(scope="module")
def helm() -> Helm:
    reasons = []
    try:
        return SdkHelm()
    except (ImportError, OSError) as exc:  # not installed, or libhelm_c failed to load
        reasons.append(f"helm_python unusable ({exc})")
    binary = _binary()
    if binary:
        return BinaryHelm(binary)
    reasons.append("no helm binary in $PQFED_CACHE/bin or on PATH")
    pytest.skip("; ".join(reasons) + " (pip install -e '.[k8s]')")


SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "replicas2": {"operator": {"replicas": 2}},
    "replicas2-namespaced": {"operator": {"replicas": 2},
                             "watchNamespaces": ["hospital-a", "hospital-b"]},
    "everything-on": {"serviceMonitor": {"enabled": True}, "jobDefaults": {"kem": "ML-KEM-1024"},
                      "operator": {"hostNetwork": True, "extraEnv": [{"name": "A", "value": "b"}],
                                   "nodeSelector": {"kubernetes.io/arch": "arm64"}}},
}


@pytest.fixture(scope="module", params=list(SCENARIOS))
def scenario(request: pytest.FixtureRequest, helm: Helm) -> tuple[str, list[dict[str, Any]]]:
    name: str = request.param
    return name, helm.render(SCENARIOS[name])


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _operator(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = _kind(docs, "Deployment")
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return containers[0]


def _pods(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in docs:
        if d["kind"] == "Deployment":
            yield d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield d["spec"]


# --- lint and schema ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCENARIOS))
def test_lint_is_clean(helm: Helm, name: str) -> None:
    assert helm.lint_problems(SCENARIOS[name]) == []


@pytest.mark.parametrize("values", [
    {"operator": {"replicas": "two"}},
    {"operator": {"replicas": -1}},
    {"image": {"pullPolicy": "Sometimes"}},
    {"metrics": {"port": 70000}},
    {"watchNamespaces": ["Not_A_Namespace"]},
    {"jobDefaults": {"kem": "Kyber512"}},
    {"typo": True},
], ids=json.dumps)
def test_schema_rejects_bad_values(helm: Helm, values: dict[str, Any]) -> None:
    assert helm.schema_error(values)


def test_schema_accepts_defaults_and_scenarios(helm: Helm) -> None:
    for values in SCENARIOS.values():
        assert helm.schema_error(values) is None


# --- every object ---------------------------------------------------------------------------

def test_every_object_has_standard_labels(scenario: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = scenario
    assert docs
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{doc['kind']}/{doc['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
    (deployment,) = _kind(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(k in pod_labels for k in STANDARD_LABELS)
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert "app.kubernetes.io/version" not in selector  # selectors are immutable
    assert selector.items() <= pod_labels.items()


def test_pods_are_hardened(scenario: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = scenario
    pods = list(_pods(docs))
    assert len(pods) == 2  # the operator and the helm test pod
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["limits"]["memory"]


# --- RBAC -----------------------------------------------------------------------------------

def test_rbac_is_least_privilege(scenario: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = scenario
    roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role")]
    assert roles
    peered = SCENARIOS[name].get("operator", {}).get("replicas", 1) > 1
    namespaced = bool(SCENARIOS[name].get("watchNamespaces"))
    assert {r["kind"] for r in roles} == {"Role" if namespaced else "ClusterRole"}
    for role in roles:
        granted: dict[tuple[str, str], set[str]] = {}
        for rule in role["rules"]:
            assert set(rule) <= {"apiGroups", "resources", "verbs"}  # no nonResourceURLs
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {field}: {rule}"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
        peering_resource = ("kopf.dev", "kopfpeerings" if namespaced else "clusterkopfpeerings")
        expected = dict(ALLOWED)
        if peered:
            expected[peering_resource] = PEERING_VERBS
        assert granted == expected


def test_bindings_point_at_the_service_account(
        scenario: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = scenario
    (sa,) = _kind(docs, "ServiceAccount")
    bindings = [d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    roles = {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
             for d in docs if d["kind"] in ("ClusterRole", "Role")}
    assert len(bindings) == len(roles)
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                        "namespace": NAMESPACE}]
        ref = binding["roleRef"]
        assert (ref["kind"], ref["name"], binding["metadata"].get("namespace")) in roles


# --- operator deployment --------------------------------------------------------------------

def test_defaults_run_one_standalone_operator_on_all_namespaces(helm: Helm) -> None:
    docs = helm.render({})
    (deployment,) = _kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    container = _operator(docs)
    assert container["image"] == "localhost/pqfed/operator:0.1.0"  # tag = appVersion
    assert container["command"] == ["pqfed", "operator", "run"]
    assert container["args"] == ["--all-namespaces", "--standalone", "--metrics-port=8080",
                                 "--log-level=info"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert not _kind(docs, "ClusterKopfPeering") and not _kind(docs, "KopfPeering")
    assert not _kind(docs, "ServiceMonitor")
    (service,) = _kind(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == 8080
    assert "hostNetwork" not in deployment["spec"]["template"]["spec"]


def test_replicas_use_kopf_peering(helm: Helm) -> None:
    docs = helm.render({"operator": {"replicas": 3}})
    (deployment,) = _kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    args = _operator(docs)["args"]
    assert "--standalone" not in args
    (peering,) = _kind(docs, "ClusterKopfPeering")
    assert f"--peering={peering['metadata']['name']}" in args
    env = {e["name"]: e for e in _operator(docs)["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_watch_namespaces_are_passed_and_peered_per_namespace(helm: Helm) -> None:
    docs = helm.render(SCENARIOS["replicas2-namespaced"])
    args = _operator(docs)["args"]
    assert args[:2] == ["--namespace=hospital-a", "--namespace=hospital-b"]
    assert "--all-namespaces" not in args
    peerings = _kind(docs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["hospital-a", "hospital-b"]
    assert not _kind(docs, "ClusterRole") and not _kind(docs, "ClusterKopfPeering")


def test_optional_features(helm: Helm) -> None:
    docs = helm.render(SCENARIOS["everything-on"])
    (monitor,) = _kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    pod = _kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "arm64"}
    env = {e["name"]: e.get("value") for e in _operator(docs)["env"]}
    assert json.loads(env["PQFED_JOB_DEFAULTS"]) == {"kem": "ML-KEM-1024"}
    assert env["A"] == "b"
    assert "PQFED_JOB_DEFAULTS" not in {e["name"] for e in _operator(helm.render({}))["env"]}


def test_helm_test_pod_checks_the_crd(helm: Helm) -> None:
    (pod,) = _kind(helm.render({}), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["pqfed", "operator", "check"]


# --- CRDs shipped in crds/ ------------------------------------------------------------------

def test_crds_directory() -> None:
    crds = {}
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for doc in _docs(path.read_text()):
            crds[doc["metadata"]["name"]] = doc
    assert set(crds) == {"federationjobs.pqfed.io", "clusterkopfpeerings.kopf.dev",
                         "kopfpeerings.kopf.dev"}
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"


def test_chart_metadata() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == "0.1.0"
    assert meta["kubeVersion"].startswith(">=1.29")  # native sidecar containers
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # What `make images` builds (images/build.py) and docs/helm.md imports: no registry needed.
    assert values["image"]["repository"] == "localhost/pqfed/operator"
    assert values["image"]["tag"] == ""
    assert values["operator"]["replicas"] == 1
    assert values["metrics"] == {"enabled": True, "port": 8080}
    assert values["serviceMonitor"]["enabled"] is False
    assert values["watchNamespaces"] == []
    assert values["operator"]["hostNetwork"] is False
