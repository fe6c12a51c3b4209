"""Site-held keys in a cluster: certificate requests, an admin's approval, issuance.

The flow follows the Kubernetes CertificateSigningRequest API and cert-manager's
CertificateRequest approval: the requester submits a request object, an approver with a
different permission approves or denies it, and only then does the signer issue. Here:

1. The site runs `pqfed ca csr --federation JOB --role client --node-id NODE --out DIR`: its
   ML-DSA-65 key stays in DIR; it submits DIR/tls.csr as ConfigMap `JOB-csr-NODE` (key
   `tls.csr`, label `pqfed.io/csr-for: JOB`) in the job's namespace. A ConfigMap, not a
   Secret: a PKCS#10 request holds nothing secret (public key, requested name, self-signature),
   and sites then need no right to read anyone's Secrets. Not a custom resource either: the
   request needs no schema beyond one PEM, and the approval lives elsewhere (below).
2. A job admin runs `pqfed approve --job JOB --node NODE`: it checks the request as the
   operator will,
   shows its node URI and key fingerprint, and annotates the FederationJob
   `approve.pqfed.io/NODE: sha256:<fingerprint of the request's public key>`
   (`pqfed approve --job JOB --node NODE --deny REASON` sets `deny.pqfed.io/NODE`).
   The approval is on the FederationJob, which sites cannot edit (as certificates.k8s.io
   keeps `approve` a separate permission from `create`), and it names the key, so a
   request replaced after approval is not signed (a time-of-check/time-of-use gap the CSR
   API closes the same way: its approval is of one immutable object).
3. The operator (this module decides, handlers.py applies) verifies the request (PKCS#10
   self-signature = proof of possession, ML-DSA-65 key, SAN URI pqfed://JOB/client/NODE,
   no CA bit, no other extensions), signs it with the job's X.509 CA and publishes ConfigMap
   `JOB-cert-NODE` (`tls.crt`, `ca.crt`, `crl.pem`, `spec.json`: nothing secret) for the
   site to fetch (`pqfed site fetch`). Every refusal names its reason in the job's
   `Enrolment` condition and an Event. Whenever the job's X.509 CRL changes (a revocation,
   a list re-signed before its nextUpdate), the operator copies it into every published
   `JOB-cert-NODE` (`stale_crl_snapshots`), so a site that re-fetches holds the newest list.
4. The site runs its node (`pqfed site run`): its own TLS 1.3 sidecar and Flower client;
   the job lists it in `spec.externalClients`, and the aggregator accepts its updates signed
   with the site's key (pqc/signing.py `verify_update_x509`).

The operator never holds an enrolled node's private key: it only ever sees the request.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pqfed.operator import pods as m
from pqfed.operator.reconcile import Event, condition, set_condition
from pqfed.pqc import CertificateError, Role
from pqfed.pqc.pki.csr import IssuancePolicy, check_request, load_request_pem
from pqfed.pqc.truststore import CRL_FILE
from pqfed.services import NODE_LABEL, FederationJobSpec

CSR_LABEL: Final = "pqfed.io/csr-for"  # on a request ConfigMap: the job it is for
CSR_KEY: Final = "tls.csr"
CERT_KEY: Final = "tls.crt"  # in JOB-cert-NODE, beside CA_KEY, crl.pem and spec.json
CA_KEY: Final = "ca.crt"
COMPONENT_LABEL: Final = "app.kubernetes.io/component"  # pods.labels()
ENROLMENT_COMPONENT: Final = "enrolment"  # that label on JOB-cert-NODE
APPROVE_PREFIX: Final = "approve.pqfed.io/"
DENY_PREFIX: Final = "deny.pqfed.io/"
ENROLMENT: Final = "Enrolment"  # the FederationJob condition
FINGERPRINT_PREFIX: Final = "sha256:"


def request_configmap_name(job: str, node_id: str) -> str:
    return f"{job}-csr-{node_id}"


def certificate_configmap_name(job: str, node_id: str) -> str:
    return f"{job}-cert-{node_id}"


def key_fingerprint(csr: x509.CertificateSigningRequest) -> str:
    """`sha256:<hex>` of the request's SubjectPublicKeyInfo: what an approval names."""
    spki = csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return FINGERPRINT_PREFIX + hashlib.sha256(spki).hexdigest()


def reserved_node_ids(spec: FederationJobSpec) -> frozenset[str]:
    """Node ids the operator issues itself: an enrolled node cannot take one."""
    ids = {m.AGGREGATOR_NODE_ID, m.OPERATOR_NODE_ID}
    ids |= {m.client_node_id(i) for i in range(spec.clients)}
    if spec.hierarchy.enabled:
        ids |= {m.edge_node_id(e) for e in range(spec.hierarchy.edges)}
    return frozenset(ids)


@dataclass(frozen=True)
class Decision:
    """What to do with one request: wait for an admin, refuse it (reason names the field),
    issue it now, or nothing (already issued)."""

    node_id: str
    state: Literal["pending", "denied", "issue", "issued"]
    reason: str  # CamelCase, for the condition and the Event
    message: str
    csr: x509.CertificateSigningRequest | None = None

    def line(self) -> str:
        return f"{self.node_id}: {self.state} ({self.reason}): {self.message}"


def decide(job: str, spec: FederationJobSpec, node_id: str, csr_pem: str | None,
           annotations: Mapping[str, str] | None, issued: frozenset[str]) -> Decision:
    """One request ConfigMap `job-csr-<node_id>` holding `csr_pem` against the job's spec,
    the FederationJob's annotations and the nodes whose certificate is already published."""
    notes = annotations or {}

    def deny(reason: str, message: str) -> Decision:
        return Decision(node_id, "denied", reason, message)

    if spec.channel.protocol != "tls13":
        return deny("ProtocolNotTls13", "spec.channel.protocol: enrolment issues X.509 "
                    "certificates for the tls13 channel; create the job with protocol tls13")
    if csr_pem is None:
        return deny("NoRequest", f"ConfigMap {request_configmap_name(job, node_id)} has no "
                    f"key {CSR_KEY!r}; put the PEM from `pqfed ca csr` there")
    if node_id in reserved_node_ids(spec):
        return deny("ReservedNodeId", f"node_id: {node_id!r} is a node the operator runs; "
                    "choose another --node-id for `pqfed ca csr`")
    denied = notes.get(DENY_PREFIX + node_id)
    if denied is not None:
        return deny("Denied", f"denied by an admin: {denied or 'no reason given'}")
    try:
        csr = load_request_pem(csr_pem.encode())
        policy = IssuancePolicy(roles=(Role.CLIENT,), node_id=node_id,
                                validity_s=spec.crypto.certificate_lifetime_seconds)
        check_request(csr, job, policy)
    except CertificateError as exc:
        return deny(_reason(exc.field), f"{exc.field}: {exc.reason}")
    except ValueError as exc:  # cryptography parses lazily: a malformed extension
        return deny("Malformed", f"csr: cannot be parsed: {exc}")
    if node_id in issued:
        return Decision(node_id, "issued", "Issued", "certificate published in ConfigMap "
                        f"{certificate_configmap_name(job, node_id)}")
    approval = notes.get(APPROVE_PREFIX + node_id)
    fingerprint = key_fingerprint(csr)
    if approval is None:
        return Decision(node_id, "pending", "AwaitingApproval",
                        f"key {fingerprint}: approve with `pqfed approve --job {job} --node "
                        f"{node_id}`",
                        csr)
    if approval.strip() != fingerprint:
        return deny("ApprovalKeyMismatch", f"approval: the approval names {approval.strip()!r} "
                    f"but the request now holds key {fingerprint} (replaced after approval?); "
                    "check the request and approve it again")
    return Decision(node_id, "issue", "Approved", f"approved key {fingerprint}", csr)


_REASONS: Final = {
    "signature": "BadSignature", "federation": "WrongFederation", "role": "WrongRole",
    "node_id": "WrongNodeId", "basic_constraints": "CaRequested",
    "extensions": "ExtensionNotAllowed", "public_key": "WrongKeyAlgorithm",
    "csr": "Malformed", "subject_alt_name": "BadNodeUri",
}


def _reason(field: str) -> str:
    return _REASONS.get(field.split(".", maxsplit=1)[0], "Invalid")


def condition_message(decisions: list[Decision]) -> tuple[str, str, str]:
    """(status, reason, message) of the Enrolment condition over every request."""
    if not decisions:
        return "True", "NoRequests", "no enrolment requests"
    denied = [d for d in decisions if d.state == "denied"]
    pending = [d for d in decisions if d.state == "pending"]
    message = "; ".join(d.line() for d in sorted(decisions, key=lambda d: d.node_id))
    if denied:
        return "False", denied[0].reason if len(denied) == 1 else "RequestsDenied", message
    if pending:
        return "False", "AwaitingApproval", message
    return "True", "AllIssued", message


@dataclass(frozen=True)
class EnrolmentPlan:
    decisions: tuple[Decision, ...]
    conditions: list[dict[str, Any]] | None  # new status.conditions, None: unchanged
    events: tuple[Event, ...]

    @property
    def to_issue(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.state == "issue")


def plan_enrolment(job: str, spec: FederationJobSpec, requests: Mapping[str, str | None],
                   annotations: Mapping[str, str] | None, issued: frozenset[str],
                   status: Mapping[str, Any], now: str) -> EnrolmentPlan:
    """Every request of the job (`requests`: node id -> PEM or None) decided; the Enrolment
    condition; an Event for each request whose state changed since the condition was last
    written (so a pending request is not announced on every tick)."""
    decisions = tuple(decide(job, spec, node, pem, annotations, issued)
                      for node, pem in sorted(requests.items()))
    conds: list[dict[str, Any]] = list(status.get("conditions") or [])
    old = condition(status, ENROLMENT)
    if not decisions and old is None:
        return EnrolmentPlan((), None, ())
    state, reason, message = condition_message(list(decisions))
    before = str((old or {}).get("message", ""))
    events = tuple(
        Event("Warning" if d.state == "denied" else "Normal",
              {"denied": "EnrolmentDenied", "pending": "EnrolmentPending",
               "issue": "CertificateIssued", "issued": "CertificateIssued"}[d.state],
              d.line())
        for d in decisions if d.state != "issued" and d.line() not in before)
    new = set_condition(conds, ENROLMENT, state, reason, message, now)
    return EnrolmentPlan(decisions, None if new == conds else new, events)


def certificate_configmap(job: m.JobRef, node_id: str, cert_pem: str, ca_pem: str,
                          crl_pem: str, spec: FederationJobSpec) -> dict[str, Any]:
    """What the site fetches: its certificate, the job's X.509 CA and CRL and the job's spec
    (all public; the layout of its `pqfed ca csr` directory, so `pqfed site run` and
    `pqfed sidecar --protocol tls13` read it)."""
    doc = json.dumps(m.spec_document(job.name, spec), indent=1, sort_keys=True)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": certificate_configmap_name(job.name, node_id),
                         "namespace": job.namespace,
                         "labels": m.labels(job.name, ENROLMENT_COMPONENT,
                                            **{NODE_LABEL: node_id}),
                         "ownerReferences": [m.owner_reference(job)]},
            "data": {CERT_KEY: cert_pem, CA_KEY: ca_pem, CRL_FILE: crl_pem,
                     m.SPEC_FILE: doc}}


def stale_crl_snapshots(job: str, configmaps: Mapping[str, Mapping[str, Any]], crl_pem: str
                        ) -> tuple[str, ...]:
    """The published `job-cert-<node>` ConfigMaps (name -> object) whose CRL snapshot is not
    the job's current X.509 CRL `crl_pem`: each is patched with it. An empty `crl_pem` (no
    list published yet) changes nothing."""
    if not crl_pem:
        return ()
    prefix = certificate_configmap_name(job, "")
    return tuple(sorted(
        name for name, cm in configmaps.items()
        if name.startswith(prefix)
        and ((cm.get("metadata") or {}).get("labels") or {}).get(COMPONENT_LABEL)
        == ENROLMENT_COMPONENT
        and (cm.get("data") or {}).get(CRL_FILE) != crl_pem))


def published_serials(job: str, configmaps: Mapping[str, Mapping[str, Any]]
                      ) -> dict[str, int]:
    """{node id: X.509 serial} of the certificates published in the job's `job-cert-<node>`
    ConfigMaps: what `pqfed revoke --node <node>` puts on the job's CRL for an external
    node. A ConfigMap whose certificate does not parse is left out (and logged by the
    caller's next issuance)."""
    out: dict[str, int] = {}
    prefix = certificate_configmap_name(job, "")
    for name, cm in configmaps.items():
        labels = (cm.get("metadata") or {}).get("labels") or {}
        pem = (cm.get("data") or {}).get(CERT_KEY)
        if (not name.startswith(prefix) or labels.get(COMPONENT_LABEL) != ENROLMENT_COMPONENT
                or not pem):
            continue
        try:
            out[name[len(prefix):]] = x509.load_pem_x509_certificate(pem.encode()).serial_number
        except ValueError:
            continue
    return out


class EnrolmentRefused(ValueError):
    """`pqfed approve` found the request unfit; `reason` as in the Enrolment condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def approval(job: str, spec: FederationJobSpec, node_id: str, csr_pem: str | None
             ) -> tuple[str, str]:
    """What `pqfed approve` checks before it approves: the request passes every check the
    operator makes. Returns (node URI, key fingerprint) to show the admin; raises
    EnrolmentRefused with the reason otherwise."""
    d = decide(job, spec, node_id, csr_pem, {}, frozenset())
    if d.state == "denied" or d.csr is None:
        raise EnrolmentRefused(d.reason, d.message)
    uri = f"pqfed://{job}/client/{node_id}"
    return uri, key_fingerprint(d.csr)
