"""One table of invalid FederationJobs (tests/data/invalid_jobs.yaml), refused by both `pqfed run`
and the real kube-apiserver with the chart's CRD, each naming the same field, so the two cannot
drift again. And valid jobs both must read alike (nulls where the API server applies a default,
YAML 1.1 booleans, whole floats): both end up with the same effective spec.

The API-server half starts a private control plane (testbed/cluster/up.sh on free ports in a
tmp dir, no nodes) and posts every manifest as written (YAML, strict field validation), so the
server sees duplicate keys, `.inf` and trailing newlines exactly as `pqfed run` does.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pqfed.cli import main
from pqfed.services.spec import JobSpecError, load_job, parse_spec

REPO = Path(__file__).resolve().parents[2]
TABLE: list[dict[str, Any]] = yaml.safe_load(
    (REPO / "tests" / "data" / "invalid_jobs.yaml").read_text())
CHART_CRD = REPO / "charts" / "pqfed" / "crds" / "federationjobs.pqfed.io.yaml"
SCRIPTS = REPO / "testbed" / "cluster"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")

# Valid jobs both must read alike. Nulls: the API server prunes null from a field that is not
# nullable and applies the default; null in an optional field means "not set". YAML: the API
# server reads YAML 1.1 (`y` is true) and turns it into JSON, where 3.0 is written 3.
AGREE: dict[str, tuple[str, dict[str, Any]]] = {
    "rounds-null": ("rounds: null", {}),
    "dataset-null": ("dataset: null, training: {batchSize: null}", {}),
    "optional-null": ("clientsPerRound: null, privacy: {targetEpsilon: null}", {}),
    "placement-null": ("placement: {nodeSelector: null}", {}),
    "rounds-whole-float": ("rounds: 4.0, training: {learningRate: 1}",
                           {"rounds": 4, "training": {"learningRate": 1.0}}),
    "yaml-1-1-booleans": ("privacy: {enabled: y}, hierarchy: {enabled: N}",
                          {"privacy": {"enabled": True}}),
}


def manifest(case: dict[str, Any]) -> str:
    if "manifest" in case:
        return str(case["manifest"])
    return ("apiVersion: pqfed.io/v1alpha1\nkind: FederationJob\n"
            f"metadata: {{name: {case['name']}}}\nspec: {{{case['spec']}}}\n")


def _names(problems: dict[str, str], field: str) -> bool:
    """A refusal names `field` when a problem is reported at it or inside it (a map key)."""
    return any(k == field or k.startswith((f"{field}.", f"{field}[")) for k in problems)


def test_the_table_covers_every_class_of_bad_input() -> None:
    assert len(TABLE) >= 80
    names = [c["name"] for c in TABLE]
    assert len(names) == len(set(names))
    for case in TABLE:
        assert set(case) <= {"name", "field", "rule", "spec", "manifest", "server"}, case
        assert ("spec" in case) != ("manifest" in case), case["name"]
        assert len(case["name"]) <= 52
    fields = {c["field"] for c in TABLE}
    for field in ("spec", "metadata.name", "spec.image", "spec.placement.nodeSelector",
                  "spec.secureAggregation.reconstructionThreshold", "spec.privacy.targetEpsilon",
                  "spec.privacy.noiseMultiplier", "spec.timeouts.roundSeconds"):
        assert field in fields


# ---- pqfed run ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", TABLE, ids=lambda c: c["name"])
def test_pqfed_run_refuses_naming_the_field(case: dict[str, Any], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(manifest(case))
    with pytest.raises(JobSpecError) as exc:
        load_job(job)
    problems = exc.value.problems
    assert _names(problems, case["field"]), problems
    assert all(msg.strip() for msg in problems.values())
    # The command refuses before anything starts, printing the field path.
    assert main(["run", str(job), "--out", str(tmp_path / "runs")]) == 2
    assert f"- {case['field']}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_refusals_say_how_to_fix(tmp_path: Path) -> None:
    hints = {
        "batch-size-string": "without quotes", "privacy-enabled-string": "true or false",
        "noise-infinite": "finite", "snake-case-field": "camelCase",
        "duplicate-top-level-key": "keep one", "name-trailing-newline": "at most 52",
        "node-selector-key-double-dot": "DNS subdomain", "image-uppercase-repository":
        "lowercase", "epsilon-without-privacy": "privacy.enabled: true",
        "secagg-threshold-equals-shares": "lower reconstructionThreshold",
        "seed-2p64": "less than or equal to", "spec-list": "mapping",
    }
    by_name = {c["name"]: c for c in TABLE}
    for name, hint in hints.items():
        job = tmp_path / f"{name}.yaml"
        job.write_text(manifest(by_name[name]))
        with pytest.raises(JobSpecError) as exc:
            load_job(job)
        assert hint in str(exc.value), (name, str(exc.value))


@pytest.mark.parametrize("name", AGREE)
def test_pqfed_run_reads_nulls_and_yaml_as_the_api_server(name: str, tmp_path: Path) -> None:
    text, effective = AGREE[name]
    job = tmp_path / "job.yaml"
    job.write_text(manifest({"name": name, "spec": text}))
    assert load_job(job).spec == parse_spec(effective)


# ---- the API server -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private control plane with the chart's CRD; yields a kubernetes ApiClient."""
    kubernetes = pytest.importorskip(
        "kubernetes", reason="the kubernetes client is not installed (pip install -e '.[k8s]')")
    from pqfed.testbed.testing import cluster_env, wait_for

    check = subprocess.run(["bash", str(SCRIPTS / "build.sh"), "--check", *COMPONENTS],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        pytest.skip("Kubernetes control-plane binaries are not built; run make "
                    f"cluster-binaries:\n{check.stdout.strip()}")
    cluster_dir = tmp_path_factory.mktemp("apiserver")
    env = cluster_env(cluster_dir, [])
    try:
        up = subprocess.run(["bash", str(SCRIPTS / "up.sh")], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
        assert up.returncode == 0, f"up.sh failed ({up.returncode}):\n{up.stderr}"
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(cluster_dir / "kubeconfig"),
                                           client_configuration=config)
        api_client = kubernetes.client.ApiClient(config)
        ext = kubernetes.client.ApiextensionsV1Api(api_client)
        ext.create_custom_resource_definition(yaml.safe_load(CHART_CRD.read_text()))

        def established() -> bool:
            crd = ext.read_custom_resource_definition("federationjobs.pqfed.io")
            return any(c.type == "Established" and c.status == "True"
                       for c in crd.status.conditions or [])

        wait_for(established, 60, "the FederationJob CRD to be established")
        wait_for(lambda: _try_list(api_client), 60, "federationjobs to be served")
        yield api_client
    finally:
        subprocess.run(["bash", str(SCRIPTS / "down.sh")], env=env, capture_output=True,
                       text=True, timeout=120, check=False)


_JOBS = "/apis/pqfed.io/v1alpha1/namespaces/default/federationjobs"


def _request(api_client: Any, method: str, path: str, *, body: str | None = None,
             query: list[tuple[str, str]] | None = None) -> tuple[int, dict[str, Any]]:
    """One raw request (the generated API classes cannot send a YAML body) -> (status, JSON)."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/yaml"
    _, url, headers, body, _ = api_client.param_serialize(
        method, path, query_params=query or [], header_params=headers, body=body)
    resp = api_client.call_api(method, url, header_params=headers, body=body)
    resp.read()
    return int(resp.status), json.loads(resp.data or b"{}")


def _try_list(api_client: Any) -> bool:
    return _request(api_client, "GET", _JOBS)[0] == 200


def _post(api_client: Any, text: str) -> tuple[int, dict[str, Any]]:
    """POSTs a manifest as written (YAML) with strict field validation -> (status, body)."""
    return _request(api_client, "POST", _JOBS, body=text,
                    query=[("fieldValidation", "Strict")])


def _delete(api_client: Any, name: str) -> None:
    _request(api_client, "DELETE", f"{_JOBS}/{name}")


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize("case", TABLE, ids=lambda c: c["name"])
def test_api_server_refuses_naming_the_field(case: dict[str, Any], api: Any) -> None:
    status, body = _post(api, manifest(case))
    if status < 300:
        _delete(api, body["metadata"]["name"])
        pytest.fail(f"the API server accepted invalid job {case['name']}")
    message = str(body.get("message", ""))
    assert status in (400, 422), message
    assert case.get("server", case["field"]) in message, message


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize("name", AGREE)
def test_api_server_and_runner_read_valid_jobs_alike(name: str, api: Any,
                                                     tmp_path: Path) -> None:
    text = manifest({"name": name, "spec": AGREE[name][0]})
    status, body = _post(api, text)
    assert status == 201, body
    _delete(api, name)
    job = tmp_path / "job.yaml"
    job.write_text(text)
    assert parse_spec(body["spec"]) == load_job(job).spec
