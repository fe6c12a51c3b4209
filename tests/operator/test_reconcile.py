"""The operator's pure logic: desired children of a spec, idempotent plans, status merging,
invalid specs, checkpoints/restore, lost pods, cancel. No cluster, no kopf event loop."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from typing import Any

import pytest

from pqfed.operator import identities, reconcile
from pqfed.operator import pods as m
from pqfed.operator.reconcile import Observed
from pqfed.pqc.identity import Certificate, Identity, Role, TrustAnchor
from pqfed.services.spec import OPERATOR_ONLY, FederationJobSpec, parse_spec

JOB = m.JobRef("fed-a", "hospitals", "uid-1234")
NOW = "2026-11-25T12:00:00Z"
LATER = "2026-11-25T12:05:00Z"


def spec_of(**fields: Any) -> FederationJobSpec:
    return parse_spec(fields)


def raw_spec(**fields: Any) -> dict[str, Any]:
    return spec_of(**fields).model_dump(mode="json", by_alias=True, exclude_none=True)


def observed_from(plan: reconcile.Plan, previous: Observed | None = None, *,
                  ready: bool = False, **extra: Any) -> Observed:
    """What the cluster holds after `plan` was applied (pods optionally Ready)."""
    prev = previous or Observed()
    secrets = set(prev.secrets) | {s.name for s in plan.issue}
    configmaps = dict(prev.configmaps)
    services = set(prev.services)
    policies = set(prev.network_policies)
    pods = dict(prev.pods)
    for obj in plan.create:
        name = obj["metadata"]["name"]
        if obj["kind"] == "ConfigMap":
            configmaps[name] = obj
        elif obj["kind"] == "Service":
            services.add(name)
        elif obj["kind"] == "NetworkPolicy":
            policies.add(name)
        elif obj["kind"] == "Pod":
            pods[name] = with_status(obj, ready=ready)
    for name in plan.delete_pods:
        pods.pop(name, None)
    fields = {"secrets": frozenset(secrets), "configmaps": configmaps,
              "services": frozenset(services), "pods": pods,
              "network_policies": frozenset(policies), **extra}
    return Observed(**fields)


def with_status(pod: dict[str, Any], *, ready: bool = True, phase: str = "Running",
                **status: Any) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    pod["status"] = {"phase": phase, "podIP": "10.88.1.5",
                     "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                     "containerStatuses": [{"name": "fl", "restartCount": 0,
                                            "state": {"running": {}}}], **status}
    return pod


def started(spec: FederationJobSpec | None = None, *, ready: bool = True
            ) -> tuple[dict[str, Any], Observed]:
    """A job after on.create: its status and its children."""
    s = spec or spec_of(clients=3, minClients=2, rounds=3)
    raw = s.model_dump(mode="json", by_alias=True, exclude_none=True)
    plan = reconcile.plan_start(JOB, raw, {}, Observed(), NOW, generation=1)
    return plan.status, observed_from(plan, ready=ready)


def agg_report(rounds: int, total: int = 3, phase: str = "Running",
               participants: int = 3, **extra: Any) -> dict[str, Any]:
    recs = [{"round": r, "accuracy": 0.9 + r / 100, "loss": 0.3 - r / 100, "bytesSent": 1000 * r,
             "bytesReceived": 900 * r, "cryptoSeconds": 0.01, "durationSeconds": 2.5,
             "participants": [f"client-{i}" for i in range(participants)],
             "rejectedUpdates": 0, "epsilon": None, "aggregated": True, "notes": [],
             "completedAt": f"2026-11-25T12:0{r}:00Z"} for r in range(1, rounds + 1)]
    return {"job": JOB.name, "phase": phase, "currentRound": rounds, "totalRounds": total,
            "rounds": recs, "accuracy": recs[-1]["accuracy"] if recs else None, **extra}


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = reconcile.condition(status, type_)
    assert found is not None, f"no condition {type_} in {status.get('conditions')}"
    return found


# ---- manifests ------------------------------------------------------------------------------
def test_aggregator_pod_matches_the_local_runner_topology() -> None:
    spec = spec_of(placement={"aggregatorNodeSelector": {"pqfed.io/role": "aggregator"}})
    pod = m.aggregator_pod(JOB, spec)
    assert pod["metadata"]["name"] == "fed-a-aggregator"
    assert pod["metadata"]["namespace"] == "hospitals"
    labels = pod["metadata"]["labels"]
    assert labels["pqfed.io/job"] == "fed-a" and labels["pqfed.io/role"] == "aggregator"
    assert labels["app.kubernetes.io/instance"] == "fed-a"
    assert pod["metadata"]["ownerReferences"] == [{
        "apiVersion": "pqfed.io/v1alpha1", "kind": "FederationJob", "name": "fed-a",
        "uid": "uid-1234", "controller": True, "blockOwnerDeletion": True}]
    ps = pod["spec"]
    assert ps["restartPolicy"] == "OnFailure"
    assert ps["nodeSelector"] == {"pqfed.io/role": "aggregator"}
    (fl,) = ps["containers"]
    (sidecar,) = ps["initContainers"]
    assert fl["command"] == [
        "pqfed", "fl", "aggregator", "--spec", "/etc/pqfed/job/spec.json",
        "--identity-dir", "/etc/pqfed/identity", "--state-dir", "/var/lib/pqfed",
        "--fleet-port", "9092", "--status-port", "8080", "--linger", "30"]
    assert "ports" not in fl and "readinessProbe" not in fl  # the status API is loopback-only
    assert sidecar["command"] == [
        "pqfed", "sidecar", "--cert", "/etc/pqfed/identity/tls.crt",
        "--key", "/etc/pqfed/identity/tls.key", "--ca", "/etc/pqfed/identity/ca.crt",
        "--crl", "/etc/pqfed/identity/crl.pem", "--listen", "0.0.0.0:7443",
        "--upstream", "127.0.0.1:9092",
        "--allow-path-prefix", "/v1/fleet/",
        "--operator-upstream", "127.0.0.1:8080", "--admin", "127.0.0.1:9901",
        "--probes", "0.0.0.0:9902"]
    assert sidecar["restartPolicy"] == "Always"  # native sidecar: the pod can complete
    # Ready = the sidecar is up and its upstream (the SuperLink) accepts connections. The
    # kubelet probes the pod IP: the data-free probe listener, never the loopback admin API.
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9902}
    assert [p["containerPort"] for p in sidecar["ports"]] == [7443, 9902]
    assert fl["image"] == spec.image == "localhost/pqfed/fl:0.1.0"
    assert sidecar["image"] == spec.sidecar_image == "localhost/pqfed/sidecar:0.1.0"
    assert fl["resources"]["requests"] == {"cpu": "100m", "memory": "768Mi"}
    assert fl["resources"]["limits"] == {"memory": "1Gi"}
    assert ps["securityContext"]["runAsNonRoot"] is True
    assert fl["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in ps["volumes"]}
    # The identity dir holds the node's Secret and the job's revocation list, both re-read.
    sources = volumes["identity"]["projected"]["sources"]
    assert [src["secret"]["name"] for src in sources] == ["fed-a-aggregator-identity",
                                                          "fed-a-crl"]
    assert sources[1]["secret"]["items"] == [{"key": "crl.pem", "path": "crl.pem"}]
    assert volumes["job"]["configMap"]["name"] == "fed-a-job"
    assert "emptyDir" in volumes["state"]
    assert "restore" not in volumes
    mounts = {v["mountPath"] for v in fl["volumeMounts"]}
    assert mounts == {"/etc/pqfed/identity", "/etc/pqfed/job", "/var/lib/pqfed"}


def test_aggregator_restore_args_and_volume() -> None:
    pod = m.aggregator_pod(JOB, spec_of(), restore=True)
    fl = pod["spec"]["containers"][0]
    assert fl["command"][-2:] == ["--restore", "/etc/pqfed/restore"]
    assert {"name": "restore", "mountPath": "/etc/pqfed/restore", "readOnly": True} in \
        fl["volumeMounts"]
    assert {"name": "restore", "secret": {"secretName": "fed-a-checkpoint",
                                          "defaultMode": 0o440}} in pod["spec"]["volumes"]


def test_ml_kem_1024_selects_the_group_on_both_sides() -> None:
    spec = spec_of(crypto={"kem": "ML-KEM-1024"})
    for pod in (m.aggregator_pod(JOB, spec), m.client_pod(JOB, spec, 0)):
        cmd = pod["spec"]["initContainers"][0]["command"]
        assert cmd[cmd.index("--group") + 1] == "X25519_MLKEM1024"
    assert "--group" not in m.aggregator_pod(JOB, spec_of())["spec"]["initContainers"][0][
        "command"]


def test_client_pod_routes_to_the_aggregator_service_and_spreads() -> None:
    spec = spec_of(clients=4, placement={"nodeSelector": {"pqfed.io/ward": "icu"}})
    pod = m.client_pod(JOB, spec, 2)
    assert pod["metadata"]["name"] == "fed-a-client-2"
    assert pod["metadata"]["labels"]["pqfed.io/index"] == "2"
    assert pod["metadata"]["labels"]["pqfed.io/role"] == "client"
    ps = pod["spec"]
    assert ps["restartPolicy"] == "Always"
    assert ps["nodeSelector"] == {"pqfed.io/ward": "icu"}
    fl = ps["containers"][0]
    assert fl["command"] == [
        "pqfed", "fl", "client", "--spec", "/etc/pqfed/job/spec.json", "--index", "2",
        "--identity-dir", "/etc/pqfed/identity", "--state-dir", "/var/lib/pqfed",
        "--superlink", "127.0.0.1:19092", "--runtime-port", "9094"]
    cmd = ps["initContainers"][0]["command"]
    assert cmd[cmd.index("--route") + 1] == \
        "127.0.0.1:19092=fed-a-aggregator.hospitals.svc:7443@aggregator"
    assert cmd[cmd.index("--admin") + 1] == "127.0.0.1:9901"
    (tsc,) = ps["topologySpreadConstraints"]
    assert tsc["topologyKey"] == "kubernetes.io/hostname"
    assert tsc["labelSelector"]["matchLabels"] == {"pqfed.io/job": "fed-a",
                                                   "pqfed.io/role": "client"}
    vols = {v["name"]: v for v in ps["volumes"]}
    assert vols["identity"]["projected"]["sources"][0]["secret"]["name"] == \
        "fed-a-client-2-identity"
    assert cmd[cmd.index("--crl") + 1] == "/etc/pqfed/identity/crl.pem"
    no_spread = m.client_pod(JOB, spec_of(placement={"spread": False}), 0)
    assert "topologySpreadConstraints" not in no_spread["spec"]
    assert "nodeSelector" not in no_spread["spec"]


def test_network_policy_admits_only_the_pqc_port_to_the_jobs_pods() -> None:
    pol = m.network_policy(JOB)
    assert pol["kind"] == "NetworkPolicy" and pol["metadata"]["name"] == "fed-a-pqc-only"
    assert pol["spec"]["podSelector"] == {"matchLabels": {"pqfed.io/job": "fed-a"}}
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    assert pol["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 7443}]}]


def test_service_ports_equal_target_ports_and_select_the_aggregator() -> None:
    svc = m.aggregator_service(JOB)
    assert svc["metadata"]["name"] == "fed-a-aggregator"
    assert svc["spec"]["selector"] == {"pqfed.io/job": "fed-a", "pqfed.io/role": "aggregator"}
    # Only the PQC port: the status API (the global model) is never published.
    assert {(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == \
        {("pqc", 7443, 7443)}
    agg_labels = m.aggregator_pod(JOB, spec_of())["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= agg_labels.items()


def test_job_configmap_is_what_fl_node_load_spec_reads(tmp_path: Any) -> None:
    from pqfed.services.fl_node import load_spec

    spec = spec_of(clients=3, rounds=4, task="breast-cancer")
    cm = m.job_configmap(JOB, spec)
    path = tmp_path / "spec.json"
    path.write_text(cm["data"]["spec.json"])
    name, loaded = load_spec(path)
    assert (name, loaded) == ("fed-a", spec)


def test_identities_chain_to_the_stored_ca() -> None:
    ca_data = identities.issue_ca("fed-a", "ML-DSA-44")
    ca = identities.load_ca(ca_data)
    assert ca.root.federation == "fed-a" and ca.root.sig_algorithm == "ML-DSA-44"
    data = identities.issue_identity(ca, "client-0", Role.CLIENT, "ML-DSA-44")
    assert set(data) == {"tls.crt", "tls.key", "ca.crt"}
    ident = Identity.load(data["tls.crt"], data["tls.key"])
    trust = TrustAnchor(Certificate.from_pem(data["ca.crt"]))
    cert = trust.verify(ident.certificate)
    assert (cert.node_id, cert.role) == ("client-0", Role.CLIENT)
    secret = m.secret(JOB, "fed-a-client-0-identity", data, "identity", "client-0")
    assert secret["metadata"]["labels"]["pqfed.io/node"] == "client-0"
    assert secret["stringData"] == data


# ---- start: create, idempotency, invalid, cancel --------------------------------------------
def test_start_creates_every_child_once() -> None:
    spec = raw_spec(clients=3, minClients=2, rounds=3)
    plan = reconcile.plan_start(JOB, spec, {}, Observed(), NOW, generation=1)
    assert plan.permanent_error is None
    assert [s.name for s in plan.issue] == [
        "fed-a-ca", "fed-a-crl", "fed-a-aggregator-identity", "fed-a-operator-identity",
        "fed-a-client-0-identity", "fed-a-client-1-identity", "fed-a-client-2-identity"]
    (operator,) = [s for s in plan.issue if s.node_id == "operator"]
    assert operator.role is Role.OPERATOR
    assert plan.issue[0].node_id is None and plan.issue[1].crl
    assert plan.issue[2].role == Role.AGGREGATOR
    kinds = [(o["kind"], o["metadata"]["name"]) for o in plan.create]
    assert kinds == [("ConfigMap", "fed-a-job"), ("NetworkPolicy", "fed-a-pqc-only"),
                     ("Service", "fed-a-aggregator"),
                     ("Pod", "fed-a-aggregator"), ("Pod", "fed-a-client-0"),
                     ("Pod", "fed-a-client-1"), ("Pod", "fed-a-client-2")]
    st = plan.status
    assert st["phase"] == "Running" and st["startTime"] == NOW
    assert (st["currentRound"], st["totalRounds"], st["observedGeneration"]) == (0, 3, 1)
    assert cond(st, "Valid")["status"] == "True"
    assert not plan.recreated
    assert any(e.reason == "Started" for e in plan.events)
    assert sum(e.reason == "SecretIssued" for e in plan.events) == 7  # CA, CRL, agg, op, 3 clients


def test_start_again_creates_nothing_and_keeps_the_status() -> None:
    """An operator restart (on.resume) against what the first run created."""
    spec = raw_spec(clients=3)
    first = reconcile.plan_start(JOB, spec, {}, Observed(), NOW, generation=1)
    observed = observed_from(first)
    status = first.status
    again = reconcile.plan_start(JOB, spec, status, observed, LATER, generation=1)
    assert (again.issue, again.create, again.delete_pods) == ([], [], [])
    assert again.status == {}  # nothing changed, not even startTime
    assert not [e for e in again.events if e.reason in ("Created", "SecretIssued", "Started")]


def test_resume_recreates_only_the_missing_pod_and_records_it() -> None:
    status, observed = started()
    status = {**status, "currentRound": 2}
    pods = dict(observed.pods)
    del pods["fed-a-client-1"]
    plan = reconcile.plan_start(JOB, raw_spec(clients=3, minClients=2, rounds=3), status,
                                dataclasses.replace(observed, pods=pods), LATER, generation=1)
    assert plan.issue == []
    assert [o["metadata"]["name"] for o in plan.create] == ["fed-a-client-1"]
    assert "client-1 at round 2" in cond(plan.status, "PodsRecreated")["message"]
    assert plan.recreated == ["client"]


def test_existing_ca_is_never_reissued() -> None:
    observed = Observed(secrets=frozenset({"fed-a-ca", "fed-a-crl", "fed-a-aggregator-identity",
                                           "fed-a-operator-identity"}))
    plan = reconcile.plan_start(JOB, raw_spec(clients=2), {}, observed, NOW)
    assert [s.name for s in plan.issue] == ["fed-a-client-0-identity", "fed-a-client-1-identity"]


@pytest.mark.parametrize(("fields", "field"), [
    ({"clients": 3, "minClients": 4}, "spec.minClients"),
    ({"strategy": {"name": "FedMedian"}}, "spec.strategy.name"),
    ({"rounds": -1}, "spec.rounds"),
    ({"task": "breast-cancer", "dataset": {"partition": "natural"}}, "spec.dataset.partition"),
    ({"secureAggregation": {"enabled": True}, "strategy": {"name": "Krum"}, "clients": 5},
     "spec.secureAggregation.enabled"),
    ({"bogus": 1}, "spec.bogus"),
])
def test_invalid_spec_fails_with_the_field_named(fields: dict[str, Any], field: str) -> None:
    plan = reconcile.plan_start(JOB, fields, {}, Observed(), NOW, generation=3)
    assert plan.permanent_error and field in plan.permanent_error
    assert (plan.issue, plan.create) == ([], [])
    st = plan.status
    assert st["phase"] == "Failed" and st["observedGeneration"] == 3
    valid = cond(st, "Valid")
    assert (valid["status"], valid["reason"]) == ("False", "InvalidSpec")
    assert field in valid["message"] and field in st["message"]
    assert plan.events[0].type == "Warning"


def test_name_too_long_for_the_aggregator_service() -> None:
    job = m.JobRef("a" * 53, "ns", "u")
    plan = reconcile.plan_start(job, raw_spec(), {}, Observed(), NOW)
    assert plan.permanent_error and "metadata.name" in plan.permanent_error
    assert reconcile.validate("a" * 52, raw_spec()) == spec_of()


def test_terminal_jobs_are_left_alone() -> None:
    for phase in ("Succeeded", "Failed", "Cancelled"):
        assert reconcile.plan_start(JOB, raw_spec(), {"phase": phase}, Observed(), NOW) == \
            reconcile.Plan()
        assert reconcile.plan_tick(JOB, spec_of(), {"phase": phase}, Observed(), NOW) == \
            reconcile.Plan()


def test_refused_child_fails_the_job() -> None:
    status, _ = started()
    plan = reconcile.plan_failed(status, "ChildRefused", "Pod fed-a-client-0: bad image", LATER)
    assert plan.status["phase"] == "Failed" and plan.permanent_error
    assert cond(plan.status, "Complete")["reason"] == "ChildRefused"
    assert plan.status["completionTime"] == LATER


def test_cancel_deletes_pods_and_keeps_the_record() -> None:
    status, observed = started()
    plan = reconcile.plan_tick(JOB, spec_of(clients=3), {**status, "currentRound": 1}, observed,
                               LATER, annotations={"pqfed.io/cancel": "true"})
    assert sorted(plan.delete_pods) == sorted(observed.pods)
    assert plan.create == [] and plan.issue == []
    assert plan.status["phase"] == "Cancelled" and plan.status["completionTime"] == LATER
    assert "after round 1" in plan.status["message"]
    assert cond(plan.status, "Complete")["reason"] == "Cancelled"
    before = reconcile.plan_start(JOB, raw_spec(), {}, Observed(), NOW,
                                  annotations={"pqfed.io/cancel": "true"})
    assert before.create == [] and before.status["phase"] == "Cancelled"


# ---- tick: progress, checkpoints, success, failure, lost pods ------------------------------
def test_progress_is_copied_without_double_counting() -> None:
    spec = spec_of(clients=3, rounds=3)
    status, observed = started(spec)
    obs = dataclasses.replace(observed, aggregator=agg_report(2))
    plan = reconcile.plan_tick(JOB, spec, status, obs, LATER)
    st = {**status, **plan.status}
    assert plan.new_rounds == 2 and plan.save_checkpoint == 2
    assert st["currentRound"] == 2 and st["accuracy"] == pytest.approx(0.92)
    assert [r["round"] for r in st["rounds"]] == [1, 2]
    assert set(st["rounds"][0]) == {"round", "accuracy", "loss", "bytesSent", "bytesReceived",
                                    "cryptoSeconds", "durationSeconds", "participants",
                                    "rejectedUpdates", "completedAt"}
    progress = cond(st, "RoundProgress")
    assert progress["reason"] == "RoundCompleted" and "3/3 clients" in progress["message"]
    # The same report again (another tick, or a restarted operator): nothing new.
    again = reconcile.plan_tick(JOB, spec, st, obs, LATER)
    assert again.new_rounds == 0 and "rounds" not in again.status
    assert [r["round"] for r in {**st, **again.status}["rounds"]] == [1, 2]


def test_rounds_are_trimmed_to_the_last_hundred() -> None:
    spec = spec_of(rounds=150)
    status, observed = started(spec)
    obs = dataclasses.replace(observed, aggregator=agg_report(150, total=150))
    st = reconcile.plan_tick(JOB, spec, status, obs, LATER).status
    assert len(st["rounds"]) == 100
    assert st["rounds"][0]["round"] == 51 and st["rounds"][-1]["round"] == 150
    assert st["currentRound"] == 150


def test_round_records_fit_the_crd_schema() -> None:
    rec = reconcile.round_record({"round": 2, "accuracy": float("nan"), "loss": "0.5",
                                  "completedAt": "", "epsilon": 1.0, "notes": ["x"],
                                  "participants": ["client-0"], "bytesSent": -3})
    assert rec == {"round": 2, "bytesSent": 0, "loss": 0.5, "participants": ["client-0"]}
    assert reconcile.round_record({"round": 0}) is None


def test_degraded_round_is_reported() -> None:
    spec = spec_of(clients=3, minClients=2)
    status, observed = started(spec)
    obs = dataclasses.replace(observed, aggregator=agg_report(1, participants=2))
    st = reconcile.plan_tick(JOB, spec, status, obs, LATER).status
    assert "2/3 clients aggregated (minClients 2)" in cond(st, "RoundProgress")["message"]


def test_checkpoint_is_saved_only_for_new_rounds() -> None:
    spec = spec_of()
    status, observed = started(spec)
    ckpt = m.checkpoint_secret(JOB, 2, b"npz", {"currentRound": 2})
    obs = dataclasses.replace(observed, checkpoint=ckpt, aggregator=agg_report(2))
    assert reconcile.plan_tick(JOB, spec, status, obs, LATER).save_checkpoint is None
    obs3 = dataclasses.replace(observed, checkpoint=ckpt, aggregator=agg_report(3))
    assert reconcile.plan_tick(JOB, spec, status, obs3, LATER).save_checkpoint == 3


def test_checkpoint_secret_replaces_the_previous_round() -> None:
    cm = m.checkpoint_secret(JOB, 3, b"\x00\x01", {"currentRound": 3, "job": "fed-a"},
                             previous_keys=["round-00002.npz", "status.json"])
    assert cm["kind"] == "Secret"  # the checkpoint is the global model: never a ConfigMap
    status = cm["data"].pop("status.json")
    assert cm["data"] == {"round-00002.npz": None,
                          "round-00003.npz": base64.b64encode(b"\x00\x01").decode()}
    assert json.loads(base64.b64decode(status))["currentRound"] == 3
    cm["data"]["status.json"] = status
    assert cm["metadata"]["annotations"]["pqfed.io/round"] == "3"
    assert m.checkpoint_round(cm) == 3
    assert m.checkpoint_round(None) == 0
    assert m.checkpoint_round({"metadata": {"annotations": {"pqfed.io/round": "4"}}}) == 0


def test_lost_aggregator_is_recreated_from_the_checkpoint() -> None:
    spec = spec_of()
    status, observed = started(spec)
    status = {**status, "currentRound": 2}
    pods = {k: v for k, v in observed.pods.items() if k != "fed-a-aggregator"}
    obs = dataclasses.replace(observed, pods=pods,
                              checkpoint=m.checkpoint_secret(JOB, 2, b"npz", {}))
    plan = reconcile.plan_tick(JOB, spec, status, obs, LATER)
    (agg,) = plan.create
    assert agg["metadata"]["name"] == "fed-a-aggregator"
    assert "--restore" in agg["spec"]["containers"][0]["command"]
    assert "resumes from checkpoint round 2" in cond(plan.status, "PodsRecreated")["message"]
    assert cond(plan.status, "AggregatorReady")["status"] == "False"
    assert plan.recreated == ["aggregator"]


def test_aggregator_lost_with_its_node_is_deleted_then_recreated() -> None:
    spec = spec_of()
    status, observed = started(spec)
    pods = dict(observed.pods)
    pods["fed-a-aggregator"] = with_status(pods["fed-a-aggregator"], phase="Failed",
                                           ready=False, reason="Terminated",
                                           message="node shutdown")
    plan = reconcile.plan_tick(JOB, spec, status, dataclasses.replace(observed, pods=pods), LATER)
    assert plan.delete_pods == ["fed-a-aggregator"] and plan.create == []
    assert "phase" not in plan.status
    assert cond(plan.status, "AggregatorReady")["reason"] == "AggregatorLost"


def test_lost_client_is_recreated_and_recorded() -> None:
    spec = spec_of(clients=3, minClients=2)
    status, observed = started(spec)
    status = {**status, "currentRound": 1}
    pods = dict(observed.pods)
    pods["fed-a-client-0"] = {**pods["fed-a-client-0"],
                              "metadata": {**pods["fed-a-client-0"]["metadata"],
                                           "deletionTimestamp": NOW}}
    terminating = dataclasses.replace(observed, pods=pods)
    plan = reconcile.plan_tick(JOB, spec, status, terminating, LATER)
    assert plan.create == [] and plan.delete_pods == []  # wait until it is gone
    clients = cond(plan.status, "ClientsReady")
    assert (clients["status"], clients["reason"]) == ("False", "ClientPodLost")
    del pods["fed-a-client-0"]
    gone = dataclasses.replace(observed, pods=pods)
    plan = reconcile.plan_tick(JOB, spec, {**status, **plan.status}, gone, LATER)
    assert [o["metadata"]["name"] for o in plan.create] == ["fed-a-client-0"]
    assert "client-0 at round 1" in cond(plan.status, "PodsRecreated")["message"]
    assert any(e.reason == "ClientRecreated" for e in plan.events)
    st = {**status, **plan.status}
    after = observed_from(plan, gone, ready=True)
    plan = reconcile.plan_tick(JOB, spec, st, after, LATER)
    st = {**st, **plan.status}
    assert cond(st, "ClientsReady")["status"] == "True"
    assert "client-0" in cond(st, "PodsRecreated")["message"]  # the record stays


def test_failed_client_pod_is_replaced() -> None:
    spec = spec_of(clients=2)
    status, observed = started(spec)
    pods = dict(observed.pods)
    pods["fed-a-client-1"] = with_status(pods["fed-a-client-1"], phase="Failed",
                                         ready=False, reason="Terminated")
    plan = reconcile.plan_tick(JOB, spec, status, dataclasses.replace(observed, pods=pods), LATER)
    assert plan.delete_pods == ["fed-a-client-1"] and plan.create == []


def test_success_reported_by_the_aggregator() -> None:
    spec = spec_of(clients=3)
    status, observed = started(spec)
    report = agg_report(3, phase="Succeeded", auditHead="ab12",
                        completionTime="2026-11-25T12:03:30Z")
    obs = dataclasses.replace(observed, aggregator=report)
    plan = reconcile.plan_tick(JOB, spec, status, obs, LATER)
    st = plan.status
    assert st["phase"] == "Succeeded" and st["completionTime"] == "2026-11-25T12:03:30Z"
    assert st["auditHead"] == "ab12" and st["currentRound"] == 3 and len(st["rounds"]) == 3
    assert sorted(plan.delete_pods) == ["fed-a-client-0", "fed-a-client-1", "fed-a-client-2"]
    assert cond(st, "Complete")["reason"] == "Succeeded"
    assert plan.create == []


def test_success_from_the_pod_phase_keeps_the_last_polled_status() -> None:
    spec = spec_of(clients=2)
    status, observed = started(spec)
    status = {**status, "currentRound": 3, "accuracy": 0.95}
    pods = dict(observed.pods)
    pods["fed-a-aggregator"] = with_status(pods["fed-a-aggregator"], phase="Succeeded",
                                           ready=False)
    plan = reconcile.plan_tick(JOB, spec, status, dataclasses.replace(observed, pods=pods), LATER)
    assert plan.status["phase"] == "Succeeded" and plan.status["completionTime"] == LATER
    assert "accuracy 0.9500" in plan.status["message"]


def test_aggregator_crash_loop_fails_the_job() -> None:
    spec = spec_of(clients=2)
    status, observed = started(spec)
    pods = dict(observed.pods)
    pods["fed-a-aggregator"] = with_status(pods["fed-a-aggregator"], ready=False)
    pods["fed-a-aggregator"]["status"]["containerStatuses"] = [{
        "name": "fl", "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]
    plan = reconcile.plan_tick(JOB, spec, status, dataclasses.replace(observed, pods=pods), LATER)
    assert plan.status["phase"] == "Failed"
    assert "exit code 1" in plan.status["message"]
    assert cond(plan.status, "Complete")["reason"] == "AggregatorFailed"
    assert sorted(plan.delete_pods) == ["fed-a-client-0", "fed-a-client-1"]
    # Fewer restarts: still running, nothing to do.
    pods["fed-a-aggregator"]["status"]["containerStatuses"][0]["restartCount"] = 1
    calm = reconcile.plan_tick(JOB, spec, status, dataclasses.replace(observed, pods=pods), LATER)
    assert "phase" not in calm.status and calm.delete_pods == []


def test_unschedulable_clients_name_the_node_selector() -> None:
    spec = spec_of(clients=2, placement={"nodeSelector": {"pqfed.io/ward": "nowhere"}})
    status, observed = started(spec)
    pods = {name: {**pod, "status": {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 node(s) didn't match selector"}]}}
        for name, pod in observed.pods.items()}
    plan = reconcile.plan_tick(JOB, spec, status, dataclasses.replace(observed, pods=pods), LATER)
    clients = cond(plan.status, "ClientsReady")
    assert clients["reason"] == "Unschedulable"
    assert "spec.placement.nodeSelector" in clients["message"]
    # An operator-only rule (spec.OPERATOR_ONLY): the condition says why admission let it in.
    (rule,) = [r for r in OPERATOR_ONLY if r.field == "placement.nodeSelector"]
    assert (rule.condition, rule.reason) == ("ClientsReady", "Unschedulable")
    assert rule.why_not_cel in clients["message"]


def test_pending_jobs_are_not_ticked() -> None:
    assert reconcile.plan_tick(JOB, spec_of(), {}, Observed(), NOW) == reconcile.Plan()


# ---- helpers --------------------------------------------------------------------------------
def test_conditions_keep_their_transition_time() -> None:
    conds = reconcile.set_condition([], "ClientsReady", "False", "ClientsStarting", "0/3", NOW)
    conds = reconcile.set_condition(conds, "ClientsReady", "False", "ClientsStarting", "1/3",
                                    LATER)
    assert conds[0]["lastTransitionTime"] == NOW and conds[0]["message"] == "1/3"
    conds = reconcile.set_condition(conds, "ClientsReady", "True", "AllClientsReady", "3/3",
                                    LATER)
    assert conds[0]["lastTransitionTime"] == LATER and len(conds) == 1


def test_job_defaults_apply_only_to_builtin_values() -> None:
    defaults = reconcile.parse_job_defaults('{"kem": "ML-KEM-1024", "signature": ""}')
    assert defaults == {"kem": "ML-KEM-1024"}
    spec = reconcile.validate("j", raw_spec(), defaults)
    assert isinstance(spec, FederationJobSpec) and spec.crypto.kem == "ML-KEM-1024"
    chosen = reconcile.validate("j", raw_spec(crypto={"kem": "ML-KEM-768",
                                                      "signature": "ML-DSA-87"}),
                                {"signature": "ML-DSA-44"})
    assert isinstance(chosen, FederationJobSpec) and chosen.crypto.signature == "ML-DSA-87"
    assert reconcile.parse_job_defaults(None) == {} and reconcile.parse_job_defaults(" ") == {}
    with pytest.raises(ValueError, match="unknown key"):
        reconcile.parse_job_defaults('{"cipher": "x"}')
    with pytest.raises(ValueError, match="crypto.kem"):
        reconcile.parse_job_defaults('{"kem": "ML-KEM-512"}')


def test_pod_state() -> None:
    pod = m.client_pod(JOB, spec_of(), 0)
    assert reconcile.pod_state(None).kind == "missing"
    assert reconcile.pod_state(with_status(pod)).kind == "ready"
    assert reconcile.pod_state(with_status(pod, ready=False)).kind == "starting"
    done = with_status(pod)
    done["status"]["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 0}}
    assert reconcile.pod_state(done, completes=True).kind == "succeeded"
    assert reconcile.pod_state(done).kind == "ready"
    evicted = with_status(pod, phase="Failed", reason="Evicted", message="low memory")
    assert reconcile.pod_state(evicted) == reconcile.PodState("lost", "low memory")


# ---- wiring helpers (no cluster) ------------------------------------------------------------
def test_connection_info_from_a_client_configuration() -> None:
    kubernetes = pytest.importorskip("kubernetes")
    from pqfed.operator.handlers import connection_info

    cfg = kubernetes.client.Configuration()
    cfg.host = "https://10.88.0.1:6443"
    cfg.ssl_ca_cert = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    cfg.api_key = {"BearerToken": "tok"}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    info = connection_info(cfg)
    assert (info.server, info.scheme, info.token) == ("https://10.88.0.1:6443", "Bearer", "tok")
    assert info.ca_path == cfg.ssl_ca_cert and info.insecure is False
    assert info.trust_env is False  # never an environment proxy


def test_metrics_count_jobs_by_phase() -> None:
    from pqfed.operator.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    metrics.job_phase("a", "Running")
    metrics.job_phase("b", "Running")
    metrics.job_phase("a", "Succeeded")
    metrics.rounds.inc(3)
    text = metrics.exposition().decode()
    assert 'pqfed_operator_jobs{phase="Running"} 1.0' in text
    assert 'pqfed_operator_jobs{phase="Succeeded"} 1.0' in text
    assert "pqfed_operator_rounds_recorded_total 3.0" in text
    metrics.job_phase("b", None)
    assert 'pqfed_operator_jobs{phase="Running"} 0.0' in metrics.exposition().decode()


# ---- hierarchical jobs: edge aggregators ----------------------------------------------------
HIER = {"clients": 5, "minClients": 2, "rounds": 2, "hierarchy": {"enabled": True, "edges": 2}}


def test_hierarchical_job_creates_edges_and_routes_clients_to_them() -> None:
    plan = reconcile.plan_start(JOB, raw_spec(**HIER), {}, Observed(), NOW, generation=1)
    edge_ids = [s for s in plan.issue if s.role == Role.EDGE]
    assert [(s.name, s.node_id) for s in edge_ids] == [
        ("fed-a-edge-0-identity", "edge-0"), ("fed-a-edge-1-identity", "edge-1")]
    kinds = [(o["kind"], o["metadata"]["name"]) for o in plan.create]
    for e in (0, 1):
        assert ("Service", f"fed-a-edge-{e}") in kinds and ("Pod", f"fed-a-edge-{e}") in kinds
    spec = spec_of(**HIER)
    edge = m.edge_pod(JOB, spec, 1)
    fl = edge["spec"]["containers"][0]["command"]
    assert fl[:3] == ["pqfed", "fl", "edge"] and fl[fl.index("--index") + 1] == "1"
    side = edge["spec"]["initContainers"][0]["command"]
    # one sidecar: inbound for its clients (Fleet API only), outbound to the aggregator
    assert side[side.index("--listen") + 1] == "0.0.0.0:7443"
    assert side[side.index("--allow-path-prefix") + 1] == "/v1/fleet/"
    assert side[side.index("--route") + 1] == \
        "127.0.0.1:19092=fed-a-aggregator.hospitals.svc:7443@aggregator"
    svc = m.edge_service(JOB, 1)
    assert svc["spec"]["selector"].items() <= edge["metadata"]["labels"].items()
    assert not (m.edge_service(JOB, 0)["spec"]["selector"].items()
                <= edge["metadata"]["labels"].items())
    # client 3 belongs to edge 1 (round-robin) and pins the edge's node id
    client = m.client_pod(JOB, spec, 3)["spec"]["initContainers"][0]["command"]
    assert client[client.index("--route") + 1] == \
        "127.0.0.1:19092=fed-a-edge-1.hospitals.svc:7443@edge-1"
    flat = m.client_pod(JOB, spec_of(clients=5), 3)["spec"]["initContainers"][0]["command"]
    assert flat[flat.index("--route") + 1].endswith("@aggregator")


def test_lost_edge_is_recreated_and_named_in_conditions() -> None:
    spec = spec_of(**HIER)
    status, observed = started(spec)
    status = {**status, "currentRound": 1}
    pods = dict(observed.pods)
    del pods["fed-a-edge-0"]
    gone = dataclasses.replace(observed, pods=pods)
    plan = reconcile.plan_tick(JOB, spec, status, gone, LATER)
    assert [o["metadata"]["name"] for o in plan.create] == ["fed-a-edge-0"]
    assert plan.issue == []  # its identity Secret is reused
    assert "edge-0 at round 1" in cond(plan.status, "PodsRecreated")["message"]
    assert "edge-0 missing" in cond(plan.status, "ClientsReady")["message"]
    assert any(e.reason == "EdgeRecreated" for e in plan.events)
    assert plan.recreated == ["edge"]


def test_hierarchical_aggregator_admits_only_edges() -> None:
    """Clients must not bypass their edge: the central sidecar refuses client certificates."""
    cmd = m.aggregator_pod(JOB, spec_of(**HIER))["spec"]["initContainers"][0]["command"]
    assert cmd[cmd.index("--peer-role") + 1] == "edge" and cmd.count("--peer-role") == 1
    flat = m.aggregator_pod(JOB, spec_of())["spec"]["initContainers"][0]["command"]
    assert "--peer-role" not in flat
