"""FederationJobs end to end on an emulated Raspberry Pi cluster (see conftest.py): the
operator (installed by the Helm chart, running as a pod) turns a FederationJob into PQC-secured
Flower pods that train breast-cancer models; lost clients, a restarted operator and a lost
aggregator are survived; deleting a job removes everything it created."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

from pqfed.operator import pods as m
from pqfed.pqc.identity import Certificate
from pqfed.services import node_defaults
from pqfed.testbed.testing import (
    aggregator_round,
    assert_every_round_once,
    assert_resumed_from_checkpoint,
    checkpointed_rounds,
    condition,
    job_leftovers,
    stored_checkpoint,
)

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SPEC: dict[str, Any] = {"task": "breast-cancer", "clients": 3, "minClients": 2, "rounds": 3}
TERMINAL = ("Succeeded", "Failed", "Cancelled")


def _plain_http_refused(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=3).close()
    except OSError:
        return True
    return False


def _uids(bed: Any, job: str) -> dict[str, str]:
    items = bed.core.list_namespaced_secret(bed.namespace,
                                            label_selector=f"pqfed.io/job={job}").items
    return {s.metadata.name: s.metadata.uid for s in items}


def _events(bed: Any, job: str) -> list[Any]:
    return [e for e in bed.core.list_namespaced_event(bed.namespace).items
            if e.involved_object.kind == "FederationJob" and e.involved_object.name == job]


def _metrics(pod: Any) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{pod.status.pod_ip}:8080/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def test_job_survives_a_lost_client_and_an_operator_restart(testbed: Any) -> None:
    bed = testbed
    name = bed.unique_name("bc")
    t0 = time.monotonic()
    bed.create_job(name, SPEC)
    bed.wait_phase(name, ("Running", *TERMINAL), 60)
    job = bed.job(name)
    assert "pqfed.io/cleanup" in job["metadata"]["finalizers"]
    secrets = _uids(bed, name)
    assert set(secrets) == {f"{name}-ca", f"{name}-crl", f"{name}-aggregator-identity",
                            f"{name}-operator-identity",
                            *(f"{name}-client-{i}-identity" for i in range(3))}
    (agg,) = bed.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator")

    at = bed.wait_for(lambda: aggregator_round(bed.core, bed.namespace, name), 240,
                      "round 1 to complete", 0.3, lambda: bed.diagnose(name))
    bed.timings["bc: first round"] = time.monotonic() - t0
    assert at < SPEC["rounds"], "the job finished before it could be disrupted"
    # A client crashes (no grace: its SuperNode cannot say goodbye) and, at the same time,
    # the operator pod goes away; the Deployment brings a new one.
    old_operator = bed.ready_operator()
    # The operator's Pi is cordoned (as for maintenance), so its replacement starts on another
    # one. (It also keeps clear of the node agent's token cache, which hands a new pod of the
    # same ServiceAccount the deleted pod's bound token: 401; see the operator report.)
    node = old_operator.spec.node_name
    bed.core.patch_node(node, {"spec": {"unschedulable": True}})
    try:
        bed.core.delete_namespaced_pod(f"{name}-client-1", bed.namespace,
                                       grace_period_seconds=0)
        bed.core.delete_namespaced_pod(old_operator.metadata.name, bed.operator_namespace)
        new_operator = bed.wait_for(lambda: bed.ready_operator({old_operator.metadata.name}),
                                    120, "a new operator pod Ready", 1.0, bed.operator_log)
    finally:
        bed.core.patch_node(node, {"spec": {"unschedulable": False}})
    assert new_operator.spec.node_name != node

    st = bed.wait_phase(name, TERMINAL, 420)
    bed.timings["bc: succeeded"] = time.monotonic() - t0
    assert st["phase"] == "Succeeded", bed.diagnose(name)
    assert_every_round_once(st, 3)
    assert st["accuracy"] > 0.9
    assert all(r["bytesReceived"] > 0 and r["participants"] for r in st["rounds"])
    assert st["auditHead"] and st["completionTime"] and st["startTime"]
    assert st["observedGeneration"] == job["metadata"]["generation"]
    assert "client-1" in condition(st, "PodsRecreated")["message"]
    assert "aggregator" not in condition(st, "PodsRecreated")["message"]
    assert condition(st, "Complete")["reason"] == "Succeeded"
    assert condition(st, "Checkpointed")["status"] == "True"
    # Nothing duplicated by the second operator: same CA and identities, one aggregator.
    identities = {k: v for k, v in _uids(bed, name).items()
                  if k != m.checkpoint_secret_name(name)}
    assert identities == secrets
    aggregators = bed.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator")
    assert [p.metadata.uid for p in aggregators] == [agg.metadata.uid]
    reasons = [e.reason for e in _events(bed, name)]
    # The PodsRecreated condition (asserted above) is the durable record; the matching
    # ClientRecreated Event is best-effort (kopf posts events from a queue, and the operator
    # that noticed the loss may be the one killed before the queue drained).
    assert "Succeeded" in reasons
    assert reasons.count("Started") == 1
    assert "pqfed_operator_reconciles_total" in _metrics(new_operator)
    # Clients stop with the job; the aggregator pod stays (for `pqfed logs`) and completes.
    bed.wait_for(lambda: not bed.pods(f"pqfed.io/job={name},pqfed.io/role=client"), 60,
             "client pods deleted after success")
    final = bed.wait_for(lambda: [p for p in bed.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator")
                              if p.status.phase == "Succeeded"], 90, "the aggregator pod to end")
    assert final[0].metadata.uid == agg.metadata.uid


def test_lost_aggregator_resumes_from_the_stored_checkpoint(testbed: Any) -> None:
    bed = testbed
    name = bed.unique_name("resume")
    rounds = 6
    t0 = time.monotonic()
    bed.create_job(name, {**SPEC, "rounds": rounds})
    cm = bed.wait_for(lambda: stored_checkpoint(bed.api, bed.core, bed.namespace, name), 240,
                      "a checkpoint in the Secret", 0.5, lambda: bed.diagnose(name))
    kept = m.checkpoint_round(cm)
    # The model is never in a ConfigMap, and never served in plain HTTP on the pod network.
    assert not bed.core.list_namespaced_config_map(
        bed.namespace, field_selector=f"metadata.name={m.checkpoint_secret_name(name)}").items
    (agg_pod,) = bed.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator")
    assert _plain_http_refused(agg_pod.status.pod_ip, node_defaults.STATUS_PORT)
    service = bed.core.read_namespaced_service(m.aggregator_service_name(name), bed.namespace)
    assert [p.port for p in service.spec.ports] == [m.PQC_PORT]
    policy = bed.api.sanitize_for_serialization(
        bed.networking.read_namespaced_network_policy(m.network_policy_name(name),
                                                      bed.namespace))
    assert policy["spec"]["ingress"] == [{"ports": [{"port": m.PQC_PORT, "protocol": "TCP"}]}]
    # What the operator stored is what a new aggregator resumes from.
    before = checkpointed_rounds(cm)
    assert sorted(before) == list(range(1, kept + 1))
    assert kept < rounds, "the job finished before it could be disrupted"
    bed.core.delete_namespaced_pod(m.aggregator_pod_name(name), bed.namespace)

    st = bed.wait_phase(name, TERMINAL, 420)
    bed.timings["resume: succeeded"] = time.monotonic() - t0
    assert st["phase"] == "Succeeded", bed.diagnose(name)
    assert_every_round_once(st, rounds)
    assert_resumed_from_checkpoint(st, before, kept)  # restored, not trained again
    (agg,) = bed.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator")
    assert agg.spec.containers[0].command[-2:] == ["--restore", m.RESTORE_DIR]
    assert st["accuracy"] > 0.9


def test_deleting_jobs_removes_every_child(testbed: Any) -> None:
    bed = testbed
    name = bed.unique_name("gone")
    bed.create_job(name, {**SPEC, "clients": 2, "rounds": 50})
    bed.wait_for(lambda: len([p for p in bed.pods(f"pqfed.io/job={name}")
                          if p.status.phase == "Running"]) == 3, 120, "the job's pods running")
    t0 = time.monotonic()
    jobs = bed.custom.list_namespaced_custom_object("pqfed.io", "v1alpha1", bed.namespace,
                                                    "federationjobs")["items"]
    for job in jobs:
        bed.delete_job(job["metadata"]["name"])

    def leftovers() -> list[str]:
        return job_leftovers(bed.core, bed.networking, bed.custom, bed.namespace)

    bed.wait_for(lambda: not leftovers(), 90, "every child and job to be gone", 1.0,
             lambda: f"left: {leftovers()}\n{bed.operator_log()}")
    bed.timings["delete: all gone"] = time.monotonic() - t0


def test_hierarchical_job_trains_through_edge_aggregator_pods(testbed: Any) -> None:
    """Clients -> 2 edge aggregator pods -> aggregator, every hop over a PQC channel."""
    bed = testbed
    name = bed.unique_name("edge")
    t0 = time.monotonic()
    bed.create_job(name, {**SPEC, "clients": 4, "rounds": 2,
                          "hierarchy": {"enabled": True, "edges": 2}})
    st = bed.wait_phase(name, TERMINAL, 420)
    bed.timings["edge: succeeded"] = time.monotonic() - t0
    assert st["phase"] == "Succeeded", bed.diagnose(name)
    assert [r["round"] for r in st["rounds"]] == [1, 2]
    for r in st["rounds"]:  # the aggregator heard only from the edges
        assert sorted(r["participants"]) == ["edge-0", "edge-1"]
    assert st["accuracy"] > 0.85
    secrets = _uids(bed, name)
    assert {f"{name}-edge-0-identity", f"{name}-edge-1-identity"} <= set(secrets)
    # Edges stop with the job, like clients.
    bed.wait_for(lambda: not bed.pods(f"pqfed.io/job={name},pqfed.io/role in (edge,client)"),
                 60, "edge and client pods deleted after success")


_ADMIN_GET = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=5) as resp:
    sys.stdout.write(resp.read().decode())
"""


def _sidecar_admin(pod: Any, path: str) -> str | None:
    """GET `path` from a pod's sidecar admin API, which listens on the pod's loopback only:
    from inside the pod's network namespace (the emulated node names it
    pqfed-<node>-<uid[:8]>, testbed/nodeagent/pod.py)."""
    netns = f"pqfed-{pod.spec.node_name}-{pod.metadata.uid[:8]}"
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _ADMIN_GET,
                           f"http://127.0.0.1:{m.ADMIN_PORT}{path}"],
                          capture_output=True, text=True, timeout=30, check=False)
    return proc.stdout if proc.returncode == 0 else None


def _sidecar_crl_number(pod: Any) -> float | None:
    """The revocation list number a pod's sidecar has in force (its admin /metrics)."""
    text = _sidecar_admin(pod, "/metrics") or ""
    for line in text.splitlines():
        if line.startswith("pqfed_revocation_list_number "):
            return float(line.split()[1])
    return None


def test_revoked_client_is_cut_off_and_the_job_goes_on(testbed: Any) -> None:
    """`pqfed revoke` mid-job: the operator signs a new list with the job's CA, the kubelet
    swaps it into every pod, the aggregator's sidecar loads it (and would cut the client);
    the client's pod is not recreated and the job completes with the two others."""
    from pqfed.operator.reconcile import REVOKE_PREFIX
    from pqfed.pqc.revocation import RevocationList

    bed = testbed
    name = bed.unique_name("rv")
    spec = {**SPEC, "rounds": 8}  # enough to outlast the kubelet volume resync (30-90 s)
    bed.create_job(name, spec)
    bed.wait_phase(name, ("Running", *TERMINAL), 60)
    bed.wait_for(lambda: aggregator_round(bed.core, bed.namespace, name), 240, "round 1 to complete", 0.3,
                 lambda: bed.diagnose(name))
    (agg,) = bed.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator")
    first = _sidecar_crl_number(agg)
    assert first is not None and first > 0  # the list issued at start is in force
    cert = Certificate.from_pem(base64.b64decode(bed.core.read_namespaced_secret(
        m.identity_secret_name(name, "client-1"), bed.namespace).data["tls.crt"]).decode())
    # What `pqfed revoke --job NAME --node client-1 --reason key-compromise` patches.
    bed.custom.patch_namespaced_custom_object(
        "pqfed.io", "v1alpha1", bed.namespace, "federationjobs", name,
        {"metadata": {"annotations": {f"{REVOKE_PREFIX}client-1": "key-compromise"}}})

    def published() -> RevocationList | None:
        sec = bed.core.read_namespaced_secret(m.crl_secret_name(name), bed.namespace)
        crl = RevocationList.from_pem(base64.b64decode(sec.data["crl.pem"]).decode())
        return crl if crl.lookup(cert.serial) is not None else None

    crl = bed.wait_for(published, 60, "the operator to publish the list", 1.0,
                       bed.operator_log)
    assert crl.number > first
    bed.wait_for(lambda: _sidecar_crl_number(agg) == crl.number, 120,
                 "the aggregator's sidecar to load the new list", 2.0,
                 lambda: bed.diagnose(name))
    st = bed.wait_phase(name, TERMINAL, 420)
    assert st["phase"] == "Succeeded", bed.diagnose(name)
    assert "client-1 (key-compromise)" in condition(st, "NodesRevoked")["message"]
    recreated = [c for c in st["conditions"] if c["type"] == "PodsRecreated"]
    assert not recreated or "client-1" not in recreated[0]["message"]
    assert not [p for p in bed.pods(f"pqfed.io/job={name},pqfed.io/role=client")
                if p.metadata.name == f"{name}-client-1"]
    last = st["rounds"][-1]
    assert len(last["participants"]) == 2  # the two clients left
    assert "NodeRevoked" in [e.reason for e in _events(bed, name)]


def _sidecar_serial(pod: Any) -> int | None:
    """The serial of the certificate a pod's sidecar presents now (its admin /identity)."""
    try:
        return int(json.loads(_sidecar_admin(pod, "/identity") or "")["serial"])
    except (ValueError, KeyError, TypeError):
        return None


def test_short_lived_certificates_are_renewed_and_hot_reloaded(testbed: Any) -> None:
    """certificateLifetimeSeconds 300: at 2/3 (200 s) the operator renews every identity in
    its Secret; the aggregator's sidecar switches to the new certificate without a restart,
    and rounds go on."""
    from pqfed.operator.reconcile import CANCEL_ANNOTATION

    bed = testbed
    name = bed.unique_name("rn")
    bed.create_job(name, {**SPEC, "rounds": 200, "crypto": {"certificateLifetimeSeconds": 300}})
    bed.wait_phase(name, ("Running", *TERMINAL), 60)
    bed.wait_for(lambda: aggregator_round(bed.core, bed.namespace, name), 240, "round 1 to complete", 0.3,
                 lambda: bed.diagnose(name))
    (agg,) = bed.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator")
    first = _sidecar_serial(agg)
    secret_name = m.identity_secret_name(name, m.AGGREGATOR_NODE_ID)

    def renewed() -> Certificate | None:
        data = bed.core.read_namespaced_secret(secret_name, bed.namespace).data
        cert = Certificate.from_pem(base64.b64decode(data["tls.crt"]).decode())
        return cert if cert.serial != first and "previous.crt" in data else None

    cert = bed.wait_for(renewed, 330, "the operator to renew the aggregator", 5.0,
                        lambda: bed.diagnose(name))
    assert cert.not_after - cert.not_before == 300 + 300  # lifetime + backdated not_before
    bed.wait_for(lambda: _sidecar_serial(agg) == cert.serial, 120,
                 "the aggregator's sidecar to load the renewed identity", 2.0,
                 lambda: bed.diagnose(name))
    (same,) = bed.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator")
    assert same.metadata.uid == agg.metadata.uid  # hot reload, no restart
    at = aggregator_round(bed.core, bed.namespace, name)
    bed.wait_for(lambda: aggregator_round(bed.core, bed.namespace, name) > at, 240,
                 "a round after the renewal", 1.0, lambda: bed.diagnose(name))
    assert "CertificateRenewed" in [e.reason for e in _events(bed, name)]
    bed.custom.patch_namespaced_custom_object(
        "pqfed.io", "v1alpha1", bed.namespace, "federationjobs", name,
        {"metadata": {"annotations": {CANCEL_ANNOTATION: "true"}}})
    assert bed.wait_phase(name, TERMINAL, 120)["phase"] == "Cancelled"
