"""spec.channel.protocol: the operator's decisions (defaults, manifests, credentials, refused
changes) and its X.509 identities for tls13 jobs, checked with real certificates and CRLs."""

from __future__ import annotations

import time
import typing
from typing import Any

import pytest
from cryptography import x509

from pqfed.operator import identities, reconcile
from pqfed.operator import pods as m
from pqfed.pqc.errors import CertificateError
from pqfed.pqc.identity import Certificate, Role
from pqfed.pqc.pki import Usage, X509TrustAnchor
from pqfed.pqc.pki.profile import load_certificate_pem, load_private_key_pem
from pqfed.pqc.revocation import RevocationReason
from pqfed.pqc.sidecar.config import ChannelProtocolName
from pqfed.pqc.truststore import load_x509_crl
from pqfed.services import spec as spec_module
from pqfed.services.spec import FederationJobSpec, JobSpecError, parse_spec

JOB = m.JobRef("fed-t", "fl", "uid-1")
NOW = "2026-01-01T00:00:00Z"
TLS13: dict[str, Any] = {"channel": {"protocol": "tls13"}}


def _spec(raw: dict[str, Any]) -> FederationJobSpec:
    return parse_spec(raw)


# ---- the spec field ------------------------------------------------------------------------
def test_default_is_the_one_constant_and_the_names_are_the_sidecars() -> None:
    assert FederationJobSpec().channel.protocol == spec_module.DEFAULT_CHANNEL_PROTOCOL
    assert set(typing.get_args(spec_module.ChannelProtocol)) == \
        {p.value for p in ChannelProtocolName}


@pytest.mark.parametrize(("raw", "field"), [
    ({"channel": {"protocol": "tls12"}}, "spec.channel.protocol"),
    ({**TLS13, "crypto": {"signature": "ML-DSA-44"}}, "spec.crypto.signature"),
    ({**TLS13, "crypto": {"kem": "ML-KEM-1024"}}, "spec.crypto.kem"),
])
def test_bad_protocol_settings_name_the_field_and_the_fix(raw: dict[str, Any],
                                                          field: str) -> None:
    with pytest.raises(JobSpecError) as err:
        parse_spec(raw)
    assert field in err.value.problems, err.value.problems
    text = err.value.problems[field]
    assert ("pqfed1" in text and "tls13" in text), text


def test_chart_default_applies_to_jobs_that_do_not_choose() -> None:
    defaults = reconcile.parse_job_defaults('{"channelProtocol": "tls13"}')
    spec = reconcile.validate("j", {}, defaults)
    assert isinstance(spec, FederationJobSpec) and spec.channel.protocol == "tls13"
    # A job that chose (here ML-KEM-1024, which tls13 cannot offer) is refused by name.
    bad = reconcile.validate("j", {"crypto": {"kem": "ML-KEM-1024"}}, defaults)
    assert isinstance(bad, dict) and "spec.crypto.kem" in bad
    with pytest.raises(ValueError, match="channelProtocol"):
        reconcile.parse_job_defaults('{"protocol": "tls13"}')
    with pytest.raises(ValueError, match="channel.protocol"):
        reconcile.parse_job_defaults('{"channelProtocol": "tls12"}')
    with pytest.raises(ValueError, match="crypto.kem"):
        reconcile.parse_job_defaults('{"channelProtocol": "tls13", "kem": "ML-KEM-1024"}')


# ---- manifests -----------------------------------------------------------------------------
def _sidecar(pod: dict[str, Any]) -> list[str]:
    cmd: list[str] = pod["spec"]["initContainers"][0]["command"]
    return cmd


def _args(cmd: list[str]) -> dict[str, str]:
    return {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}


def _pods(spec: FederationJobSpec) -> list[dict[str, Any]]:
    return [m.aggregator_pod(JOB, spec), m.client_pod(JOB, spec, 0), m.edge_pod(JOB, spec, 0)]


def test_tls13_sidecars_use_the_x509_identity_and_the_fl_apps_the_pqfed_one() -> None:
    spec = _spec(TLS13)
    for pod in _pods(spec):
        args = _args(_sidecar(pod))
        assert args["--protocol"] == "tls13"
        x509 = f"{m.IDENTITY_DIR}/{m.X509_DIR}"
        assert (args["--cert"], args["--key"], args["--ca"], args["--crl"]) == (
            f"{x509}/tls.crt", f"{x509}/tls.key", f"{x509}/ca.crt", f"{x509}/crl.pem")
        fl = _args(pod["spec"]["containers"][0]["command"])
        assert fl["--identity-dir"] == m.IDENTITY_DIR  # update signing: pqfed identity
        (ident, crl) = pod["spec"]["volumes"][0]["projected"]["sources"]
        projected = {i["key"]: i["path"] for i in ident["secret"]["items"]}
        assert projected[identities.X509_CERT_KEY] == "x509/tls.crt"
        assert projected[identities.X509_KEY_KEY] == "x509/tls.key"
        assert projected[identities.X509_CA_KEY] == "x509/ca.crt"
        assert {i["key"]: i["path"] for i in crl["secret"]["items"]}[
            identities.X509_CRL_KEY] == "x509/crl.pem"


def test_pqfed1_pods_are_unchanged() -> None:
    for pod in _pods(FederationJobSpec()):
        args = _args(_sidecar(pod))
        assert "--protocol" not in args and args["--cert"] == f"{m.IDENTITY_DIR}/tls.crt"
        paths = [i["path"] for s in pod["spec"]["volumes"][0]["projected"]["sources"]
                 for i in s["secret"]["items"]]
        assert not any(p.startswith("x509/") for p in paths)


# ---- identities ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def issued() -> dict[str, Any]:
    ca_data = identities.issue_ca("fed-t", "ML-DSA-65", x509_ca=True)
    ca, x509_ca = identities.load_ca(ca_data), identities.load_x509_ca(ca_data)
    assert x509_ca is not None
    client = identities.issue_identity(ca, "client-0", Role.CLIENT, "ML-DSA-65", 3600,
                                       x509_ca=x509_ca)
    return {"ca_data": ca_data, "ca": ca, "x509_ca": x509_ca, "client": client}


def test_tls13_identities_are_x509_ml_dsa_65_of_the_same_node(issued: dict[str, Any]) -> None:
    data = issued["client"]
    cert = load_certificate_pem(data[identities.X509_CERT_KEY])
    key = load_private_key_pem(data[identities.X509_KEY_KEY].encode())
    assert key.public_key() == cert.public_key()
    root = load_certificate_pem(data[identities.X509_CA_KEY])
    node = X509TrustAnchor(root).verify(cert, roles=(Role.CLIENT,), node_id="client-0",
                                        usage=Usage.CLIENT)
    assert (node.federation, node.role, node.node_id) == ("fed-t", Role.CLIENT, "client-0")
    pqfed = Certificate.from_pem(data["tls.crt"])
    # Same lifetime as the pqfed twin (both renewed together at 2/3 of it).
    assert abs(cert.not_valid_after_utc.timestamp() - pqfed.not_after) <= 5
    # A pqfed1 job gets no X.509 material at all.
    plain = identities.issue_identity(issued["ca"], "client-1", Role.CLIENT, "ML-DSA-65", 3600)
    assert not any(k.startswith("x509") for k in plain)
    assert identities.load_x509_ca(identities.issue_ca("fed-u", "ML-DSA-65")) is None


def test_revocation_reaches_the_x509_crl(issued: dict[str, Any]) -> None:
    """Without the X.509 CRL (only the pqfed list re-signed), a tls13 sidecar would keep
    accepting the revoked node: the X.509 anchor with the published CRL must refuse it."""
    data = issued["client"]
    serial = identities.x509_serials(data)[0]
    crl_data = identities.next_crl(issued["ca"], None, [], int(time.time()), 3600,
                                   x509_ca=issued["x509_ca"], x509_revoke=[serial])
    root = issued["x509_ca"].certificate
    assert identities.read_x509_crl(crl_data, root) == frozenset({serial})
    crl = load_x509_crl(crl_data[identities.X509_CRL_KEY].encode())
    pqfed_crl = identities.read_crl(crl_data, issued["ca"].root)
    assert pqfed_crl is not None
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == pqfed_crl.number  # the two lists move together
    anchor = X509TrustAnchor(root).with_crl(crl, now=crl.last_update_utc.timestamp())
    with pytest.raises(CertificateError, match="revoked"):
        anchor.verify(load_certificate_pem(data[identities.X509_CERT_KEY]),
                      now=crl.last_update_utc.timestamp())
    # Another CA's list does not count.
    other = identities.load_x509_ca(identities.issue_ca("fed-t", "ML-DSA-65", x509_ca=True))
    assert other is not None
    assert identities.read_x509_crl(crl_data, other.certificate) is None


def test_renewal_keeps_the_replaced_x509_certificate(issued: dict[str, Any]) -> None:
    old = load_certificate_pem(issued["client"][identities.X509_CERT_KEY])
    renewed = identities.issue_identity(
        issued["ca"], "client-0", Role.CLIENT, "ML-DSA-65", 3600,
        Certificate.from_pem(issued["client"]["tls.crt"]), x509_ca=issued["x509_ca"],
        x509_previous=old)
    serials = identities.x509_serials(renewed)
    assert len(serials) == 2 and serials[1] == old.serial_number != serials[0]


# ---- credential decisions ------------------------------------------------------------------
def _observed(x509_listed: frozenset[int] | None = frozenset()) -> reconcile.Observed:
    cert = reconcile.CertState(7, 1000, 4600, None, (0xABC, 0xDEF))
    return reconcile.Observed(
        secrets=frozenset({m.crl_secret_name(JOB.name)}),
        certificates={"client-0": cert},
        crl=reconcile.CrlState(5, 1000, 4600, frozenset(), x509_listed))


def test_revoking_a_tls13_node_revokes_its_x509_certificates() -> None:
    ann = {reconcile.REVOKE_PREFIX + "client-0": "key-compromise"}
    plan = reconcile.Plan()
    reconcile.plan_credentials(JOB, _spec(TLS13), _observed(), ann, 1100, plan)
    assert plan.crl is not None
    assert plan.crl.revoke == ((7, RevocationReason.KEY_COMPROMISE),)
    assert plan.crl.revoke_x509 == (0xABC, 0xDEF)
    # Once listed, nothing more to publish for it.
    plan = reconcile.Plan()
    reconcile.plan_credentials(JOB, _spec(TLS13), reconcile.Observed(
        secrets=frozenset({m.crl_secret_name(JOB.name)}),
        certificates=_observed().certificates,
        crl=reconcile.CrlState(6, 1000, 4600, frozenset({7}), frozenset({0xABC, 0xDEF}))),
        ann, 1100, plan)
    assert plan.crl is None
    # A pqfed1 job has no X.509 list to publish.
    plan = reconcile.Plan()
    reconcile.plan_credentials(JOB, FederationJobSpec(), _observed(), ann, 1100, plan)
    assert plan.crl is not None and plan.crl.revoke_x509 == ()


def test_a_missing_x509_crl_is_republished() -> None:
    plan = reconcile.Plan()
    reconcile.plan_credentials(JOB, _spec(TLS13), _observed(None), {}, 1100, plan)
    assert plan.crl is not None and "X.509" in plan.crl.why
    plan = reconcile.Plan()
    reconcile.plan_credentials(JOB, FederationJobSpec(), _observed(None), {}, 1100, plan)
    assert plan.crl is None


# ---- changing the protocol of a running job ------------------------------------------------
def test_a_protocol_change_is_refused_by_name() -> None:
    status = {"phase": "Running", "observedGeneration": 1}
    plan = reconcile.plan_spec_change(status, {}, TLS13, 2, NOW)
    (ev,) = plan.events
    assert ev.type == "Warning" and ev.reason == "ProtocolChangeRefused"
    assert ev.message.startswith("spec.channel.protocol: ") and "pqfed1 to tls13" in ev.message
    assert "create it again" in ev.message
    cond = reconcile.condition(plan.status, "SpecApplied")
    assert cond is not None and cond["status"] == "False"
    assert cond["reason"] == "ProtocolChangeRefused" and cond["observedGeneration"] == 2
    # The same when an edit lands on a changed chart default: the job started with pqfed1.
    started = {**status, "channelProtocol": "pqfed1"}
    plan = reconcile.plan_spec_change(started, {"rounds": 3}, {"rounds": 4}, 3, NOW,
                                      {"channelProtocol": "tls13"})
    assert plan.events[0].reason == "ProtocolChangeRefused"


def test_a_started_job_keeps_its_protocol_when_the_chart_default_changes() -> None:
    """An operator restarted with jobDefaults.channelProtocol: tls13 must not recreate a lost
    pod of a pqfed1 job as tls13 (it could not talk to the others)."""
    plan = reconcile.plan_start(JOB, {}, {}, reconcile.Observed(), NOW)
    assert plan.status["channelProtocol"] == "pqfed1"
    tls13 = {"channelProtocol": "tls13"}
    spec = reconcile.validate(JOB.name, {}, tls13, plan.status["channelProtocol"])
    assert isinstance(spec, FederationJobSpec) and spec.channel.protocol == "pqfed1"
    resumed = reconcile.plan_start(JOB, {}, plan.status, reconcile.Observed(), NOW,
                                   defaults=tls13)
    pods = [o for o in resumed.create if o["kind"] == "Pod"]
    assert pods and all("--protocol" not in _sidecar(p) for p in pods)
    fresh = reconcile.plan_start(JOB, {}, {}, reconcile.Observed(), NOW, defaults=tls13)
    assert fresh.status["channelProtocol"] == "tls13"


def test_other_changes_are_ignored_and_finished_jobs_left_alone() -> None:
    status = {"phase": "Running", "observedGeneration": 1}
    plan = reconcile.plan_spec_change(status, {"rounds": 3}, {"rounds": 4}, 2, NOW)
    assert [e.reason for e in plan.events] == ["SpecChangeIgnored"]
    done = reconcile.plan_spec_change({"phase": "Succeeded"}, {}, TLS13, 2, NOW)
    assert not done.events and not done.status


def test_the_crd_refuses_the_change_at_the_api_server() -> None:
    from pqfed.operator import crd

    node = crd.spec_schema()["properties"]["channel"]["properties"]["protocol"]
    (rule,) = node["x-kubernetes-validations"]
    assert rule["rule"] == "self == oldSelf"
    assert rule["message"] == spec_module.PROTOCOL_CHANGE_MESSAGE
