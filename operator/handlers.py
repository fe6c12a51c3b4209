"""The kopf wiring of the FederationJob operator: observe, decide (reconcile.py), apply.

Handlers stay thin. Each one lists the job's children, asks a pure function of reconcile.py
for a `Plan` and applies it: issue Secrets, create what is missing (409 = someone, e.g. a
replica that was just replaced, already did), delete lost pods, patch status, post Events.

- on.create / on.resume: validate, create the children, phase Running.
- timer (every TICK_S while Running): copy the aggregator's progress into status, store each
  new round's checkpoint in a Secret, recreate lost pods, detect success/failure/cancel. The
  aggregator is read through its PQC sidecar with the job's operator identity
  (aggregator_api.py).
- on.delete (finalizer pqfed.io/cleanup): delete every child and wait until they are gone.

`run_operator(args)` is `pqfed operator run`.

It stays one module past our ~500-line habit because it is the operator's whole I/O edge:
every kopf handler and the client calls that apply a plan, around one `OperatorContext`; the
decisions themselves are in reconcile.py.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Final

import kopf

from pqfed.operator import enrolment, identities, reconcile
from pqfed.operator import pods as m
from pqfed.operator.aggregator_api import (
    MAX_CHECKPOINT_BYTES,
    AggregatorEndpoint,
    AggregatorUnreachable,
    fetch_checkpoint,
    fetch_status,
    operator_tls_context,
)
from pqfed.operator.kube import load_configuration
from pqfed.operator.metrics import OperatorMetrics, serve_http
from pqfed.pqc import (
    Certificate,
    CertificateError,
    DecodeError,
    Group,
    Identity,
    Role,
    TrustAnchor,
)
from pqfed.pqc.pki import IssuancePolicy, sign_request
from pqfed.pqc.pki.profile import certificate_pem, load_certificate_pem
from pqfed.pqc.tls13 import TlsContext
from pqfed.pqc.truststore import CRL_FILE
from pqfed.services import API_GROUP, API_VERSION, JOB_LABEL, NODE_LABEL, PLURAL, FederationJobSpec

FINALIZER: Final = "pqfed.io/cleanup"
TICK_S: Final = 3.0
FORCE_DELETE_AFTER_S: Final = 90.0  # pods of a dead node never finish terminating

log = logging.getLogger("pqfed.operator")


@dataclass
class OperatorContext:
    """kopf's memo: what every handler shares."""

    kubeconfig: str | None = None
    job_defaults: dict[str, str] = field(default_factory=dict)
    metrics_port: int = 8080
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    core: Any = None  # kubernetes.client.CoreV1Api
    networking: Any = None  # kubernetes.client.NetworkingV1Api
    configuration: Any = None  # kubernetes.client.Configuration
    # Per job uid: the operator's identity in that job's federation and the job's CA, and
    # for tls13 jobs its TLS 1.3 client context (X.509 identity and CA).
    identities: dict[str, tuple[Identity, TrustAnchor, TlsContext | None]] = field(
        default_factory=dict)
    started: bool = False
    http_runner: Any = None


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- connection -----------------------------------------------------------------------------
def kube_configuration(kubeconfig: str | None) -> Any:
    """A client configuration by kube.load_configuration's precedence."""
    from kubernetes import client

    cfg = client.Configuration()
    load_configuration(kubeconfig, cfg)
    cfg.connection_pool_maxsize = 16
    return cfg


def connection_info(cfg: Any) -> kopf.ConnectionInfo:
    """kopf's credentials from a kubernetes client configuration (as kopf.login_via_client
    does, but for the configuration we chose, not kopf's own in-cluster-first guess)."""
    header = cfg.get_api_key_with_prefix("BearerToken") or \
        cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else \
        (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
        username=cfg.username or None, password=cfg.password or None, scheme=scheme,
        token=token, certificate_path=cfg.cert_file, private_key_path=cfg.key_file,
        trust_env=False)


# ---- observe --------------------------------------------------------------------------------
def _items(response: Any) -> list[dict[str, Any]]:
    data = json.loads(response.data)
    items: list[dict[str, Any]] = data.get("items") or []
    return items


def _owned(obj: dict[str, Any], job: m.JobRef) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == job.uid for r in refs)


def _name(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["name"])


def list_children(ctx: OperatorContext, job: m.JobRef) -> dict[str, list[dict[str, Any]]]:
    """The job's Secrets, ConfigMaps, Services, NetworkPolicies and Pods (raw JSON), owned by
    this uid."""
    sel = f"{JOB_LABEL}={job.name}"
    core = ctx.core
    calls = {"secrets": core.list_namespaced_secret,
             "configmaps": core.list_namespaced_config_map,
             "services": core.list_namespaced_service,
             "networkpolicies": ctx.networking.list_namespaced_network_policy,
             "pods": core.list_namespaced_pod}
    out: dict[str, list[dict[str, Any]]] = {}
    for kind, call in calls.items():
        items = _items(call(job.namespace, label_selector=sel, _preload_content=False))
        out[kind] = [o for o in items if _owned(o, job)]
    return out


def _keys_only(secret: dict[str, Any]) -> dict[str, Any]:
    """Keeps the checkpoint's keys, not its bytes (the plan only needs which round it is)."""
    return {**secret, "data": dict.fromkeys(secret.get("data") or {}, "")}


def aggregator_endpoint(ctx: OperatorContext, job: m.JobRef, spec: FederationJobSpec,
                        pod: dict[str, Any] | None) -> AggregatorEndpoint | None:
    """How to reach the job's aggregator through its sidecar, as the job's operator identity;
    None while the pod has no IP or the identity is not issued yet."""
    ip = ((pod or {}).get("status") or {}).get("podIP")
    if not ip:
        return None
    if job.uid not in ctx.identities:
        name = m.identity_secret_name(job.name, m.OPERATOR_NODE_ID)
        try:
            data = _secret_data(ctx.core, job.namespace, name)
        except Exception as exc:  # not issued yet (404), or RBAC: try again next tick
            log.info("job %s/%s: operator identity %s: %s", job.namespace, job.name, name, exc)
            return None
        tls = None
        if spec.channel.protocol == "tls13":  # the aggregator's sidecar speaks TLS 1.3 only
            if identities.X509_CERT_KEY not in data:
                log.warning("job %s/%s: %s has no X.509 identity for the tls13 channel",
                            job.namespace, job.name, name)
                return None
            tls = operator_tls_context(data[identities.X509_CERT_KEY],
                                       data[identities.X509_KEY_KEY],
                                       data[identities.X509_CA_KEY])
        ctx.identities[job.uid] = (Identity.load(data["tls.crt"], data["tls.key"]),
                                   TrustAnchor(Certificate.from_pem(data["ca.crt"])), tls)
    identity, trust, tls = ctx.identities[job.uid]
    groups = ((Group.X25519_MLKEM1024,) if spec.crypto.kem == "ML-KEM-1024"
              else (Group.X25519_MLKEM768,))
    return AggregatorEndpoint(ip, m.PQC_PORT, identity, trust, groups=groups, tls=tls)


def _decoded(secret: dict[str, Any] | None, key: str) -> str | None:
    value = ((secret or {}).get("data") or {}).get(key)
    if not value:
        return None
    try:
        return base64.b64decode(value).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def observe_credentials(job: m.JobRef, secrets: dict[str, dict[str, Any]]
                        ) -> tuple[dict[str, reconcile.CertState], reconcile.CrlState | None]:
    """The node certificates in the job's identity Secrets, and the published revocation list
    if the job's CA signed it (anything else counts as missing and is republished)."""
    certs: dict[str, reconcile.CertState] = {}
    for name, sec in secrets.items():
        node = ((sec.get("metadata") or {}).get("labels") or {}).get(NODE_LABEL)
        pem = _decoded(sec, "tls.crt")
        if not node or pem is None or name != m.identity_secret_name(job.name, node):
            continue
        try:
            cert = Certificate.from_pem(pem)
            prev_pem = _decoded(sec, identities.PREVIOUS_CERT_KEY)
            prev = Certificate.from_pem(prev_pem).serial if prev_pem else None
        except DecodeError as exc:
            log.warning("job %s/%s: Secret %s: %s", job.namespace, job.name, name, exc)
            continue
        x509_data = {k: v for k in (identities.X509_CERT_KEY, identities.X509_PREVIOUS_CERT_KEY)
                     if (v := _decoded(sec, k)) is not None}
        certs[node] = reconcile.CertState(cert.serial, cert.not_before, cert.not_after, prev,
                                          identities.x509_serials(x509_data))
    crl_state = None
    ca_secret = secrets.get(m.ca_secret_name(job.name))
    root_pem = _decoded(ca_secret, "ca.crt")
    crl_secret = secrets.get(m.crl_secret_name(job.name))
    crl_pem = _decoded(crl_secret, identities.CRL_KEY)
    if root_pem and crl_pem:
        crl = identities.read_crl({identities.CRL_KEY: crl_pem}, Certificate.from_pem(root_pem))
        if crl is not None:
            crl_state = reconcile.CrlState(crl.number, crl.this_update, crl.next_update,
                                           crl.serials, _x509_crl_serials(ca_secret, crl_secret))
    return certs, crl_state


def _x509_crl_serials(ca_secret: dict[str, Any] | None, crl_secret: dict[str, Any] | None
                      ) -> frozenset[int] | None:
    """The published X.509 CRL's serials if the job's X.509 CA signed it (tls13 jobs)."""
    root_pem = _decoded(ca_secret, identities.X509_CA_KEY)
    crl_pem = _decoded(crl_secret, identities.X509_CRL_KEY)
    if root_pem is None or crl_pem is None:
        return None
    try:
        root = load_certificate_pem(root_pem, "root")
    except CertificateError:
        return None
    return identities.read_x509_crl({identities.X509_CRL_KEY: crl_pem}, root)


def observe(ctx: OperatorContext, job: m.JobRef, spec: FederationJobSpec | None = None
            ) -> reconcile.Observed:
    """The job's children; with `spec`, also the aggregator's /status (if it answers)."""
    children = list_children(ctx, job)
    pods = {_name(p): p for p in children["pods"]}
    agg_status = None
    agg_pod = pods.get(m.aggregator_pod_name(job.name))
    phase = ((agg_pod or {}).get("status") or {}).get("phase")
    endpoint = (aggregator_endpoint(ctx, job, spec, agg_pod)
                if spec is not None and phase in ("Pending", "Running") else None)
    if endpoint is not None:
        try:
            agg_status = fetch_status(endpoint, job.name)
        except AggregatorUnreachable as exc:
            log.debug("job %s/%s: aggregator status: %s", job.namespace, job.name, exc)
    secrets = {_name(s): s for s in children["secrets"]}
    checkpoint = secrets.get(m.checkpoint_secret_name(job.name))
    certificates, crl = observe_credentials(job, secrets)
    configmaps = {_name(c): c for c in children["configmaps"]}
    return reconcile.Observed(
        certificates=certificates, crl=crl,
        external_certificates=enrolment.published_serials(job.name, configmaps),
        secrets=frozenset(secrets),
        configmaps=configmaps,
        services=frozenset(_name(s) for s in children["services"]),
        network_policies=frozenset(_name(p) for p in children["networkpolicies"]),
        checkpoint=_keys_only(checkpoint) if checkpoint else None,
        pods=pods, aggregator=agg_status)


# ---- apply ----------------------------------------------------------------------------------
def _create(ctx: OperatorContext, obj: dict[str, Any]) -> bool:
    """Creates `obj`; False if it already exists (created concurrently)."""
    from kubernetes.client.exceptions import ApiException

    core = ctx.core
    create = {"Secret": core.create_namespaced_secret,
              "ConfigMap": core.create_namespaced_config_map,
              "Service": core.create_namespaced_service,
              "NetworkPolicy": ctx.networking.create_namespaced_network_policy,
              "Pod": core.create_namespaced_pod}[obj["kind"]]
    try:
        create(obj["metadata"]["namespace"], obj)
    except ApiException as exc:
        if exc.status == 409:
            return False
        if exc.status in (400, 422):  # 403 (RBAC, quota) may pass: retried
            raise kopf.PermanentError(
                f"{obj['kind']} {obj['metadata']['name']}: {_api_message(exc)}") from None
        raise
    return True


def _api_message(exc: Any) -> str:
    try:
        return str(json.loads(exc.body).get("message", exc.reason))
    except (TypeError, ValueError):
        return str(exc.reason)


def _secret_data(core: Any, namespace: str, name: str) -> dict[str, str]:
    sec = core.read_namespaced_secret(name, namespace)
    return {k: base64.b64decode(v).decode() for k, v in (sec.data or {}).items()}


def issue_secrets(ctx: OperatorContext, job: m.JobRef, spec: FederationJobSpec,
                  wanted: list[reconcile.SecretToIssue]) -> None:
    """Issues missing identity Secrets. The CA is created once and then always read back from
    its Secret, so identities issued by concurrent replicas all chain to the one stored CA."""
    algorithm = spec.crypto.signature
    lifetime = spec.crypto.certificate_lifetime_seconds
    core = ctx.core
    tls13 = spec.channel.protocol == "tls13"
    for s in wanted:
        if s.node_id is None and not s.crl:
            data = identities.issue_ca(job.name, algorithm, x509_ca=tls13)
            _create(ctx, m.secret(job, s.name, data, "ca"))
    ca = x509_ca = None
    for s in wanted:
        if s.node_id is None and not s.crl:
            continue
        if ca is None:
            ca_data = _secret_data(core, job.namespace, m.ca_secret_name(job.name))
            ca, x509_ca = identities.load_ca(ca_data), identities.load_x509_ca(ca_data)
        if s.crl:  # the first list: nothing revoked yet
            data = identities.next_crl(ca, None, (), int(time.time()), lifetime,
                                       x509_ca=x509_ca)
            _create(ctx, m.secret(job, s.name, data, "crl"))
            continue
        assert s.node_id is not None and s.role is not None
        data = identities.issue_identity(ca, s.node_id, s.role, algorithm, lifetime,
                                         x509_ca=x509_ca)
        _create(ctx, m.secret(job, s.name, data, "identity", s.node_id))


def update_credentials(ctx: OperatorContext, job: m.JobRef, spec: FederationJobSpec,
                       plan: reconcile.Plan) -> None:
    """Publishes the next revocation list and renews identities (patching their Secrets; the
    kubelet swaps the files in the pods, the sidecars and `fl` re-read them)."""
    if plan.crl is None and not plan.renew:
        return
    core = ctx.core
    ca_data = _secret_data(core, job.namespace, m.ca_secret_name(job.name))
    ca, x509_ca = identities.load_ca(ca_data), identities.load_x509_ca(ca_data)
    lifetime = spec.crypto.certificate_lifetime_seconds
    if plan.crl is not None:
        name = m.crl_secret_name(job.name)
        try:
            crl_data = _secret_data(core, job.namespace, name)
        except Exception:  # absent (404): a new list, numbered from the clock
            crl_data = {}
        previous = identities.read_crl(crl_data, ca.root)
        x509_previous = (identities.read_x509_crl(crl_data, x509_ca.certificate) or frozenset()
                         if x509_ca is not None else frozenset())
        data = identities.next_crl(ca, previous, plan.crl.revoke, int(time.time()), lifetime,
                                   x509_ca=x509_ca, x509_previous=x509_previous,
                                   x509_revoke=plan.crl.revoke_x509)
        body = m.secret(job, name, data, "crl")
        if not _create(ctx, body):
            core.patch_namespaced_secret(name, job.namespace, {"stringData": data})
        log.info("job %s/%s: revocation list published (%s)", job.namespace, job.name,
                 plan.crl.why)
    for s in plan.renew:
        assert s.node_id is not None and s.role is not None
        old = _secret_data(core, job.namespace, s.name)
        replaced = Certificate.from_pem(old["tls.crt"])
        x509_replaced = (load_certificate_pem(old[identities.X509_CERT_KEY])
                         if identities.X509_CERT_KEY in old else None)
        data = identities.issue_identity(ca, s.node_id, s.role, spec.crypto.signature,
                                         lifetime, replaced, x509_ca=x509_ca,
                                         x509_previous=x509_replaced)
        core.patch_namespaced_secret(s.name, job.namespace, {"stringData": data})
        if s.node_id == m.OPERATOR_NODE_ID:
            ctx.identities.pop(job.uid, None)  # read the renewed one on next use


def delete_pod(core: Any, namespace: str, name: str, grace: int | None = None) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace)
    except ApiException as exc:
        if exc.status != 404:
            raise


def apply_plan(ctx: OperatorContext, body: Any, job: m.JobRef,
               spec: FederationJobSpec | None, plan: reconcile.Plan) -> None:
    if plan.issue and spec is not None:
        issue_secrets(ctx, job, spec, plan.issue)
    for obj in plan.create:
        _create(ctx, obj)
    for name in plan.delete_pods:
        delete_pod(ctx.core, job.namespace, name)
    for ev in plan.events:
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message[:1024])
    for role in plan.recreated:
        ctx.metrics.recreated.labels(role).inc()
    if plan.new_rounds:
        ctx.metrics.rounds.inc(plan.new_rounds)


def save_checkpoint(ctx: OperatorContext, job: m.JobRef, spec: FederationJobSpec,
                    observed: reconcile.Observed, status: dict[str, Any], now: str
                    ) -> dict[str, Any]:
    """Stores the aggregator's last completed round in Secret NAME-checkpoint; returns a
    status patch (Checkpointed condition) or {} if it should be tried again next tick."""
    from kubernetes.client.exceptions import ApiException

    endpoint = aggregator_endpoint(ctx, job, spec,
                                   observed.pods.get(m.aggregator_pod_name(job.name)))
    if endpoint is None:
        return {}
    try:
        ckpt = fetch_checkpoint(endpoint, job.name)
    except AggregatorUnreachable as exc:
        log.info("job %s/%s: checkpoint not fetched: %s", job.namespace, job.name, exc)
        return {}
    if ckpt is None:
        return {}
    name = m.checkpoint_secret_name(job.name)
    if len(ckpt.data) > MAX_CHECKPOINT_BYTES:
        return reconcile.checkpoint_status(
            status, ckpt.round, False,
            f"round {ckpt.round} checkpoint is {len(ckpt.data)} bytes, more than a Secret "
            "holds; a lost aggregator restarts from the last stored round", now)
    existing = observed.checkpoint
    previous = list((existing or {}).get("data") or {})
    body = m.checkpoint_secret(job, ckpt.round, ckpt.data, ckpt.status, previous)
    try:
        if existing is None:
            body["data"] = {k: v for k, v in body["data"].items() if v is not None}
            if not _create(ctx, body):
                return {}
        else:
            ctx.core.patch_namespaced_secret(name, job.namespace, body)
    except ApiException as exc:
        log.warning("job %s/%s: checkpoint Secret: %s", job.namespace, job.name,
                    _api_message(exc))
        return {}
    ctx.metrics.checkpoints.inc()
    return reconcile.checkpoint_status(
        status, ckpt.round, True,
        f"round {ckpt.round} stored in Secret {name} ({len(ckpt.data)} bytes)", now)


def enrol(ctx: OperatorContext, body: Any, job: m.JobRef, spec: FederationJobSpec,
          annotations: dict[str, str], status: dict[str, Any], observed: reconcile.Observed,
          now: str) -> dict[str, Any]:
    """Site-held-key enrolment (enrolment.py): reads the job's request ConfigMaps, issues the
    approved ones with the job's X.509 CA; returns the Enrolment condition patch."""
    response = ctx.core.list_namespaced_config_map(
        job.namespace, label_selector=f"{enrolment.CSR_LABEL}={job.name}",
        _preload_content=False)
    prefix = enrolment.request_configmap_name(job.name, "")
    requests = {_name(cm)[len(prefix):]: (cm.get("data") or {}).get(enrolment.CSR_KEY)
                for cm in _items(response) if _name(cm).startswith(prefix)}
    issued = frozenset(n for n in requests if enrolment.certificate_configmap_name(
        job.name, n) in observed.configmaps)
    plan = enrolment.plan_enrolment(job.name, spec, requests, annotations, issued, status, now)
    crl: dict[str, str] = {}
    if issued or plan.to_issue:
        crl = _secret_data(ctx.core, job.namespace, m.crl_secret_name(job.name))
    # The CRL snapshot in every published JOB-cert-NODE follows the job's X.509 CRL.
    for name in enrolment.stale_crl_snapshots(job.name, observed.configmaps,
                                              crl.get(identities.X509_CRL_KEY, "")):
        ctx.core.patch_namespaced_config_map(name, job.namespace, {"data": {
            CRL_FILE: crl[identities.X509_CRL_KEY]}})
        log.info("job %s/%s: CRL snapshot in %s refreshed", job.namespace, job.name, name)
    if plan.to_issue:
        ca_data = _secret_data(ctx.core, job.namespace, m.ca_secret_name(job.name))
        x509_ca = identities.load_x509_ca(ca_data)
        assert x509_ca is not None  # decide() refuses requests of pqfed1 jobs
        for d in plan.to_issue:
            assert d.csr is not None
            cert = sign_request(x509_ca, d.csr, IssuancePolicy(
                roles=(Role.CLIENT,), node_id=d.node_id,
                validity_s=spec.crypto.certificate_lifetime_seconds))
            _create(ctx, enrolment.certificate_configmap(
                job, d.node_id, certificate_pem(cert).decode(),
                ca_data[identities.X509_CA_KEY], crl.get(identities.X509_CRL_KEY, ""), spec))
            log.info("job %s/%s: issued %s serial %#x for an enrolled site key", job.namespace,
                     job.name, d.node_id, cert.serial_number)
    for ev in plan.events:
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message[:1024])
    return {"conditions": plan.conditions} if plan.conditions is not None else {}


def _job_args(body: Any) -> tuple[m.JobRef, dict[str, Any], dict[str, Any], int | None,
                                  dict[str, str]]:
    job = m.JobRef.from_body(body)
    raw_spec = json.loads(json.dumps(dict(body.get("spec") or {})))
    status = json.loads(json.dumps(dict(body.get("status") or {})))
    meta = body["metadata"]
    annotations = dict(meta.get("annotations") or {})
    return job, raw_spec, status, meta.get("generation"), annotations


def _patch_status(patch: Any, changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        patch.status[key] = value


# ---- handlers -------------------------------------------------------------------------------
@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: Any, logger: Any,
                    **_: Any) -> None:
    # The RBAC grants no access to CRDs or namespaces: watch what we are told, scan nothing.
    settings.scanning.disabled = True
    # Our own Events (kopf.event) are always posted; of kopf's log lines only warnings and
    # errors become Events (a per-tick "Timer succeeded" would flood the job's Events).
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING
    settings.persistence.finalizer = FINALIZER
    # The CRD's status schema has no room for kopf's bookkeeping: keep it in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix="kopf.pqfed.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kopf.pqfed.io", key="last-handled-configuration")
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    from kubernetes import client

    ctx: OperatorContext = memo
    ctx.configuration = kube_configuration(ctx.kubeconfig)
    api = client.ApiClient(ctx.configuration)
    ctx.core = client.CoreV1Api(api)
    ctx.networking = client.NetworkingV1Api(api)
    ctx.http_runner = await serve_http(ctx.metrics_port, ctx.metrics, lambda: ctx.started)
    ctx.started = True
    logger.info("pqfed operator ready: /healthz and /metrics on :%d", ctx.metrics_port)


@kopf.on.cleanup()
async def shutdown(memo: Any, **_: Any) -> None:
    ctx: OperatorContext = memo
    ctx.started = False
    if ctx.http_runner is not None:
        await ctx.http_runner.cleanup()


@kopf.on.login()
def login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
    ctx: OperatorContext = memo
    return connection_info(kube_configuration(ctx.kubeconfig))


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
def start_job(body: Any, patch: Any, memo: Any, logger: Any, **_: Any) -> None:
    ctx: OperatorContext = memo
    job, raw_spec, status, generation, annotations = _job_args(body)
    spec = reconcile.validate(job.name, raw_spec, ctx.job_defaults,
                              status.get(reconcile.CHANNEL_PROTOCOL))
    try:
        observed = observe(ctx, job)
        plan = reconcile.plan_start(job, raw_spec, status, observed, now_rfc3339(),
                                    generation=generation, annotations=annotations,
                                    defaults=ctx.job_defaults)
        apply_plan(ctx, body, job, spec if isinstance(spec, FederationJobSpec) else None, plan)
    except kopf.PermanentError as exc:
        plan = _refused(ctx, body, status, str(exc))
    except Exception as exc:
        ctx.metrics.reconciles.labels("start", "retry").inc()
        raise kopf.TemporaryError(f"starting {job.name}: {exc}", delay=5) from exc
    _patch_status(patch, plan.status)
    ctx.metrics.job_phase(job.uid, plan.status.get("phase", status.get("phase")))
    if plan.permanent_error:
        ctx.metrics.reconciles.labels("start", "failed").inc()
        raise kopf.PermanentError(f"FederationJob {job.name}: {plan.permanent_error}")
    ctx.metrics.reconciles.labels("start", "ok").inc()


def _refused(ctx: OperatorContext, body: Any, status: dict[str, Any],
             message: str) -> reconcile.Plan:
    """The API server refused a child for good: the job fails, saying why."""
    plan = reconcile.plan_failed(status, "ChildRefused", message, now_rfc3339())
    for ev in plan.events:
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message[:1024])
    return plan


def _running(status: Any, **_: Any) -> bool:
    return bool((status or {}).get("phase") == "Running")


@kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=TICK_S, initial_delay=1.0,
            when=_running)
def monitor_job(body: Any, patch: Any, memo: Any, logger: Any, **_: Any) -> None:
    ctx: OperatorContext = memo
    job, raw_spec, status, _generation, annotations = _job_args(body)
    spec = reconcile.validate(job.name, raw_spec, ctx.job_defaults,
                              status.get(reconcile.CHANNEL_PROTOCOL))
    if not isinstance(spec, FederationJobSpec):
        return  # on.create reported it
    now = now_rfc3339()
    try:
        observed = observe(ctx, job, spec)
        plan = reconcile.plan_tick(job, spec, status, observed, now, annotations=annotations,
                                   clock=int(time.time()))
        update_credentials(ctx, job, spec, plan)
        apply_plan(ctx, body, job, spec, plan)
        changes = dict(plan.status)
        if plan.save_checkpoint:
            changes.update(save_checkpoint(ctx, job, spec, observed, {**status, **changes},
                                           now))
        changes.update(enrol(ctx, body, job, spec, annotations, {**status, **changes},
                             observed, now))
    except kopf.PermanentError as exc:
        changes = _refused(ctx, body, status, str(exc)).status
    except Exception as exc:
        ctx.metrics.reconciles.labels("monitor", "retry").inc()
        logger.warning("reconcile of %s failed, retrying: %s", job.name, exc)
        return
    _patch_status(patch, changes)
    ctx.metrics.job_phase(job.uid, changes.get("phase", status.get("phase")))
    ctx.metrics.reconciles.labels("monitor", "ok").inc()


@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
def spec_changed(body: Any, patch: Any, memo: Any, old: Any, new: Any, **_: Any) -> None:
    """A job's pods are built from the spec it started with; a later edit does not move them
    (reconcile.plan_spec_change; a protocol change is refused by name)."""
    ctx: OperatorContext = memo
    status = json.loads(json.dumps(dict(body.get("status") or {})))
    plan = reconcile.plan_spec_change(
        status, json.loads(json.dumps(dict(old or {}))), json.loads(json.dumps(dict(new or {}))),
        body["metadata"].get("generation"), now_rfc3339(), ctx.job_defaults)
    for ev in plan.events:
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message[:1024])
    _patch_status(patch, plan.status)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL)
def cleanup_job(body: Any, memo: Any, logger: Any, runtime: dt.timedelta,
                **_: Any) -> None:
    """Deletes every child, then waits until they are gone (pods take their grace period);
    only then does kopf remove the finalizer."""
    from kubernetes.client.exceptions import ApiException

    ctx: OperatorContext = memo
    job = m.JobRef.from_body(body)
    core = ctx.core
    children = list_children(ctx, job)
    left = sum(len(v) for v in children.values())
    if not left:
        ctx.identities.pop(job.uid, None)
        ctx.metrics.job_phase(job.uid, None)
        ctx.metrics.reconciles.labels("delete", "ok").inc()
        return
    force = runtime.total_seconds() > FORCE_DELETE_AFTER_S
    deletes = {"secrets": core.delete_namespaced_secret,
               "configmaps": core.delete_namespaced_config_map,
               "services": core.delete_namespaced_service,
               "networkpolicies": ctx.networking.delete_namespaced_network_policy}
    for pod in children["pods"]:
        if force or not pod["metadata"].get("deletionTimestamp"):
            delete_pod(core, job.namespace, _name(pod), 0 if force else None)
    for kind, call in deletes.items():
        for obj in children[kind]:
            try:
                call(_name(obj), job.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
    raise kopf.TemporaryError(f"waiting for {left} child object(s) of {job.name} to go",
                              delay=2)


# ---- entry point ----------------------------------------------------------------------------
class _QuietTimer(logging.Filter):
    """Drops kopf's per-tick "Timer 'monitor_job' succeeded." (every TICK_S per job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and
                    record.getMessage().startswith("Timer 'monitor_job' succeeded"))


def run_operator(args: argparse.Namespace) -> int:
    """`pqfed operator run`: kopf in this process until SIGTERM/SIGINT."""
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf.objects").addFilter(_QuietTimer())
    namespaces = [ns for ns in (args.namespace or []) if ns]
    if args.all_namespaces and namespaces:
        raise ValueError("--all-namespaces and --namespace exclude each other")
    ctx = OperatorContext(
        kubeconfig=args.kubeconfig or None,  # kube.load_configuration: then $KUBECONFIG
        job_defaults=reconcile.parse_job_defaults(os.environ.get("PQFED_JOB_DEFAULTS")),
        metrics_port=args.metrics_port)
    peering: dict[str, Any] = {"standalone": True}
    if args.peering:
        # Equal priorities make kopf pause every replica; a random one elects one active.
        peering = {"standalone": False, "peering_name": args.peering,
                   "priority": random.randint(1, 2**31 - 1)}
    kopf.run(clusterwide=not namespaces, namespaces=namespaces, memo=ctx, **peering)
    return 0
