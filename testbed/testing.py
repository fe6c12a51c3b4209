"""Helpers for tests that run against the local control plane and emulated Pi nodes
(shared by tests/testbed and tests/e2e, like kopf.testing for operators)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pqfed.services import API_GROUP, API_VERSION, JOB_LABEL, PLURAL, ROLE_LABEL


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


def real_node_run_id() -> str:
    """This test process's suffix for the real node's names (node, bridges, probe images):
    the same in every module of one pytest run, distinct between concurrent runs."""
    return f"{os.getpid() & 0xFFFF:04x}"


def busybox_image_archive(path: Path, name: str) -> Path:
    """A one-binary image of busybox under `name`, written by the project's OCI writer
    (testbed/ociimage.py)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    subprocess.run([sys.executable, str(Path(__file__).with_name("ociimage.py")), "--name", name,
                    "--out", str(path), "--file", f"{busybox}:/bin/busybox:0755",
                    "--symlink", "/bin/sh:busybox", "--entrypoint", '["/bin/sh"]'],
                   check=True, capture_output=True)
    return path


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
    from pqfed.services import free_ports
    from pqfed.testbed.leftovers import claim

    claim(cluster_dir)  # a later run removes it if this one is killed (testbed/leftovers.py)
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


# ---- FederationJobs on a cluster (shared by the emulated e2e tests and the real node's) ----
# The operator's naming lives in pqfed.operator.pods; it is imported where used, so this
# module stays importable without the operator's dependencies.


def job_leftovers(core: Any, networking: Any, custom: Any, namespace: str) -> list[str]:
    """Everything a FederationJob created in `namespace` (pods, secrets, configmaps,
    services, networkpolicies carrying the `pqfed.io/job` label) and every FederationJob
    still there, as `kind/name`: empty once deleting the jobs removed every child."""
    found = [f"pod/{o.metadata.name}" for o in core.list_namespaced_pod(
        namespace, label_selector=JOB_LABEL).items]
    found += [f"secret/{o.metadata.name}" for o in core.list_namespaced_secret(
        namespace, label_selector=JOB_LABEL).items]
    found += [f"configmap/{o.metadata.name}" for o in core.list_namespaced_config_map(
        namespace, label_selector=JOB_LABEL).items]
    found += [f"service/{o.metadata.name}" for o in core.list_namespaced_service(
        namespace, label_selector=JOB_LABEL).items]
    found += [f"networkpolicy/{o.metadata.name}" for o in
              networking.list_namespaced_network_policy(namespace,
                                                        label_selector=JOB_LABEL).items]
    found += [f"federationjob/{j['metadata']['name']}" for j in
              custom.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace,
                                                   PLURAL)["items"]]
    return found


def aggregator_endpoint(core: Any, namespace: str, job: str, pod_ip: str) -> Any:
    """The aggregator as the operator reaches it: its sidecar, with the job's operator
    identity (the only way in: the status API listens on the pod's loopback)."""
    import base64

    from pqfed.operator import pods as m
    from pqfed.operator.aggregator_api import AggregatorEndpoint
    from pqfed.pqc import Certificate, Identity, TrustAnchor

    sec = core.read_namespaced_secret(m.identity_secret_name(job, m.OPERATOR_NODE_ID),
                                      namespace)
    data = {k: base64.b64decode(v).decode() for k, v in sec.data.items()}
    return AggregatorEndpoint(pod_ip, m.PQC_PORT,
                              Identity.load(data["tls.crt"], data["tls.key"]),
                              TrustAnchor(Certificate.from_pem(data["ca.crt"])))


def aggregator_round(core: Any, namespace: str, job: str, uid: str | None = None) -> int:
    """Completed rounds, straight from the running aggregator's status API through its
    sidecar (faster than the job status, which the operator refreshes every few seconds);
    0 while none answers. `uid` restricts it to one aggregator pod."""
    from pqfed.operator.aggregator_api import AggregatorUnreachable, fetch_status

    pods = core.list_namespaced_pod(
        namespace, label_selector=f"{JOB_LABEL}={job},{ROLE_LABEL}=aggregator").items
    for pod in pods:
        if uid is not None and pod.metadata.uid != uid:
            continue
        if pod.status.pod_ip and pod.status.phase == "Running":
            try:
                endpoint = aggregator_endpoint(core, namespace, job, pod.status.pod_ip)
                return int(fetch_status(endpoint, job).get("currentRound") or 0)
            except AggregatorUnreachable:
                return 0
    return 0


def stored_checkpoint(api: Any, core: Any, namespace: str, job: str) -> dict[str, Any] | None:
    """The job's checkpoint Secret (as a dict) once it holds a usable round, else None."""
    from pqfed.operator import pods as m

    name = m.checkpoint_secret_name(job)
    found = core.list_namespaced_secret(namespace,
                                        field_selector=f"metadata.name={name}").items
    secret: dict[str, Any] | None = (api.sanitize_for_serialization(found[0])
                                     if found else None)
    return secret if m.checkpoint_round(secret) else None


def checkpointed_rounds(secret: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The per-round records of the status stored with a checkpoint, by round."""
    import base64
    import json

    from pqfed.services import STATUS_FILE

    status = json.loads(base64.b64decode(secret["data"][STATUS_FILE]))
    return {int(r["round"]): r for r in status["rounds"]}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = next((c for c in status.get("conditions") or [] if c["type"] == type_), None)
    assert found is not None, f"no {type_} condition in {status.get('conditions')}"
    return dict(found)


def assert_every_round_once(status: dict[str, Any], rounds: int) -> None:
    """The job trained rounds 1..rounds, each counted once (no round trained twice after a
    restart, none skipped)."""
    assert [r["round"] for r in status["rounds"]] == list(range(1, rounds + 1)), status["rounds"]
    assert status["currentRound"] == status["totalRounds"] == rounds


def assert_resumed_from_checkpoint(status: dict[str, Any],
                                   before: dict[int, dict[str, Any]], kept: int) -> None:
    """A lost aggregator was recreated from the stored checkpoint: rounds 1..kept are the
    stored ones (same completion times: restored, not trained again) and the job's
    PodsRecreated condition says from which round it resumed."""
    assert kept >= 1 and sorted(before) == list(range(1, kept + 1)), sorted(before)
    for rnd in range(1, kept + 1):
        assert status["rounds"][rnd - 1]["completedAt"] == before[rnd]["completedAt"], rnd
    recreated = condition(status, "PodsRecreated")["message"]
    assert "aggregator" in recreated and "resumes from checkpoint round" in recreated, recreated
