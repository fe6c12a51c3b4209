"""Time from `helm install` to a Succeeded FederationJob on the real node, step by step
(docs/BENCHMARKS.md). A measurement, not a test: it runs only when asked, and asserts
nothing about the times.

    PQFED_TIME_INSTALL=5 .venv/bin/python -m pytest -q -s tests/testbed/test_real_node_timing.py

Each run, on the session's real-node cluster with the built images already imported:
`helm install --wait` with the chart's defaults (until the operator's Deployment is Ready),
a breast-cancer job (2 clients, 2 rounds) created until its aggregator and clients are all
Running, then until Succeeded; then the job is deleted and the release uninstalled. Prints a
table (median, min, max per step) and writes every run to results/real-node-install.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pqfed.testbed.testing import job_leftovers, wait_for

RUNS = int(os.environ.get("PQFED_TIME_INSTALL", "0") or 0)
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.real_node, pytest.mark.images,
              pytest.mark.skipif(RUNS < 1, reason="a measurement: PQFED_TIME_INSTALL=N runs it")]

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "testbed" / "cluster"
JOB = {"task": "breast-cancer", "clients": 2, "minClients": 2, "rounds": 2}
STEPS = ("helm install -> operator Ready", "job created -> pods Running",
         "pods Running -> Succeeded", "helm install -> Succeeded")


def _import_images(cluster: dict[str, str]) -> None:
    present = subprocess.run(["bash", str(SCRIPTS / "node.sh"), "ctr", "images", "ls", "-q"],
                             env=cluster, capture_output=True, text=True, check=True).stdout
    for name in ("operator", "sidecar", "fl"):
        archive = REPO / "dist" / "images" / f"pqfed-{name}-0.1.0.oci.tar"
        if not archive.is_file():
            pytest.skip(f"{archive} is not built: run `make images`")
        if f"localhost/pqfed/{name}:0.1.0" not in present:
            subprocess.run(["bash", str(SCRIPTS / "node.sh"), "import", str(archive)],
                           env=cluster, check=True, capture_output=True, timeout=900)


def _one_run(helm: list[str], env: dict[str, str], api: Any, ns: str) -> dict[str, float]:
    from kubernetes import client

    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    networking = client.NetworkingV1Api(api)
    t0 = time.monotonic()
    subprocess.run([*helm, "install", "pqfed", str(REPO / "charts" / "pqfed"), "-n",
                    "pqfed-system", "--create-namespace", "--wait", "--timeout", "300s"],
                   env=env, check=True, capture_output=True, timeout=360)
    t_ready = time.monotonic()
    custom.create_namespaced_custom_object(
        "pqfed.io", "v1alpha1", ns, "federationjobs",
        {"apiVersion": "pqfed.io/v1alpha1", "kind": "FederationJob",
         "metadata": {"name": "timed"}, "spec": JOB})
    t_job = time.monotonic()

    def all_running() -> bool:
        pods = core.list_namespaced_pod(ns, label_selector="pqfed.io/job=timed").items
        roles = [p.metadata.labels.get("pqfed.io/role") for p in pods
                 if p.status.phase == "Running"]
        return roles.count("aggregator") == 1 and roles.count("client") == JOB["clients"]

    wait_for(all_running, 600, "the aggregator and clients Running", 0.2)
    t_running = time.monotonic()

    def phase() -> str | None:
        st = custom.get_namespaced_custom_object("pqfed.io", "v1alpha1", ns, "federationjobs",
                                                 "timed").get("status") or {}
        return st.get("phase") if st.get("phase") in ("Succeeded", "Failed") else None

    assert wait_for(phase, 900, "the job to finish", 0.2) == "Succeeded"
    t_done = time.monotonic()
    custom.delete_namespaced_custom_object("pqfed.io", "v1alpha1", ns, "federationjobs",
                                           "timed")
    wait_for(lambda: not job_leftovers(core, networking, custom, ns), 180, "the job gone")
    subprocess.run([*helm, "uninstall", "pqfed", "-n", "pqfed-system", "--wait",
                    "--timeout", "180s"], env=env, check=True, capture_output=True,
                   timeout=240)
    return dict(zip(STEPS, (t_ready - t0, t_running - t_job, t_done - t_running,
                            t_done - t0), strict=True))


def test_time_from_helm_install_to_succeeded(real_cluster: dict[str, str], real_api: Any,
                                             tmp_path: Path) -> None:
    from kubernetes import client

    helm_bin = Path(os.environ.get("PQFED_CACHE", Path.home() / ".cache" / "pqfed")) / "bin"
    if not (helm_bin / "helm").is_file():
        pytest.skip("no helm binary: run `make cluster-binaries`")
    _import_images(real_cluster)
    env = {**real_cluster, "HOME": str(tmp_path)}
    helm = [str(helm_bin / "helm"), "--kubeconfig", real_cluster["KUBECONFIG"]]
    ns = "timing"
    core = client.CoreV1Api(real_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    wait_for(lambda: core.list_namespaced_service_account(
        ns, field_selector="metadata.name=default").items, 60, "service account default")
    runs = [_one_run(helm, env, real_api, ns) for _ in range(RUNS)]
    out = REPO / "results" / "real-node-install.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"job": JOB, "runs": runs}, indent=1))
    print(f"\n{RUNS} runs (s)         median    min    max")
    for step in STEPS:
        values = [r[step] for r in runs]
        print(f"{step:32} {statistics.median(values):6.1f} {min(values):6.1f} "
              f"{max(values):6.1f}")
    core.delete_namespace(ns)
