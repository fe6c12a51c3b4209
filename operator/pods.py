"""The Kubernetes objects of one FederationJob, as plain manifests (no API calls).

A job NAME in namespace NS runs the same process set as `pqfed run` (services/runner.py):
one aggregator pod (`pqfed fl aggregator` behind its PQC sidecar) and `spec.clients` client
pods (`pqfed fl client` dialling the aggregator through their own sidecar), with identities
issued by a per-job federation CA. Every object carries the job's labels and a controller
owner reference, so `pqfed logs` finds the pods and the garbage collector the rest.

The sidecars are native sidecars (init containers with `restartPolicy: Always`, Kubernetes
>= 1.29): the aggregator pod reaches `Succeeded` when `fl` exits 0, which a regular sidecar
container, serving forever, would prevent.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Final

from pqfed.pqc.backends import BACKEND_ENV
from pqfed.pqc.sidecar.config import ADMIN_PORT, PROBE_PORT
from pqfed.pqc.truststore import CRL_FILE  # the sidecar and `fl` re-read it
from pqfed.services import (
    API_GROUP,
    API_VERSION,
    FLEET_PATH_PREFIX,
    FLEET_PORT,
    IDENTITY_DIR,
    INDEX_LABEL,
    JOB_LABEL,
    KIND,
    NODE_LABEL,
    ROLE_LABEL,
    ROUND_ANNOTATION,
    ROUTE_PORT,
    RUNTIME_PORT,
    STATE_DIR,
    STATUS_FILE,
    STATUS_PORT,
    FederationJobSpec,
    edge_of,
)
from pqfed.services import edge_node_id as hierarchy_edge_node_id

Manifest = dict[str, Any]

MANAGED_BY: Final = "pqfed-operator"

# In-pod paths and ports; the same as the `pqfed fl` / `pqfed sidecar` defaults.
# tls13 jobs: the X.509 identity in IDENTITY_DIR/x509 (tls.crt, tls.key, ca.crt, crl.pem),
# projected from the X.509 keys of the same Secrets (operator/identities.py).
X509_DIR: Final = "x509"
_X509_ITEMS: Final = (("x509.crt", "tls.crt"), ("x509.key", "tls.key"), ("x509-ca.crt", "ca.crt"))
_X509_CRL_KEY: Final = "x509-crl.pem"
JOB_DIR: Final = "/etc/pqfed/job"
RESTORE_DIR: Final = "/etc/pqfed/restore"
SPEC_FILE: Final = "spec.json"
PQC_PORT: Final = 7443  # aggregator sidecar, the only port peers reach
# The aggregator's status API (STATUS_PORT) is on the pod's loopback: the operator reaches it
# through the sidecar with its own PQC identity (the checkpoint is the global model).
LINGER_S: Final = 30  # the aggregator keeps serving /status this long after the job ends
GRACE_S: Final = 10

# Non-root like the chart's operator pod. The root filesystem stays writable: Flower and
# torch write below /tmp (XDG_CACHE_HOME in the image), and an emptyDir over /tmp would hide
# the emulated nodes' /tmp. Nothing here needs a capability.
POD_SECURITY: Final[Manifest] = {
    "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY: Final[Manifest] = {
    "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
}
# A Raspberry Pi 4 has 4 GiB: requests let the scheduler spread pods, limits keep one job
# from starving a node.
# Measured peak of a breast-cancer fl container: ~780 MiB (torch + Flower + the data).
FL_RESOURCES: Final[Manifest] = {"requests": {"cpu": "100m", "memory": "768Mi"},
                                 "limits": {"memory": "1Gi"}}
SIDECAR_RESOURCES: Final[Manifest] = {"requests": {"cpu": "50m", "memory": "64Mi"},
                                      "limits": {"memory": "256Mi"}}


@dataclass(frozen=True)
class JobRef:
    """The identity of one FederationJob (what its children point back to)."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Any) -> JobRef:
        meta = body["metadata"]
        return cls(str(meta["name"]), str(meta["namespace"]), str(meta["uid"]))


# ---- names ----------------------------------------------------------------------------------
def ca_secret_name(job: str) -> str:
    return f"{job}-ca"


def client_node_id(index: int) -> str:
    return f"client-{index}"


AGGREGATOR_NODE_ID: Final = "aggregator"


def identity_secret_name(job: str, node_id: str) -> str:
    return f"{job}-{node_id}-identity"


def crl_secret_name(job: str) -> str:
    """The job CA's revocation list (`crl.pem`), projected into every pod's identity dir."""
    return f"{job}-crl"


def job_configmap_name(job: str) -> str:
    return f"{job}-job"


def checkpoint_secret_name(job: str) -> str:
    return f"{job}-checkpoint"


OPERATOR_NODE_ID: Final = "operator"


def network_policy_name(job: str) -> str:
    return f"{job}-pqc-only"


def aggregator_pod_name(job: str) -> str:
    return f"{job}-aggregator"


def aggregator_service_name(job: str) -> str:
    return f"{job}-aggregator"


def client_pod_name(job: str, index: int) -> str:
    return f"{job}-{client_node_id(index)}"


def edge_node_id(edge: int) -> str:
    return hierarchy_edge_node_id(edge)


def edge_pod_name(job: str, edge: int) -> str:
    return f"{job}-{edge_node_id(edge)}"


def edge_service_name(job: str, edge: int) -> str:
    return f"{job}-{edge_node_id(edge)}"


def checkpoint_key(round_: int) -> str:
    return f"round-{round_:05d}.npz"


# ---- metadata -------------------------------------------------------------------------------
def owner_reference(job: JobRef) -> Manifest:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": job.name,
            "uid": job.uid, "controller": True, "blockOwnerDeletion": True}


def selector_labels(job: str, role: str) -> dict[str, str]:
    return {JOB_LABEL: job, ROLE_LABEL: role}


def labels(job: str, component: str, **extra: str) -> dict[str, str]:
    return {
        JOB_LABEL: job,
        "app.kubernetes.io/name": "pqfed",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "pqfed",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **extra,
    }


def _meta(job: JobRef, name: str, lbls: dict[str, str],
          annotations: dict[str, str] | None = None) -> Manifest:
    meta: Manifest = {"name": name, "namespace": job.namespace, "labels": lbls,
                      "ownerReferences": [owner_reference(job)]}
    if annotations:
        meta["annotations"] = annotations
    return meta


# ---- secrets and config maps ----------------------------------------------------------------
def secret(job: JobRef, name: str, data: dict[str, str], component: str,
           node_id: str | None = None) -> Manifest:
    extra = {NODE_LABEL: node_id} if node_id else {}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(job, name, labels(job.name, component, **extra)),
            "stringData": data}


def spec_document(job_name: str, spec: FederationJobSpec) -> Manifest:
    """What `pqfed fl --spec FILE.json` reads (services/spec.load_spec)."""
    return {"name": job_name,
            "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True)}


def job_configmap(job: JobRef, spec: FederationJobSpec) -> Manifest:
    doc = json.dumps(spec_document(job.name, spec), indent=1, sort_keys=True)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(job, job_configmap_name(job.name), labels(job.name, "config")),
            "data": {SPEC_FILE: doc}}


def checkpoint_secret(job: JobRef, round_: int, checkpoint: bytes,
                      status: Manifest, previous_keys: list[str] | tuple[str, ...] = ()
                      ) -> Manifest:
    """The operator's copy of the aggregator's last completed round: what
    `pqfed fl aggregator --restore DIR` reads (status.json + round-NNNNN.npz). A Secret, not a
    ConfigMap: the checkpoint is the global model, readable only by those RBAC lets read the
    job's identities.

    Meant for a merge patch as well as a create: keys of older rounds are set to null, so a
    patch drops them and the Secret never grows past one checkpoint.
    """
    data: dict[str, str | None] = {k: None for k in previous_keys
                                   if k not in (checkpoint_key(round_), STATUS_FILE)}
    data[checkpoint_key(round_)] = base64.b64encode(checkpoint).decode()
    data[STATUS_FILE] = base64.b64encode(json.dumps(status, sort_keys=True).encode()).decode()
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(job, checkpoint_secret_name(job.name),
                              labels(job.name, "checkpoint"),
                              {ROUND_ANNOTATION: str(round_)}),
            "data": data}


def checkpoint_round(secret: Manifest | None) -> int:
    """The round a checkpoint Secret holds (0: none usable)."""
    if not secret:
        return 0
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    try:
        round_ = int(annotations.get(ROUND_ANNOTATION, "0"))
    except ValueError:
        return 0
    keys = secret.get("data") or {}
    return round_ if round_ > 0 and checkpoint_key(round_) in keys and STATUS_FILE in keys else 0


def network_policy(job: JobRef) -> Manifest:
    """Only the sidecars' PQC port of a job's pods is reachable on the pod network: the
    aggregator's and edges' (clients dial out only). Enforced where the CNI implements
    NetworkPolicy (k3s's embedded kube-router, Calico, Cilium); the status API and SuperLink
    also bind loopback, so nothing but the sidecar listens beside the channel either way."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(job, network_policy_name(job.name), labels(job.name, "network")),
            "spec": {
                "podSelector": {"matchLabels": {JOB_LABEL: job.name}},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "ports": [{"protocol": "TCP", "port": PQC_PORT}],
                }],
            }}


def _pqc_service(job: JobRef, name: str, component: str, selector: dict[str, str]
                 ) -> Manifest:
    # Port == targetPort: the emulated nodes have no kube-proxy; /etc/hosts maps the name to
    # the ready pod's IP and clients dial the pod port directly.
    ports = [{"name": "pqc", "port": PQC_PORT, "targetPort": PQC_PORT, "protocol": "TCP"}]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(job, name, labels(job.name, component)),
            "spec": {"type": "ClusterIP", "ports": ports, "selector": selector}}


def aggregator_service(job: JobRef) -> Manifest:
    return _pqc_service(job, aggregator_service_name(job.name), "aggregator",
                        selector_labels(job.name, "aggregator"))


def edge_service(job: JobRef, edge: int) -> Manifest:
    """An edge aggregator's PQC port, which its member clients dial (hierarchical jobs)."""
    return _pqc_service(job, edge_service_name(job.name, edge), "edge",
                        {**selector_labels(job.name, "edge"), INDEX_LABEL: str(edge)})


# ---- pods -----------------------------------------------------------------------------------
def _tls13(spec: FederationJobSpec) -> bool:
    return spec.channel.protocol == "tls13"


def _identity_args(spec: FederationJobSpec) -> list[str]:
    """The sidecar's identity: the pqfed one, or for tls13 jobs the X.509 twin (X509_DIR)."""
    d = f"{IDENTITY_DIR}/{X509_DIR}" if _tls13(spec) else IDENTITY_DIR
    args = ["--cert", f"{d}/tls.crt", "--key", f"{d}/tls.key", "--ca", f"{d}/ca.crt",
            "--crl", f"{d}/{CRL_FILE}"]
    return [*args, "--protocol", spec.channel.protocol] if _tls13(spec) else args


def _groups(spec: FederationJobSpec) -> list[str]:
    return ["--group", "X25519_MLKEM1024"] if spec.crypto.kem == "ML-KEM-1024" else []


def _container(name: str, spec: FederationJobSpec, command: list[str], resources: Manifest,
               mounts: list[Manifest], **extra: Any) -> Manifest:
    image = spec.sidecar_image if name == "sidecar" else spec.image
    # Every process of the job (sidecar handshakes, update signing) uses its crypto backend.
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"},
           {"name": BACKEND_ENV, "value": spec.crypto.backend}]
    return {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
            "command": command, "env": env,
            "resources": resources, "securityContext": CONTAINER_SECURITY,
            "volumeMounts": mounts, **extra}


def _http_probe(path: str, port: int) -> Manifest:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": 2,
            "failureThreshold": 3, "timeoutSeconds": 2}


def _volumes(job: str, node_id: str, restore: bool, tls13: bool = False) -> list[Manifest]:
    # One directory, two Secrets: the node's identity (renewed by the operator) and the job's
    # revocation list (re-signed on every revocation); the kubelet swaps both in place.
    ident = [{"key": k, "path": k} for k in ("tls.crt", "tls.key", "ca.crt")]
    crl = [{"key": CRL_FILE, "path": CRL_FILE}]
    if tls13:
        ident += [{"key": k, "path": f"{X509_DIR}/{p}"} for k, p in _X509_ITEMS]
        crl.append({"key": _X509_CRL_KEY, "path": f"{X509_DIR}/{CRL_FILE}"})
    vols: list[Manifest] = [
        {"name": "identity", "projected": {"defaultMode": 0o440, "sources": [
            {"secret": {"name": identity_secret_name(job, node_id), "items": ident}},
            {"secret": {"name": crl_secret_name(job), "items": crl}},
        ]}},
        {"name": "job", "configMap": {"name": job_configmap_name(job)}},
        {"name": "state", "emptyDir": {}},
    ]
    if restore:
        vols.append({"name": "restore", "secret": {"secretName": checkpoint_secret_name(job),
                                                   "defaultMode": 0o440}})
    return vols


_IDENTITY_MOUNT: Final[Manifest] = {"name": "identity", "mountPath": IDENTITY_DIR, "readOnly": True}
_JOB_MOUNT: Final[Manifest] = {"name": "job", "mountPath": JOB_DIR, "readOnly": True}
_STATE_MOUNT: Final[Manifest] = {"name": "state", "mountPath": STATE_DIR}
_RESTORE_MOUNT: Final[Manifest] = {"name": "restore", "mountPath": RESTORE_DIR, "readOnly": True}


def _pod(job: JobRef, name: str, lbls: dict[str, str], restart_policy: str,
         node_selector: dict[str, str], sidecar: Manifest, fl: Manifest,
         volumes: list[Manifest], **extra: Any) -> Manifest:
    spec: Manifest = {
        "restartPolicy": restart_policy,
        "terminationGracePeriodSeconds": GRACE_S,
        # FL pods never talk to the API server, and need no Service env variables.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": POD_SECURITY,
        "initContainers": [{**sidecar, "restartPolicy": "Always"}],
        "containers": [fl],
        "volumes": volumes,
        **extra,
    }
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _meta(job, name, lbls),
            "spec": spec}


def _inbound_sidecar(spec: FederationJobSpec, *extra: str) -> Manifest:
    """The sidecar of a pod that accepts PQC channels (aggregator, edge): only the Fleet API
    gets through to the local SuperLink; `extra` adds arguments (an edge's route upstream,
    the aggregator's status API for the operator). Its readiness includes the upstream's."""
    cmd = ["pqfed", "sidecar", *_identity_args(spec),
           "--listen", f"0.0.0.0:{PQC_PORT}", "--upstream", f"127.0.0.1:{FLEET_PORT}",
           "--allow-path-prefix", FLEET_PATH_PREFIX, *_groups(spec), *extra,
           "--admin", f"127.0.0.1:{ADMIN_PORT}", "--probes", f"0.0.0.0:{PROBE_PORT}"]
    return _container("sidecar", spec, cmd, SIDECAR_RESOURCES, [_IDENTITY_MOUNT],
                      ports=[{"name": "pqc", "containerPort": PQC_PORT},
                             {"name": "probes", "containerPort": PROBE_PORT}],
                      readinessProbe=_http_probe("/readyz", PROBE_PORT))


def aggregator_pod(job: JobRef, spec: FederationJobSpec, *, restore: bool = False) -> Manifest:
    """SuperLink + ServerApp + status API (`fl`, all on loopback) behind the PQC sidecar,
    which lets clients reach only the Fleet API and the operator only the status API. With
    `restore`, the operator's checkpoint Secret is mounted and the ServerApp resumes after the
    round it holds."""
    fl_cmd = ["pqfed", "fl", "aggregator", "--spec", f"{JOB_DIR}/{SPEC_FILE}",
              "--identity-dir", IDENTITY_DIR, "--state-dir", STATE_DIR,
              "--fleet-port", str(FLEET_PORT), "--status-port", str(STATUS_PORT),
              "--linger", str(LINGER_S)]
    mounts = [_IDENTITY_MOUNT, _JOB_MOUNT, _STATE_MOUNT]
    if restore:
        fl_cmd += ["--restore", RESTORE_DIR]
        mounts.append(_RESTORE_MOUNT)
    fl = _container("fl", spec, fl_cmd, FL_RESOURCES, mounts)
    # In hierarchical jobs only edges talk to the aggregator: a client certificate is refused
    # at the handshake, so no client can bypass its edge.
    roles = ["--peer-role", "edge"] if spec.hierarchy.enabled else []
    sidecar = _inbound_sidecar(spec, *roles, "--operator-upstream", f"127.0.0.1:{STATUS_PORT}")
    lbls = labels(job.name, "aggregator", **{ROLE_LABEL: "aggregator"})
    return _pod(job, aggregator_pod_name(job.name), lbls, "OnFailure",
                spec.placement.aggregator_node_selector, sidecar, fl,
                _volumes(job.name, AGGREGATOR_NODE_ID, restore, _tls13(spec)))


def _aggregator_peer(job: JobRef) -> str:
    return f"{aggregator_service_name(job.name)}.{job.namespace}.svc:{PQC_PORT}"


def edge_pod(job: JobRef, spec: FederationJobSpec, edge: int) -> Manifest:
    """An edge aggregator (hierarchical jobs, services/edge.py): SuperLink + edge ServerApp for
    its member clients and a SuperNode towards the aggregator, behind ONE sidecar that both
    accepts the clients' PQC channels and routes the edge's own channel to the aggregator."""
    fl_cmd = ["pqfed", "fl", "edge", "--spec", f"{JOB_DIR}/{SPEC_FILE}", "--index", str(edge),
              "--identity-dir", IDENTITY_DIR, "--state-dir", STATE_DIR,
              "--fleet-port", str(FLEET_PORT), "--superlink", f"127.0.0.1:{ROUTE_PORT}",
              "--runtime-port", str(RUNTIME_PORT)]
    fl = _container("fl", spec, fl_cmd, FL_RESOURCES,
                    [_IDENTITY_MOUNT, _JOB_MOUNT, _STATE_MOUNT])
    sidecar = _inbound_sidecar(spec, "--route", f"127.0.0.1:{ROUTE_PORT}="
                               f"{_aggregator_peer(job)}@{AGGREGATOR_NODE_ID}")
    lbls = labels(job.name, "edge", **{ROLE_LABEL: "edge", INDEX_LABEL: str(edge)})
    return _pod(job, edge_pod_name(job.name, edge), lbls, "Always",
                spec.placement.aggregator_node_selector, sidecar, fl,
                _volumes(job.name, edge_node_id(edge), False, _tls13(spec)))


def client_pod(job: JobRef, spec: FederationJobSpec, index: int) -> Manifest:
    """SuperNode + ClientApp (`fl`) dialling the aggregator (or, in hierarchical jobs, its
    edge aggregator) through its sidecar's route."""
    node_id = client_node_id(index)
    fl_cmd = ["pqfed", "fl", "client", "--spec", f"{JOB_DIR}/{SPEC_FILE}",
              "--index", str(index), "--identity-dir", IDENTITY_DIR, "--state-dir", STATE_DIR,
              "--superlink", f"127.0.0.1:{ROUTE_PORT}", "--runtime-port", str(RUNTIME_PORT)]
    fl = _container("fl", spec, fl_cmd, FL_RESOURCES,
                    [_IDENTITY_MOUNT, _JOB_MOUNT, _STATE_MOUNT])
    peer, peer_id = _aggregator_peer(job), AGGREGATOR_NODE_ID
    if spec.hierarchy.enabled:
        e = edge_of(index, spec.hierarchy.edges)
        peer = f"{edge_service_name(job.name, e)}.{job.namespace}.svc:{PQC_PORT}"
        peer_id = edge_node_id(e)
    sidecar_cmd = ["pqfed", "sidecar", *_identity_args(spec), *_groups(spec),
                   "--route", f"127.0.0.1:{ROUTE_PORT}={peer}@{peer_id}",
                   "--admin", f"127.0.0.1:{ADMIN_PORT}"]
    sidecar = _container("sidecar", spec, sidecar_cmd, SIDECAR_RESOURCES,
                         [_IDENTITY_MOUNT])
    lbls = labels(job.name, "client", **{ROLE_LABEL: "client", INDEX_LABEL: str(index)})
    extra: Manifest = {}
    if spec.placement.spread:
        # One hospital per node where possible; nodes that are tainted away (NotReady) do
        # not count as domains, so a lost node does not block rescheduling.
        extra["topologySpreadConstraints"] = [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule", "nodeTaintsPolicy": "Honor",
            "labelSelector": {"matchLabels": selector_labels(job.name, "client")},
        }]
    return _pod(job, client_pod_name(job.name, index), lbls, "Always",
                spec.placement.node_selector, sidecar, fl,
                _volumes(job.name, node_id, False, _tls13(spec)), **extra)
