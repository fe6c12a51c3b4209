"""The FederationJob operator's decisions, as pure functions.

(job, spec, status, observed children, aggregator status) -> a `Plan`: which Secrets to issue,
which objects to create, which pods to delete, the status patch and the Events to post. No
Kubernetes client, no clock, no network: handlers.py observes, calls these and applies the plan,
so every decision here is unit-tested without a cluster (tests/operator/test_reconcile.py) and
re-running a plan against what it created creates nothing twice.

It stays one module past our ~500-line habit because every decision about a job (children,
lost pods, checkpoints, revocations, status, Events) is a function of the same observations
into the same `Plan`; together they are one decision table, read and tested as one.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pqfed.operator import pods as m
from pqfed.pqc import RevocationReason, Role
from pqfed.services import OPERATOR_ONLY, FederationJobSpec, JobSpecError, parse_spec

Manifest = dict[str, Any]

TERMINAL: Final = frozenset({"Succeeded", "Failed", "Cancelled"})
CANCEL_ANNOTATION: Final = "pqfed.io/cancel"
# `revoke.pqfed.io/<node id>: <reason>`: one annotation per revoked node, so that `pqfed revoke`
# adds one with a merge patch and never races another revocation (operator/cli.py).
REVOKE_PREFIX: Final = "revoke.pqfed.io/"
# Renew a node certificate (and re-sign the revocation list) once this much of its lifetime
# has passed: the remaining third covers an operator outage and the kubelet's volume resync.
RENEW_AT: Final = 2 / 3
MAX_STATUS_ROUNDS: Final = 100  # the CRD's rounds[] has no maxItems; objects stay small
# `fl` restarts (OnFailure, resuming from its state dir) before the job is declared Failed.
AGGREGATOR_MAX_RESTARTS: Final = 3
# Pod `status.reason`s that mean the node went away, not that the workload failed.
LOST_REASONS: Final = frozenset({"Terminated", "Evicted", "NodeLost", "Shutdown",
                                 "NodeShutdown", "NodeAffinity", "UnexpectedAdmissionError"})
ROUND_INT_KEYS: Final = ("round", "bytesSent", "bytesReceived", "rejectedUpdates")
ROUND_FLOAT_KEYS: Final = ("accuracy", "loss", "cryptoSeconds", "durationSeconds")
CRYPTO_DEFAULT_KEYS: Final = ("kem", "signature", "aead", "backend")
# The chart's `jobDefaults.channelProtocol`: the default of spec.channel.protocol.
CHANNEL_DEFAULT_KEY: Final = "channelProtocol"
DEFAULT_KEYS: Final = (*CRYPTO_DEFAULT_KEYS, CHANNEL_DEFAULT_KEY)
# A Service name is a DNS label (63); the aggregator's is NAME-aggregator.
MAX_JOB_NAME: Final = 63 - len("-aggregator")
_DATE_TIME: Final = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_RECREATED_MAX_CHARS: Final = 2000

# Condition types written to status.conditions (metav1.Condition).
VALID: Final = "Valid"
AGGREGATOR_READY: Final = "AggregatorReady"
CLIENTS_READY: Final = "ClientsReady"
ROUND_PROGRESS: Final = "RoundProgress"
CHECKPOINTED: Final = "Checkpointed"
PODS_RECREATED: Final = "PodsRecreated"
COMPLETE: Final = "Complete"
NODES_REVOKED: Final = "NodesRevoked"
# status.channelProtocol: the protocol the job started with, kept for its whole life.
CHANNEL_PROTOCOL: Final = "channelProtocol"


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class SecretToIssue:
    """A Secret whose keys the wiring must generate (node_id None: the federation CA)."""

    name: str
    node_id: str | None = None
    role: Role | None = None
    crl: bool = False  # the job CA's revocation list (node_id None too)


@dataclass(frozen=True)
class CertState:
    """What the operator needs to know of one issued node certificate (identity Secret)."""

    serial: int
    not_before: int
    not_after: int
    previous_serial: int | None = None  # the certificate this one renewed (maybe still valid)
    x509_serials: tuple[int, ...] = ()  # tls13 jobs: its X.509 twin (and the one renewed)


@dataclass(frozen=True)
class CrlState:
    """The published revocation list (verified against the job's CA by the wiring)."""

    number: int
    this_update: int
    next_update: int
    serials: frozenset[int] = frozenset()
    # tls13 jobs: the serials of the X.509 CRL beside it (None: missing or not the CA's).
    x509_serials: frozenset[int] | None = None


@dataclass(frozen=True)
class CrlUpdate:
    """Publish the next revocation list: the current entries plus `revoke` (serial, reason),
    and for tls13 jobs the X.509 CRL: its current serials plus `revoke_x509`."""

    revoke: tuple[tuple[int, RevocationReason], ...] = ()
    why: str = ""
    revoke_x509: tuple[int, ...] = ()


@dataclass(frozen=True)
class Observed:
    """What exists of a job's children (by name), and the aggregator's /status if reachable."""

    secrets: frozenset[str] = frozenset()
    configmaps: Mapping[str, Manifest] = field(default_factory=dict)
    services: frozenset[str] = frozenset()
    pods: Mapping[str, Manifest] = field(default_factory=dict)
    aggregator: Manifest | None = None
    network_policies: frozenset[str] = frozenset()
    checkpoint: Manifest | None = None  # the checkpoint Secret (its keys; values dropped)
    certificates: Mapping[str, CertState] = field(default_factory=dict)  # by node id
    crl: CrlState | None = None
    # External nodes (spec.externalClients): the X.509 serial of the certificate published
    # in their JOB-cert-NODE (enrolment.published_serials), by node id.
    external_certificates: Mapping[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    issue: list[SecretToIssue] = field(default_factory=list)
    create: list[Manifest] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    status: Manifest = field(default_factory=dict)  # merge patch for .status
    events: list[Event] = field(default_factory=list)
    save_checkpoint: int | None = None  # fetch and store the aggregator's checkpoint of it
    permanent_error: str | None = None  # stop handling this job (kopf.PermanentError)
    new_rounds: int = 0
    recreated: list[str] = field(default_factory=list)  # roles of pods recreated
    renew: list[SecretToIssue] = field(default_factory=list)  # identity Secrets to re-issue
    crl: CrlUpdate | None = None


@dataclass(frozen=True)
class PodState:
    kind: Literal["missing", "terminating", "starting", "unschedulable", "ready",
                  "succeeded", "failed", "lost"]
    message: str = ""


# ---- spec -----------------------------------------------------------------------------------
def _defaults_spec(defaults: Mapping[str, str]) -> Manifest:
    """The spec fragment a defaults mapping stands for."""
    out: Manifest = {"crypto": {k: v for k, v in defaults.items() if k in CRYPTO_DEFAULT_KEYS}}
    if CHANNEL_DEFAULT_KEY in defaults:
        out["channel"] = {"protocol": defaults[CHANNEL_DEFAULT_KEY]}
    return out


def parse_job_defaults(text: str | None) -> dict[str, str]:
    """$PQFED_JOB_DEFAULTS (the chart's `jobDefaults` as JSON) -> {crypto field or
    `channelProtocol`: value}.
    Raises ValueError naming the key or value that is wrong."""
    if not text or not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"PQFED_JOB_DEFAULTS is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError('PQFED_JOB_DEFAULTS must be a JSON object, e.g. {"kem": "ML-KEM-1024"}')
    unknown = sorted(set(data) - set(DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"PQFED_JOB_DEFAULTS: unknown key(s) {unknown}; "
                         f"use {', '.join(DEFAULT_KEYS)}")
    defaults = {str(k): str(v) for k, v in data.items() if v not in (None, "")}
    try:
        parse_spec(_defaults_spec(defaults), "PQFED_JOB_DEFAULTS")
    except JobSpecError as exc:
        raise ValueError(str(exc)) from None
    return defaults


def apply_job_defaults(raw_spec: Mapping[str, Any], defaults: Mapping[str, str]) -> Manifest:
    """The operator-wide defaults replace every crypto field (and channel.protocol) that still
    has the CRD's built-in default (the API server fills those in, so "unset" and "default"
    look alike)."""
    spec = copy.deepcopy(dict(raw_spec))
    if not defaults:
        return spec
    builtin = FederationJobSpec()
    for section, values in _defaults_spec(defaults).items():
        if not values:
            continue
        base = getattr(builtin, section).model_dump(by_alias=True)
        current = dict(spec.get(section) or {})
        for key, value in values.items():
            if current.get(key, base[key]) == base[key]:
                current[key] = value
        spec[section] = current
    return spec


def validate(name: str, raw_spec: Mapping[str, Any] | None,
             defaults: Mapping[str, str] | None = None,
             protocol: str | None = None) -> FederationJobSpec | dict[str, str]:
    """The effective spec, or {field path: problem} (what the API server could not refuse).
    `protocol`: the channel protocol the job started with (status.channelProtocol), which
    neither an edit nor a later change of the operator's defaults moves."""
    problems: dict[str, str] = {}
    if len(name) > MAX_JOB_NAME:
        problems["metadata.name"] = (f"at most {MAX_JOB_NAME} characters: the aggregator "
                                     f"Service {name}-aggregator must be a DNS label (63); "
                                     "use a shorter name")
    effective = apply_job_defaults(raw_spec or {}, defaults or {})
    if protocol:
        effective["channel"] = {**(effective.get("channel") or {}), "protocol": protocol}
    try:
        spec = parse_spec(effective)
    except JobSpecError as exc:
        problems.update(exc.problems)
        return problems
    return problems or spec


def _operator_only(name: str) -> str:
    """The condition text for an operator-only rule (spec.OPERATOR_ONLY): the field to fix and
    why the API server could not refuse the job up front."""
    rule = next(r for r in OPERATOR_ONLY if r.name == name)
    return (f"no schedulable node matches spec.{rule.field}; label a node or change the "
            f"selector (checked by the operator, not at admission: {rule.why_not_cel})")


def cancel_requested(annotations: Mapping[str, str] | None) -> bool:
    return str((annotations or {}).get(CANCEL_ANNOTATION, "")).lower() in ("true", "1", "yes")


def revocation_requests(annotations: Mapping[str, str] | None
                        ) -> dict[str, RevocationReason | str]:
    """{node id: reason} from `revoke.pqfed.io/<node>` annotations; a reason that does not
    parse is kept as its text (reported, and the node revoked as `unspecified`)."""
    out: dict[str, RevocationReason | str] = {}
    for key, value in (annotations or {}).items():
        if key.startswith(REVOKE_PREFIX):
            try:
                out[key[len(REVOKE_PREFIX):]] = RevocationReason.parse(str(value or
                                                                           "unspecified"))
            except ValueError:
                out[key[len(REVOKE_PREFIX):]] = str(value)
    return out


def revocable_nodes(spec: FederationJobSpec) -> list[str]:
    """Nodes an admin may cut off a running job: clients (the operator's and the external
    ones) and edge aggregators. The aggregator is the job (cancel it instead); the
    operator's identity is the operator's own."""
    return ([m.client_node_id(i) for i in range(spec.clients)]
            + [m.edge_node_id(e) for e in range(_edges(spec))]
            + list(spec.external_node_ids))


def revoked_nodes(spec: FederationJobSpec, annotations: Mapping[str, str] | None
                  ) -> frozenset[str]:
    allowed = set(revocable_nodes(spec))
    return frozenset(n for n in revocation_requests(annotations) if n in allowed)


# ---- status helpers -------------------------------------------------------------------------
def set_condition(conditions: list[Manifest], type_: str, status: str, reason: str,
                  message: str, now: str, generation: int | None = None) -> list[Manifest]:
    """metav1.Condition semantics: lastTransitionTime changes only when status does. The list
    keeps its order (an unchanged condition list makes no status patch)."""
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and \
        old.get("lastTransitionTime") else now
    cond: Manifest = {"type": type_, "status": status, "reason": reason,
                      "message": message[:32768], "lastTransitionTime": since}
    if generation is not None:
        cond["observedGeneration"] = generation
    elif old and "observedGeneration" in old:
        cond["observedGeneration"] = old["observedGeneration"]
    if old is None:
        return [*(dict(c) for c in conditions), cond]
    return [cond if c.get("type") == type_ else dict(c) for c in conditions]


def condition(status: Mapping[str, Any], type_: str) -> Manifest | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> Manifest:
    """The top-level keys of `new` that differ from `old` (a merge patch; lists are whole)."""
    return {k: v for k, v in new.items() if old.get(k) != v}


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def round_record(raw: Mapping[str, Any]) -> Manifest | None:
    """An aggregator RoundRecord trimmed to the CRD's rounds[] schema (extra keys would be
    pruned, an empty completedAt refused)."""
    out: Manifest = {}
    for key in ROUND_INT_KEYS:
        if raw.get(key) is not None:
            try:
                out[key] = max(0, int(raw[key]))
            except (TypeError, ValueError):
                continue
    for key in ROUND_FLOAT_KEYS:
        val = _finite(raw.get(key))
        if val is not None:
            out[key] = val
    participants = raw.get("participants")
    if isinstance(participants, list):
        out["participants"] = [str(p) for p in participants]
    done = raw.get("completedAt")
    if isinstance(done, str) and _DATE_TIME.match(done):
        out["completedAt"] = done
    return out if out.get("round", 0) >= 1 else None


def merge_rounds(current: list[Manifest], reported: list[Any],
                 limit: int = MAX_STATUS_ROUNDS) -> list[Manifest]:
    """Rounds by number (the aggregator's record wins), oldest first, the last `limit`. A
    round reported twice (operator restart, aggregator restore) is still one round."""
    by_round: dict[int, Manifest] = {int(r["round"]): r for r in current if "round" in r}
    for raw in reported:
        rec = round_record(raw) if isinstance(raw, Mapping) else None
        if rec:
            by_round[rec["round"]] = rec
    return [by_round[k] for k in sorted(by_round)][-limit:]


def _ready(pod: Mapping[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _container(pod: Mapping[str, Any], name: str) -> Manifest:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((c for c in statuses if c.get("name") == name), {})


def _exit_text(term: Mapping[str, Any]) -> str:
    text = f"exit code {term.get('exitCode')} ({term.get('reason') or 'Error'})"
    return f"{text}: {term['message']}" if term.get("message") else text


def pod_state(pod: Mapping[str, Any] | None, *, main: str = "fl",
              max_restarts: int | None = None, completes: bool = False) -> PodState:
    """One pod as the operator sees it. `completes`: a run-to-completion pod (the aggregator),
    whose `main` container exiting 0 is success even before the pod phase says so."""
    if pod is None:
        return PodState("missing")
    meta, st = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return PodState("terminating", "being deleted")
    phase = st.get("phase")
    if phase == "Succeeded":
        return PodState("succeeded")
    ctr = _container(pod, main)
    term = (ctr.get("state") or {}).get("terminated") or \
        (ctr.get("lastState") or {}).get("terminated") or {}
    if phase == "Failed":
        reason = st.get("reason") or ""
        text = st.get("message") or reason or (_exit_text(term) if term else "pod failed")
        return PodState("lost" if reason in LOST_REASONS else "failed", text)
    state = ctr.get("state") or {}
    if completes and (state.get("terminated") or {}).get("exitCode") == 0:
        return PodState("succeeded")
    restarts = int(ctr.get("restartCount") or 0)
    if max_restarts is not None and restarts >= max_restarts and term.get("exitCode") and \
            ("waiting" in state or "terminated" in state):
        return PodState("failed", f"{main} restarted {restarts} times; last {_exit_text(term)}")
    for cond in st.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and \
                cond.get("reason") == "Unschedulable":
            return PodState("unschedulable", cond.get("message") or "no node fits")
    if _ready(pod):
        return PodState("ready")
    waiting = state.get("waiting") or {}
    return PodState("starting", waiting.get("message") or waiting.get("reason") or phase or "")


# ---- children -------------------------------------------------------------------------------
def _edges(spec: FederationJobSpec) -> int:
    return spec.hierarchy.edges if spec.hierarchy.enabled else 0


def _issue_plan(job: m.JobRef, spec: FederationJobSpec, observed: Observed) -> list[SecretToIssue]:
    wanted = [SecretToIssue(m.ca_secret_name(job.name)),
              # The revocation list (node_id None, role None): signed by the CA above.
              SecretToIssue(m.crl_secret_name(job.name), crl=True),
              SecretToIssue(m.identity_secret_name(job.name, m.AGGREGATOR_NODE_ID),
                            m.AGGREGATOR_NODE_ID, Role.AGGREGATOR),
              # The operator's own: it reads the aggregator's status through the sidecar.
              SecretToIssue(m.identity_secret_name(job.name, m.OPERATOR_NODE_ID),
                            m.OPERATOR_NODE_ID, Role.OPERATOR)]
    wanted += [SecretToIssue(m.identity_secret_name(job.name, m.client_node_id(i)),
                             m.client_node_id(i), Role.CLIENT) for i in range(spec.clients)]
    wanted += [SecretToIssue(m.identity_secret_name(job.name, m.edge_node_id(e)),
                             m.edge_node_id(e), Role.EDGE) for e in range(_edges(spec))]
    return [s for s in wanted if s.name not in observed.secrets]


def _append_recreated(status: Manifest, what: str, now: str) -> None:
    old = condition(status, PODS_RECREATED)
    text = what if not old else f"{old['message']}; {what}"
    if len(text) > _RECREATED_MAX_CHARS:
        text = "…" + text[-_RECREATED_MAX_CHARS:]
    status["conditions"] = set_condition(status.get("conditions") or [], PODS_RECREATED,
                                         "True", "PodLost", text, now)


def ensure_children(job: m.JobRef, spec: FederationJobSpec, status: Manifest,
                    observed: Observed, now: str, plan: Plan,
                    revoked: frozenset[str] = frozenset()) -> None:
    """Adds to `plan` every missing child (creates nothing that exists), and, on a job that
    already started, records recreated pods in status (mutated) and events. Pods of
    `revoked` nodes are never (re)created."""
    started = bool(status.get("startTime"))
    rnd = int(status.get("currentRound") or 0)
    plan.issue += _issue_plan(job, spec, observed)
    if m.job_configmap_name(job.name) not in observed.configmaps:
        plan.create.append(m.job_configmap(job, spec))
    if m.network_policy_name(job.name) not in observed.network_policies:
        plan.create.append(m.network_policy(job))
    if m.aggregator_service_name(job.name) not in observed.services:
        plan.create.append(m.aggregator_service(job))
    agg_name = m.aggregator_pod_name(job.name)
    if agg_name not in observed.pods:
        restore = m.checkpoint_round(observed.checkpoint)
        plan.create.append(m.aggregator_pod(job, spec, restore=restore > 0))
        if started:
            how = (f"resumes from checkpoint round {restore}" if restore
                   else "no checkpoint yet: starts from round 0")
            _append_recreated(status, f"aggregator at round {rnd} ({how})", now)
            plan.events.append(Event("Warning", "AggregatorRecreated",
                                     f"aggregator pod {agg_name} was lost; recreated, {how}"))
            plan.recreated.append("aggregator")
    for e in range(_edges(spec)):
        if m.edge_service_name(job.name, e) not in observed.services:
            plan.create.append(m.edge_service(job, e))
        name = m.edge_pod_name(job.name, e)
        if name in observed.pods or m.edge_node_id(e) in revoked:
            continue
        plan.create.append(m.edge_pod(job, spec, e))
        if started:
            _append_recreated(status, f"{m.edge_node_id(e)} at round {rnd}", now)
            plan.events.append(Event("Warning", "EdgeRecreated",
                                     f"edge aggregator pod {name} was lost; recreated (its "
                                     "clients rejoin it; the round in flight may miss them)"))
            plan.recreated.append("edge")
    for i in range(spec.clients):
        name = m.client_pod_name(job.name, i)
        if name in observed.pods or m.client_node_id(i) in revoked:
            continue
        plan.create.append(m.client_pod(job, spec, i))
        if started:
            _append_recreated(status, f"{m.client_node_id(i)} at round {rnd}", now)
            plan.events.append(Event("Warning", "ClientRecreated",
                                     f"client pod {name} was lost; recreated (rounds go on "
                                     f"with at least minClients={spec.min_clients})"))
            plan.recreated.append("client")


def _describe(created: list[Manifest], issued: list[SecretToIssue]) -> list[Event]:
    events = [Event("Normal", "SecretIssued",
                    f"Secret {s.name}: " + ("revocation list" if s.crl else
                                            "federation CA" if s.node_id is None else
                                            f"PQC identity of {s.node_id}"))
              for s in issued]
    events += [Event("Normal", "Created", f"{o['kind']} {o['metadata']['name']}")
               for o in created]
    return events


# ---- credentials: revocation and renewal ----------------------------------------------------
def _identity_secrets(job: m.JobRef, spec: FederationJobSpec) -> dict[str, SecretToIssue]:
    """Every node identity Secret of the job, by node id."""
    every = _issue_plan(job, spec, Observed())
    return {s.node_id: s for s in every if s.node_id is not None}


def renewal_due(cert: CertState, now: int) -> bool:
    return now >= cert.not_before + RENEW_AT * (cert.not_after - cert.not_before)


def plan_credentials(job: m.JobRef, spec: FederationJobSpec, observed: Observed,
                     annotations: Mapping[str, str] | None, now: int, plan: Plan) -> None:
    """Adds to `plan`: the revocation list to publish (new revocations, a list 2/3 through its
    lifetime, or one that is missing or does not verify) and the node identities to renew
    (2/3 through their lifetime, never a revoked node's). `now` is Unix seconds."""
    requests = revocation_requests(annotations)
    allowed = set(revocable_nodes(spec))
    revoked = frozenset(n for n in requests if n in allowed)
    crl = observed.crl
    listed = crl.serials if crl is not None else frozenset()
    tls13 = spec.channel.protocol == "tls13"
    listed_x509 = (crl.x509_serials if crl is not None else None) or frozenset()
    new: list[tuple[int, RevocationReason]] = []
    new_x509: list[int] = []
    newly: list[str] = []
    for node in sorted(revoked):
        cert = observed.certificates.get(node)
        external = observed.external_certificates.get(node)
        if cert is None and external is None:
            continue  # never issued: nothing to revoke (and no pod will be created)
        reason = requests[node]
        code = reason if isinstance(reason, RevocationReason) else RevocationReason.UNSPECIFIED
        if cert is not None:
            serials = [x for x in (cert.serial, cert.previous_serial)
                       if x is not None and x not in listed]
            x509_serials = [x for x in cert.x509_serials if tls13 and x not in listed_x509]
        else:  # an external node: only the X.509 certificate the job's CA issued it
            serials = []
            x509_serials = [external] if external is not None and tls13 \
                and external not in listed_x509 else []
        new += [(x, code) for x in serials]
        new_x509 += x509_serials
        if serials or x509_serials:
            newly.append(node)
            plan.events.append(Event(
                "Warning", "NodeRevoked",
                f"{node}: certificate serial(s) "
                f"{', '.join(map(str, [*serials, *x509_serials]))} revoked "
                f"({code.label}); every pod's sidecar cuts its channels once the new list "
                "arrives, and its pod is not recreated"))
    if new or new_x509:
        plan.crl = CrlUpdate(tuple(new), f"revoked {', '.join(newly)}", tuple(new_x509))
    elif crl is None and m.crl_secret_name(job.name) in observed.secrets:
        plan.crl = CrlUpdate(why="the published list is missing or does not verify")
    elif crl is not None and tls13 and crl.x509_serials is None:
        plan.crl = CrlUpdate(why="the published X.509 CRL is missing or does not verify")
    elif crl is not None and renewal_due(CertState(0, crl.this_update, crl.next_update), now):
        plan.crl = CrlUpdate(why=f"list {crl.number} is 2/3 through its lifetime")
    secrets = _identity_secrets(job, spec)
    for node, cert in sorted(observed.certificates.items()):
        if node in revoked or node not in secrets or not renewal_due(cert, now):
            continue
        plan.renew.append(secrets[node])
        plan.events.append(Event("Normal", "CertificateRenewed",
                                 f"{node}: serial {cert.serial} expires at {cert.not_after}; "
                                 "a new certificate and key replace it in its Secret"))


def _revocation_status(job: m.JobRef, spec: FederationJobSpec, new: Manifest,
                       observed: Observed, annotations: Mapping[str, str] | None,
                       now: str, plan: Plan) -> str | None:
    """Deletes revoked nodes' pods, records them in the NodesRevoked condition; returns why
    the job cannot go on (too few clients left for minClients), or None."""
    requests = revocation_requests(annotations)
    if not requests:
        return None
    allowed = set(revocable_nodes(spec))
    revoked = sorted(n for n in requests if n in allowed)
    ignored = sorted(n for n in requests if n not in allowed)
    names = {m.client_node_id(i): m.client_pod_name(job.name, i) for i in range(spec.clients)}
    names.update({m.edge_node_id(e): m.edge_pod_name(job.name, e) for e in range(_edges(spec))})
    for node in revoked:
        if node not in names:
            continue  # an external node: no pod here; its channels end with the new CRL
        pod = observed.pods.get(names[node])
        if pod is not None and not (pod.get("metadata") or {}).get("deletionTimestamp"):
            plan.delete_pods.append(names[node])
    parts = []
    if revoked:
        parts.append("revoked: " + ", ".join(
            f"{n} ({r.label if isinstance(r, RevocationReason) else 'unspecified'})"
            for n, r in ((n, requests[n]) for n in revoked)))
    bad = sorted(n for n in revoked if not isinstance(requests[n], RevocationReason))
    if bad:
        parts.append(f"unknown reason on {', '.join(bad)} (taken as unspecified; use "
                     f"{', '.join(r.label for r in RevocationReason)})")
    if ignored:
        parts.append(f"ignored: {', '.join(ignored)} (only {', '.join(sorted(allowed))} can be "
                     "revoked; cancel the job to stop its aggregator)")
    new["conditions"] = set_condition(new.get("conditions") or [], NODES_REVOKED,
                                      "True" if revoked else "False",
                                      "Revoked" if revoked else "NothingRevoked",
                                      "; ".join(parts), now)
    external = set(spec.external_node_ids)
    left = spec.total_clients - sum(1 for n in revoked
                                    if n.startswith("client-") or n in external)
    if left < spec.min_clients:
        return (f"{left} of {spec.total_clients} clients left after revoking "
                f"{', '.join(revoked)}: fewer than minClients={spec.min_clients}")
    return None


# ---- plans ----------------------------------------------------------------------------------
def plan_invalid(status: Mapping[str, Any], problems: Mapping[str, str], now: str,
                 generation: int | None) -> Plan:
    text = "; ".join(f"{f}: {msg}" for f, msg in problems.items())
    new = dict(status)
    new["phase"] = "Failed"
    new["message"] = f"invalid spec: {text}"
    new.setdefault("completionTime", now)
    if generation is not None:
        new["observedGeneration"] = generation
    conds = set_condition(status.get("conditions") or [], VALID, "False", "InvalidSpec",
                          text, now, generation)
    new["conditions"] = set_condition(conds, COMPLETE, "True", "Failed",
                                      f"invalid spec: {text}", now, generation)
    return Plan(status=status_patch(status, new),
                events=[Event("Warning", "InvalidSpec", text)], permanent_error=text)


def plan_failed(status: Mapping[str, Any], reason: str, message: str, now: str) -> Plan:
    """A job the operator cannot run (the API server refused one of its children)."""
    new = copy.deepcopy(dict(status))
    new.update(phase="Failed", message=message)
    new.setdefault("completionTime", now)
    new["conditions"] = set_condition(new.get("conditions") or [], COMPLETE, "True", reason,
                                      message, now)
    return Plan(status=status_patch(status, new), events=[Event("Warning", reason, message)],
                permanent_error=message)


def plan_cancel(job: m.JobRef, status: Mapping[str, Any], observed: Observed, now: str) -> Plan:
    """Stop every pod; keep the record (status, Secrets, checkpoint) until the job is deleted."""
    new = copy.deepcopy(dict(status))
    rnd = int(new.get("currentRound") or 0)
    msg = f"cancelled (annotation {CANCEL_ANNOTATION}=true) after round {rnd}"
    new.update(phase="Cancelled", message=msg)
    new.setdefault("completionTime", now)
    new["conditions"] = set_condition(new.get("conditions") or [], COMPLETE, "True",
                                      "Cancelled", msg, now)
    doomed = sorted(n for n, p in observed.pods.items()
                    if not (p.get("metadata") or {}).get("deletionTimestamp"))
    return Plan(delete_pods=doomed, status=status_patch(status, new),
                events=[Event("Normal", "Cancelled", msg)])


def plan_start(job: m.JobRef, raw_spec: Mapping[str, Any] | None, status: Mapping[str, Any],
               observed: Observed, now: str, *, generation: int | None = None,
               annotations: Mapping[str, str] | None = None,
               defaults: Mapping[str, str] | None = None) -> Plan:
    """on.create / on.resume: validate, then ensure every child exists; phase Running."""
    if status.get("phase") in TERMINAL:
        return Plan()
    spec = validate(job.name, raw_spec, defaults, status.get(CHANNEL_PROTOCOL))
    if not isinstance(spec, FederationJobSpec):
        return plan_invalid(status, spec, now, generation)
    if cancel_requested(annotations):
        return plan_cancel(job, status, observed, now)
    new = copy.deepcopy(dict(status))
    plan = Plan()
    ensure_children(job, spec, new, observed, now, plan, revoked_nodes(spec, annotations))
    plan.events = _describe(plan.create, plan.issue) + plan.events
    first = new.get("phase") in (None, "Pending")
    new["phase"] = "Running"
    new.setdefault("startTime", now)
    new.setdefault("currentRound", 0)
    new.setdefault(CHANNEL_PROTOCOL, spec.channel.protocol)
    new["totalRounds"] = spec.rounds
    if generation is not None:
        new["observedGeneration"] = generation
    if first:
        new["message"] = (f"started: aggregator + {spec.clients} clients, {spec.rounds} rounds "
                          f"({spec.crypto.kem} + X25519, {spec.crypto.signature})")
        plan.events.append(Event("Normal", "Started", new["message"]))
    conds = set_condition(new.get("conditions") or [], VALID, "True", "SpecValid",
                          "spec accepted by the operator", now, generation)
    if condition(new, ROUND_PROGRESS) is None:
        conds = set_condition(conds, ROUND_PROGRESS, "Unknown", "Starting",
                              f"round 1/{spec.rounds} not started yet", now)
    new["conditions"] = conds
    plan.status = status_patch(status, new)
    return plan


def plan_spec_change(status: Mapping[str, Any], old_spec: Mapping[str, Any] | None,
                     new_spec: Mapping[str, Any] | None, generation: int | None, now: str,
                     defaults: Mapping[str, str] | None = None) -> Plan:
    """An edit of a started job's spec. Its pods are built from the spec it started with, so
    the edit is not applied (SpecApplied=False). A change of channel.protocol is refused by
    name: a live job cannot switch (every identity, sidecar and the operator's own channel
    were made for the old protocol), and rolling it would cut every channel mid-round. The
    CRD's transition rule refuses that edit at the API server already; this covers a CRD
    without it and an edit that now lands on a changed chart default
    (jobDefaults.channelProtocol): the job's protocol is the one it started with
    (status.channelProtocol).
    """
    if status.get("phase") in TERMINAL:
        return Plan()
    before = validate("job", old_spec, defaults)
    after = validate("job", new_spec, defaults)
    was = str(status.get(CHANNEL_PROTOCOL) or "") or (
        before.channel.protocol if isinstance(before, FederationJobSpec) else "")
    field_, reason = "", "SpecChangeIgnored"
    if isinstance(after, FederationJobSpec) and was and after.channel.protocol != was:
        wants = after.channel.protocol
        field_, reason = "spec.channel.protocol: ", "ProtocolChangeRefused"
        msg = (f"{field_}changed from {was} to {wants} after the job started (generation "
               f"{generation}); the running job keeps {was}: its identities, sidecars and the "
               f"operator's channel were set up for it. Delete the job and create it again "
               f"with channel.protocol {wants}")
    else:
        msg = (f"spec changed (generation {generation}) after the job started; the running "
               f"job keeps generation {status.get('observedGeneration')}'s spec: delete and "
               "re-create the job to apply it")
    conds = set_condition(list(status.get("conditions") or []), "SpecApplied", "False",
                          reason, msg, now, generation)
    return Plan(status={"conditions": conds}, events=[Event("Warning", reason, msg)])


def _merge_progress(new: Manifest, agg: Mapping[str, Any], spec: FederationJobSpec,
                    now: str) -> int:
    """Copies the aggregator's progress into `new`; returns how many rounds are new."""
    before = int(new.get("currentRound") or 0)
    known = {int(r["round"]) for r in new.get("rounds") or [] if "round" in r}
    reported = [r for r in agg.get("rounds") or [] if isinstance(r, Mapping)]
    new["rounds"] = merge_rounds(list(new.get("rounds") or []), reported)
    current = int(agg.get("currentRound") or 0)
    total = int(agg.get("totalRounds") or spec.rounds)
    new["currentRound"] = current
    new["totalRounds"] = total
    acc = _finite(agg.get("accuracy"))
    if acc is not None:
        new["accuracy"] = acc
    if agg.get("auditHead"):
        new["auditHead"] = str(agg["auditHead"])
    fresh = [r for r in new["rounds"] if r["round"] > before and r["round"] not in known]
    if current >= 1 and new["rounds"]:
        last = new["rounds"][-1]
        per_round = spec.per_round
        got = len(last.get("participants") or [])
        text = (f"round {last['round']}/{total}: accuracy {last.get('accuracy', 0):.4f}, "
                f"{got}/{per_round} clients aggregated")
        if got < per_round:
            text += f" (minClients {spec.min_clients})"
        if last.get("rejectedUpdates"):
            text += f", {last['rejectedUpdates']} updates rejected"
        new["message"] = str(agg.get("message") or text)
        new["conditions"] = set_condition(new.get("conditions") or [], ROUND_PROGRESS, "True",
                                          "RoundCompleted", text, now)
    return len(fresh)


def _finish(job: m.JobRef, spec: FederationJobSpec, status: Mapping[str, Any], new: Manifest,
            observed: Observed, phase: str, reason: str, message: str, now: str,
            plan: Plan) -> Plan:
    new["phase"] = phase
    new["message"] = message
    agg = observed.aggregator or {}
    done = agg.get("completionTime") if phase == "Succeeded" else None
    new["completionTime"] = done if isinstance(done, str) and _DATE_TIME.match(done) else now
    new["conditions"] = set_condition(new.get("conditions") or [], COMPLETE, "True", reason,
                                      message, now)
    # Clients (and edges) would dial a finished aggregator forever; the aggregator pod stays
    # for its logs.
    names = [m.client_pod_name(job.name, i) for i in range(spec.clients)]
    names += [m.edge_pod_name(job.name, e) for e in range(_edges(spec))]
    plan.delete_pods = sorted(
        n for n in names if n in observed.pods
        and not (observed.pods[n].get("metadata") or {}).get("deletionTimestamp"))
    plan.events.append(Event("Normal" if phase == "Succeeded" else "Warning", reason, message))
    plan.status = status_patch(status, new)
    return plan


def plan_tick(job: m.JobRef, spec: FederationJobSpec, status: Mapping[str, Any],
              observed: Observed, now: str, *,
              annotations: Mapping[str, str] | None = None, clock: int | None = None) -> Plan:
    """The periodic reconcile of a Running job: progress from the aggregator, checkpoints,
    lost pods recreated, revoked nodes cut off, success/failure/cancel detected. With `clock`
    (Unix seconds), also certificate renewal and the revocation list (plan_credentials)."""
    if status.get("phase") != "Running":  # Pending: on.create is not done; terminal: idle
        return Plan()
    if cancel_requested(annotations):
        return plan_cancel(job, status, observed, now)
    new = copy.deepcopy(dict(status))
    plan = Plan()
    agg = observed.aggregator
    if agg:
        plan.new_rounds = _merge_progress(new, agg, spec, now)
        if plan.new_rounds:
            plan.events.append(Event("Normal", "RoundCompleted", new.get("message", "")))
        if int(agg.get("currentRound") or 0) > m.checkpoint_round(observed.checkpoint):
            plan.save_checkpoint = int(agg["currentRound"])

    agg_name = m.aggregator_pod_name(job.name)
    agg_state = pod_state(observed.pods.get(agg_name), max_restarts=AGGREGATOR_MAX_RESTARTS,
                          completes=True)
    if (agg or {}).get("phase") == "Succeeded" or agg_state.kind == "succeeded":
        rnd = int(new.get("currentRound") or 0)
        acc = new.get("accuracy")
        text = f"{rnd} rounds completed" + (f", accuracy {acc:.4f}" if acc is not None else "")
        return _finish(job, spec, status, new, observed, "Succeeded", "Succeeded", text, now,
                       plan)
    if agg_state.kind == "failed":
        text = (f"aggregator failed: {agg_state.message} (pqfed logs {job.name} "
                "--pod aggregator)")
        return _finish(job, spec, status, new, observed, "Failed", "AggregatorFailed", text,
                       now, plan)

    if clock is not None:
        plan_credentials(job, spec, observed, annotations, clock, plan)
    revoked = revoked_nodes(spec, annotations)
    too_few = _revocation_status(job, spec, new, observed, annotations, now, plan)
    if too_few is not None:
        return _finish(job, spec, status, new, observed, "Failed", "MinClientsRevoked",
                       too_few, now, plan)
    # Still running: recreate what is missing; lost pods are deleted first, recreated after.
    for name, pod in observed.pods.items():
        state = pod_state(pod, completes=name == agg_name)
        if state.kind in ("lost", "failed", "succeeded") and name not in plan.delete_pods:
            plan.delete_pods.append(name)
            plan.events.append(Event("Warning", "PodLost", f"pod {name}: {state.message}"))
    ensure_children(job, spec, new, observed, now, plan, revoked)
    plan.events = _describe([o for o in plan.create if o["kind"] != "Pod"], plan.issue) + \
        plan.events

    agg_cond = {
        "ready": ("True", "AggregatorReady", "aggregator pod ready"),
        "missing": ("False", "AggregatorRecreated", "aggregator pod recreated"),
        "terminating": ("False", "AggregatorTerminating", "aggregator pod is being deleted"),
        "lost": ("False", "AggregatorLost", f"aggregator pod lost: {agg_state.message}"),
        "unschedulable": ("False", "Unschedulable",
                          f"aggregator pod cannot be scheduled: {agg_state.message}; "
                          + _operator_only("aggregator-node-exists")),
    }.get(agg_state.kind, ("False", "AggregatorStarting",
                           f"aggregator pod starting {agg_state.message}".strip()))
    conds = set_condition(new.get("conditions") or [], AGGREGATOR_READY, *agg_cond, now)

    problems: list[str] = []
    unschedulable: list[str] = []
    ready = 0
    active = [i for i in range(spec.clients) if m.client_node_id(i) not in revoked]
    for i in active:
        state = pod_state(observed.pods.get(m.client_pod_name(job.name, i)))
        if state.kind == "ready":
            ready += 1
        elif state.kind == "unschedulable":
            unschedulable.append(f"{m.client_node_id(i)}: {state.message}")
        elif state.kind in ("missing", "terminating", "lost", "failed", "succeeded"):
            problems.append(f"{m.client_node_id(i)} {state.kind}")
    for e in range(_edges(spec)):  # a lost edge cuts its clients off: say so here
        if m.edge_node_id(e) in revoked:
            continue
        state = pod_state(observed.pods.get(m.edge_pod_name(job.name, e)))
        if state.kind == "unschedulable":
            unschedulable.append(f"{m.edge_node_id(e)}: {state.message}")
        elif state.kind in ("missing", "terminating", "lost", "failed", "succeeded"):
            problems.append(f"{m.edge_node_id(e)} {state.kind}")
    if unschedulable:
        cli = ("False", "Unschedulable", "client pods cannot be scheduled: "
               + "; ".join(unschedulable) + "; " + _operator_only("client-nodes-exist"))
    elif problems:
        cli = ("False", "ClientPodLost", f"{ready}/{len(active)} client pods ready; "
               + ", ".join(problems) + " (recreated)")
    elif ready == len(active):
        cli = ("True", "AllClientsReady", f"{ready}/{len(active)} client pods ready")
    else:
        cli = ("False", "ClientsStarting", f"{ready}/{len(active)} client pods ready")
    new["conditions"] = set_condition(conds, CLIENTS_READY, *cli, now)
    plan.status = status_patch(status, new)
    return plan


def checkpoint_status(status: Mapping[str, Any], round_: int, saved: bool, message: str,
                      now: str) -> Manifest:
    """Status patch after trying to store the checkpoint of `round_`."""
    new = dict(status)
    new["conditions"] = set_condition(status.get("conditions") or [], CHECKPOINTED,
                                      "True" if saved else "False",
                                      "CheckpointSaved" if saved else "CheckpointNotSaved",
                                      message, now)
    return status_patch(status, new)
