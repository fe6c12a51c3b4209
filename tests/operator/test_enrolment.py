"""Site-held keys: the operator's decisions on certificate requests (operator/enrolment.py),
with real PKCS#10 requests and the job's real X.509 CA. Each refusal is one negative test:
it names its reason, and nothing is issued."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.serialization import Encoding

from pqfed.operator import enrolment, identities
from pqfed.operator import pods as m
from pqfed.pqc.identity import Role
from pqfed.pqc.pki import IssuancePolicy, NodeURI, Usage, make_request, sign_request
from pqfed.pqc.pki.csr import request_pem
from pqfed.pqc.pki.profile import load_certificate_pem, subject_name
from pqfed.services.spec import FederationJobSpec, parse_spec

JOB = "fed-e"
NODE = "hospital-a"
NOW = "2026-01-01T00:00:00Z"
TLS13 = parse_spec({"channel": {"protocol": "tls13"}})


def _csr(uri: NodeURI) -> str:
    _key, csr = make_request(uri)
    return request_pem(csr).decode()


@pytest.fixture(scope="module")
def good() -> str:
    return _csr(NodeURI(JOB, Role.CLIENT, NODE))


def _approved(pem: str) -> dict[str, str]:
    csr = x509.load_pem_x509_csr(pem.encode())
    return {enrolment.APPROVE_PREFIX + NODE: enrolment.key_fingerprint(csr)}


def _decide(pem: str | None, notes: dict[str, str] | None = None,
            spec: FederationJobSpec = TLS13, node: str = NODE) -> enrolment.Decision:
    return enrolment.decide(JOB, spec, node, pem, notes, frozenset())


def test_an_approved_request_is_issued_by_the_jobs_x509_ca(good: str) -> None:
    d = _decide(good, _approved(good))
    assert d.state == "issue" and d.csr is not None
    ca_data = identities.issue_ca(JOB, "ML-DSA-65", x509_ca=True)
    ca = identities.load_x509_ca(ca_data)
    assert ca is not None
    cert = sign_request(ca, d.csr, IssuancePolicy(roles=(Role.CLIENT,), node_id=NODE))
    node = ca.trust.verify(cert, roles=(Role.CLIENT,), node_id=NODE, usage=Usage.CLIENT)
    assert node.node_id == NODE and cert.public_key() == d.csr.public_key()
    cm = enrolment.certificate_configmap(m.JobRef(JOB, "fl", "u"), NODE,
                                         cert.public_bytes(Encoding.PEM).decode(),
                                         ca_data[identities.X509_CA_KEY], "", TLS13)
    assert cm["metadata"]["name"] == f"{JOB}-cert-{NODE}"
    assert set(cm["data"]) == {"tls.crt", "ca.crt", "crl.pem", "spec.json"}
    assert json.loads(cm["data"]["spec.json"])["name"] == JOB  # what `pqfed site run` reads
    assert "PRIVATE" not in str(cm)  # the operator only ever had the public key
    assert load_certificate_pem(cm["data"]["tls.crt"]) == cert


def test_an_unapproved_request_waits(good: str) -> None:
    d = _decide(good)
    assert (d.state, d.reason) == ("pending", "AwaitingApproval")
    assert f"pqfed approve --job {JOB} --node {NODE}" in d.message


def test_a_denied_request_is_refused(good: str) -> None:
    d = _decide(good, {**_approved(good), enrolment.DENY_PREFIX + NODE: "not our hospital"})
    assert (d.state, d.reason) == ("denied", "Denied") and "not our hospital" in d.message


@pytest.mark.parametrize(("uri", "reason", "field"), [
    (NodeURI("other-fed", Role.CLIENT, NODE), "WrongFederation", "federation"),
    (NodeURI(JOB, Role.EDGE, NODE), "WrongRole", "role"),
    (NodeURI(JOB, Role.CLIENT, "hospital-b"), "WrongNodeId", "node_id"),
    (NodeURI(JOB, Role.AGGREGATOR, NODE), "WrongRole", "role"),
])
def test_a_request_for_another_identity_is_refused(uri: NodeURI, reason: str,
                                                    field: str) -> None:
    pem = _csr(uri)
    d = _decide(pem, _approved(pem))
    assert (d.state, d.reason) == ("denied", reason) and d.message.startswith(field), d


def test_a_tampered_request_is_refused(good: str) -> None:
    """No proof of possession: the self-signature no longer verifies (one bit flipped in the
    signed subject would do the same)."""
    der = bytearray(x509.load_pem_x509_csr(good.encode()).public_bytes(Encoding.DER))
    der[-10] ^= 0x01  # inside the ML-DSA signature
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(Encoding.PEM).decode()
    d = _decide(pem, _approved(pem))
    assert (d.state, d.reason) == ("denied", "BadSignature"), d


def test_a_request_for_a_ca_certificate_is_refused() -> None:
    key = mldsa.MLDSA65PrivateKey.generate()
    uri = NodeURI(JOB, Role.CLIENT, NODE)
    csr = (x509.CertificateSigningRequestBuilder().subject_name(subject_name(uri))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
               str(uri))]), critical=False)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(key, None))
    pem = request_pem(csr).decode()
    d = _decide(pem, _approved(pem))
    assert (d.state, d.reason) == ("denied", "CaRequested"), d


def test_a_classical_key_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    uri = NodeURI(JOB, Role.CLIENT, NODE)
    from cryptography.hazmat.primitives import hashes

    csr = (x509.CertificateSigningRequestBuilder().subject_name(subject_name(uri))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
               str(uri))]), critical=False)
           .sign(key, hashes.SHA256()))
    pem = request_pem(csr).decode()
    d = _decide(pem, _approved(pem))
    assert (d.state, d.reason) == ("denied", "WrongKeyAlgorithm"), d


def test_an_approval_of_another_key_is_not_used(good: str) -> None:
    """The request was replaced after the admin approved the first one."""
    replaced = _csr(NodeURI(JOB, Role.CLIENT, NODE))
    d = _decide(replaced, _approved(good))
    assert (d.state, d.reason) == ("denied", "ApprovalKeyMismatch"), d


def test_operator_run_nodes_and_pqfed1_jobs_cannot_enrol(good: str) -> None:
    pem = _csr(NodeURI(JOB, Role.CLIENT, "client-0"))
    d = _decide(pem, {enrolment.APPROVE_PREFIX + "client-0": "x"}, node="client-0")
    assert (d.state, d.reason) == ("denied", "ReservedNodeId")
    d = _decide(good, _approved(good), spec=FederationJobSpec())
    assert (d.state, d.reason) == ("denied", "ProtocolNotTls13")
    assert "spec.channel.protocol" in d.message
    assert _decide(None).reason == "NoRequest"
    assert _decide("not a pem").reason == "Malformed"


def test_the_condition_names_each_request_and_events_fire_once(good: str) -> None:
    bad = _csr(NodeURI("other-fed", Role.CLIENT, "hospital-b"))
    requests = {NODE: good, "hospital-b": bad}
    plan = enrolment.plan_enrolment(JOB, TLS13, requests, {}, frozenset(), {}, NOW)
    assert plan.conditions is not None
    (cond,) = plan.conditions
    assert (cond["type"], cond["status"], cond["reason"]) == ("Enrolment", "False",
                                                              "WrongFederation")
    assert "hospital-a: pending" in str(cond["message"])
    assert "hospital-b: denied (WrongFederation)" in str(cond["message"])
    assert sorted(e.reason for e in plan.events) == ["EnrolmentDenied", "EnrolmentPending"]
    status: dict[str, Any] = {"conditions": plan.conditions}
    again = enrolment.plan_enrolment(JOB, TLS13, requests, {}, frozenset(), status, NOW)
    assert again.conditions is None and not again.events  # nothing new: no repeat
    approved = enrolment.plan_enrolment(JOB, TLS13, requests, _approved(good), frozenset(),
                                        status, NOW)
    assert [d.node_id for d in approved.to_issue] == [NODE]
    assert [e.reason for e in approved.events] == ["CertificateIssued"]
    done = enrolment.plan_enrolment(JOB, TLS13, {NODE: good}, _approved(good),
                                    frozenset({NODE}), status, NOW)
    assert not done.to_issue and done.conditions is not None
    assert done.conditions[0]["reason"] == "AllIssued"
    assert enrolment.plan_enrolment(JOB, TLS13, {}, {}, frozenset(), {}, NOW).conditions is None


def test_pqfed_approve_checks_what_the_operator_checks(good: str) -> None:
    uri, fingerprint = enrolment.approval(JOB, TLS13, NODE, good)
    assert uri == f"pqfed://{JOB}/client/{NODE}" and fingerprint.startswith("sha256:")
    with pytest.raises(enrolment.EnrolmentRefused, match="WrongRole"):
        enrolment.approval(JOB, TLS13, NODE, _csr(NodeURI(JOB, Role.EDGE, NODE)))


def test_the_published_crl_snapshot_follows_the_jobs_crl(good: str) -> None:
    """Every JOB-cert-NODE whose crl.pem is not the job's current X.509 CRL is refreshed;
    nothing else (another job's, another component's, an up-to-date one) is touched."""
    ca_data = identities.issue_ca(JOB, "ML-DSA-65", x509_ca=True)
    ca = identities.load_x509_ca(ca_data)
    assert ca is not None
    old, new = (ca.revocation_list(serials, n).public_bytes(Encoding.PEM).decode()
                for n, serials in ((1, []), (2, [0x1234])))
    job = m.JobRef(JOB, "fl", "u")

    def published(node: str, crl: str, job_name: str = JOB) -> dict[str, Any]:
        return enrolment.certificate_configmap(m.JobRef(job_name, "fl", "u"), node, "cert",
                                               ca_data[identities.X509_CA_KEY], crl, TLS13)

    cms = {c["metadata"]["name"]: c for c in (
        published("hospital-a", old), published("hospital-b", new),
        published("hospital-c", old, "fed-other"))}
    cms[m.job_configmap_name(JOB)] = m.job_configmap(job, TLS13)
    assert enrolment.stale_crl_snapshots(JOB, cms, new) == (f"{JOB}-cert-hospital-a",)
    assert enrolment.stale_crl_snapshots(JOB, cms, "") == ()  # no list published yet


def test_the_published_serials_are_what_revocation_lists(good: str) -> None:
    ca_data = identities.issue_ca(JOB, "ML-DSA-65", x509_ca=True)
    ca = identities.load_x509_ca(ca_data)
    assert ca is not None
    d = _decide(good, _approved(good))
    assert d.csr is not None
    cert = sign_request(ca, d.csr, IssuancePolicy(roles=(Role.CLIENT,), node_id=NODE))
    cm = enrolment.certificate_configmap(m.JobRef(JOB, "fl", "u"), NODE,
                                         cert.public_bytes(Encoding.PEM).decode(),
                                         ca_data[identities.X509_CA_KEY], "", TLS13)
    broken = {**cm, "metadata": {**cm["metadata"], "name": f"{JOB}-cert-other"},
              "data": {**cm["data"], "tls.crt": "not a certificate"}}
    cms = {cm["metadata"]["name"]: cm, broken["metadata"]["name"]: broken,
           m.job_configmap_name(JOB): m.job_configmap(m.JobRef(JOB, "fl", "u"), TLS13)}
    assert enrolment.published_serials(JOB, cms) == {NODE: cert.serial_number}
