"""The operator's credential decisions as pure units (reconcile.plan_tick with a clock):
revoking a node of a running job, republishing the revocation list, renewing certificates;
and the Secret payloads they turn into (identities.py), verified with the real CA."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from pqfed.operator import identities, reconcile
from pqfed.operator import pods as m
from pqfed.operator.reconcile import CertState, CrlState, Observed
from pqfed.pqc.errors import CertificateError
from pqfed.pqc.identity import Certificate, Identity, Role, TrustAnchor
from pqfed.pqc.revocation import RevocationList, RevocationReason
from tests.operator.test_reconcile import JOB, LATER, cond, spec_of, started

T0 = 1_800_000_000
DAY = 86400


def _certs(observed: Observed, spec: Any, *, not_before: int = T0, lifetime: int = DAY
           ) -> Observed:
    """Every identity issued at `not_before` with `lifetime`; serial = 100 + position."""
    nodes = ["aggregator", "operator", *reconcile.revocable_nodes(spec)]
    certs = {n: CertState(100 + i, not_before, not_before + lifetime)
             for i, n in enumerate(nodes)}
    crl = CrlState(T0, not_before, not_before + lifetime)
    return dataclasses.replace(observed, certificates=certs, crl=crl)


def _revoke(*nodes: str, reason: str = "key-compromise") -> dict[str, str]:
    return {f"{reconcile.REVOKE_PREFIX}{n}": reason for n in nodes}


def test_revoking_a_client_publishes_a_list_and_cuts_its_pod() -> None:
    spec = spec_of(clients=3, minClients=2, rounds=3)
    status, observed = started(spec)
    observed = _certs(observed, spec)
    plan = reconcile.plan_tick(JOB, spec, status, observed, LATER,
                               annotations=_revoke("client-1"), clock=T0 + 60)
    assert plan.crl == reconcile.CrlUpdate(((103, RevocationReason.KEY_COMPROMISE),),
                                           "revoked client-1")
    assert plan.delete_pods == ["fed-a-client-1"]
    assert not any(o["kind"] == "Pod" for o in plan.create)
    revoked = cond(plan.status, "NodesRevoked")
    assert revoked["status"] == "True" and "client-1 (key-compromise)" in revoked["message"]
    assert any(e.reason == "NodeRevoked" and "103" in e.message for e in plan.events)
    assert plan.status.get("phase") is None  # 2 clients left >= minClients: goes on
    # Next tick: the pod is gone, the list lists it: not recreated, nothing republished.
    pods = {k: v for k, v in observed.pods.items() if k != "fed-a-client-1"}
    after = dataclasses.replace(observed, pods=pods, crl=CrlState(T0 + 60, T0 + 60, T0 + DAY,
                                                                  frozenset({103})))
    st = {**status, **plan.status}
    plan = reconcile.plan_tick(JOB, spec, st, after, LATER,
                               annotations=_revoke("client-1"), clock=T0 + 120)
    assert plan.crl is None and plan.create == [] and plan.delete_pods == []
    clients = cond({**st, **plan.status}, "ClientsReady")
    assert (clients["status"], clients["message"]) == ("True", "2/2 client pods ready")


def test_a_renewed_node_has_both_certificates_revoked() -> None:
    spec = spec_of(clients=2, minClients=1)
    status, observed = started(spec)
    observed = _certs(observed, spec)
    certs = dict(observed.certificates)
    certs["client-0"] = dataclasses.replace(certs["client-0"], previous_serial=77)
    plan = reconcile.plan_tick(JOB, spec, status,
                               dataclasses.replace(observed, certificates=certs), LATER,
                               annotations=_revoke("client-0", reason="superseded"),
                               clock=T0 + 60)
    assert plan.crl is not None
    assert plan.crl.revoke == ((102, RevocationReason.SUPERSEDED),
                               (77, RevocationReason.SUPERSEDED))


def test_revoking_below_min_clients_fails_the_job_with_the_reason() -> None:
    spec = spec_of(clients=3, minClients=2)
    status, observed = started(spec)
    plan = reconcile.plan_tick(JOB, spec, status, _certs(observed, spec), LATER,
                               annotations=_revoke("client-0", "client-2"), clock=T0 + 60)
    assert plan.status["phase"] == "Failed"
    assert "1 of 3 clients left" in plan.status["message"]
    assert "minClients=2" in plan.status["message"]
    assert cond(plan.status, "Complete")["reason"] == "MinClientsRevoked"
    assert plan.crl is not None and len(plan.crl.revoke) == 2  # revoked even so


def test_aggregator_and_unknown_nodes_are_not_revocable() -> None:
    spec = spec_of(clients=2, minClients=1)
    status, observed = started(spec)
    plan = reconcile.plan_tick(JOB, spec, status, _certs(observed, spec), LATER,
                               annotations={**_revoke("aggregator", "client-9"),
                                            f"{reconcile.REVOKE_PREFIX}client-0": "bogus"},
                               clock=T0 + 60)
    msg = cond(plan.status, "NodesRevoked")["message"]
    assert "ignored: aggregator, client-9" in msg
    assert "unknown reason on client-0" in msg
    assert plan.crl is not None
    assert plan.crl.revoke == ((102, RevocationReason.UNSPECIFIED),)
    assert plan.delete_pods == ["fed-a-client-0"]


@pytest.mark.parametrize(("age", "renewed"), [(DAY * 2 // 3 - 1, False), (DAY * 2 // 3, True)])
def test_certificates_are_renewed_at_two_thirds_of_their_lifetime(age: int,
                                                                   renewed: bool) -> None:
    spec = spec_of(clients=2, minClients=1)
    status, observed = started(spec)
    observed = _certs(observed, spec)
    plan = reconcile.plan_tick(JOB, spec, status, observed, LATER,
                               annotations=_revoke("client-1"), clock=T0 + age)
    names = [s.node_id for s in plan.renew]
    # Never a revoked node's; the list itself is re-signed on the same schedule.
    assert names == (["aggregator", "client-0", "operator"] if renewed else [])
    roles = {s.node_id: s.role for s in plan.renew}
    assert roles.get("operator", Role.OPERATOR) is Role.OPERATOR
    assert (plan.crl is not None) == True  # noqa: E712  (client-1 is new on the list)
    quiet = reconcile.plan_tick(JOB, spec, status, observed, LATER, clock=T0 + age)
    assert (quiet.crl is not None) == renewed
    assert quiet.crl is None or "2/3" in quiet.crl.why


def test_a_list_that_does_not_verify_is_republished() -> None:
    spec = spec_of(clients=2, minClients=1)
    status, observed = started(spec)
    observed = dataclasses.replace(_certs(observed, spec), crl=None)
    assert "fed-a-crl" in observed.secrets
    plan = reconcile.plan_tick(JOB, spec, status, observed, LATER, clock=T0)
    assert plan.crl is not None and "does not verify" in plan.crl.why


def test_no_clock_no_credential_decisions() -> None:
    spec = spec_of(clients=2, minClients=1)
    status, observed = started(spec)
    plan = reconcile.plan_tick(JOB, spec, status, _certs(observed, spec, not_before=0), LATER)
    assert plan.crl is None and plan.renew == []


# ---- Secret payloads ------------------------------------------------------------------------
def test_secret_payloads_revoke_and_renew_with_the_real_ca() -> None:
    ca = identities.load_ca(identities.issue_ca("fed-a", "ML-DSA-44"))
    data = identities.issue_identity(ca, "client-0", Role.CLIENT, "ML-DSA-44", 600)
    cert = Certificate.from_pem(data["tls.crt"])
    assert cert.not_after - cert.not_before == 600 + identities.BACKDATE_S  # 600 s from now
    renewed = identities.issue_identity(ca, "client-0", Role.CLIENT, "ML-DSA-44", 600, cert)
    assert Certificate.from_pem(renewed[identities.PREVIOUS_CERT_KEY]) == cert
    now = int(time.time())
    first = identities.next_crl(ca, None, (), now, 600)
    crl1 = identities.read_crl(first, ca.root)
    assert crl1 is not None and crl1.number == now and crl1.revoked == ()
    second = identities.next_crl(ca, crl1, [(cert.serial, RevocationReason.KEY_COMPROMISE)],
                                 now - 5, 600)  # a clock that went back still moves forward
    crl2 = identities.read_crl(second, ca.root)
    assert crl2 is not None and crl2.number == now + 1
    with pytest.raises(CertificateError, match="revoked"):
        TrustAnchor(ca.root, crl2).verify(cert)
    assert Identity.load(renewed["tls.crt"], renewed["tls.key"]).certificate.node_id == \
        "client-0"
    # A list signed by another CA, or garbage, reads as none (and is republished).
    other = identities.load_ca(identities.issue_ca("fed-a", "ML-DSA-44"))
    assert identities.read_crl(identities.next_crl(other, None, (), T0, 600), ca.root) is None
    assert identities.read_crl({identities.CRL_KEY: "junk"}, ca.root) is None
    assert RevocationList.from_pem(second[identities.CRL_KEY]).lookup(cert.serial) is not None


def test_observed_credentials_read_back_what_was_issued() -> None:
    from pqfed.operator.handlers import observe_credentials

    ca_data = identities.issue_ca("fed-a", "ML-DSA-44")
    ca = identities.load_ca(ca_data)
    ident = identities.issue_identity(ca, "client-0", Role.CLIENT, "ML-DSA-44", 600)
    crl = identities.next_crl(ca, None, [(5, RevocationReason.SUPERSEDED)], T0, 600)

    def as_listed(sec: dict[str, Any]) -> dict[str, Any]:
        import base64
        return {**sec, "data": {k: base64.b64encode(v.encode()).decode()
                                for k, v in sec.pop("stringData").items()}}

    secrets = {s["metadata"]["name"]: as_listed(s) for s in (
        m.secret(JOB, m.ca_secret_name(JOB.name), ca_data, "ca"),
        m.secret(JOB, m.crl_secret_name(JOB.name), crl, "crl"),
        m.secret(JOB, m.identity_secret_name(JOB.name, "client-0"), ident, "identity",
                 "client-0"))}
    certs, state = observe_credentials(JOB, secrets)
    cert = Certificate.from_pem(ident["tls.crt"])
    assert certs == {"client-0": CertState(cert.serial, cert.not_before, cert.not_after)}
    assert state == CrlState(T0, T0, T0 + 600, frozenset({5}))


@pytest.mark.parametrize(("args", "says"), [
    (["--node", "Client_2"], "--node"),
    (["--node", "client-2", "--reason", "bored"], "reason 'bored' is not one of"),
])
def test_revoke_cli_refuses_bad_input_before_any_request(
        args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pqfed.cli import main

    assert main(["revoke", "--job", "bc", "--kubeconfig", "/nonexistent", *args]) == 2
    assert says in capsys.readouterr().err


def test_revoking_an_external_node_puts_its_x509_serial_on_the_crl() -> None:
    """An external node (spec.externalClients) has no pod and no pqfed identity: its revocation
    lists the serial of the certificate published in JOB-cert-NODE on the job's X.509 CRL, and
    it counts against minClients like a client."""
    spec = spec_of(clients=2, minClients=2, channel={"protocol": "tls13"},
                   externalClients=[{"nodeId": "hospital-1"}])
    status, observed = started(spec)
    observed = dataclasses.replace(_certs(observed, spec), external_certificates={
        "hospital-1": 0xABC})
    certs = {n: c for n, c in observed.certificates.items() if n != "hospital-1"}
    observed = dataclasses.replace(observed, certificates=certs,
                                   crl=dataclasses.replace(observed.crl, x509_serials=frozenset()))
    plan = reconcile.plan_tick(JOB, spec, status, observed, LATER,
                               annotations=_revoke("hospital-1"), clock=T0 + 60)
    assert plan.crl == reconcile.CrlUpdate((), "revoked hospital-1", (0xABC,))
    assert plan.delete_pods == [] and plan.status.get("phase") is None  # 2 clients left
    assert "hospital-1 (key-compromise)" in cond(plan.status, "NodesRevoked")["message"]
    # One more revoked client and fewer than minClients are left: the job fails.
    plan = reconcile.plan_tick(JOB, spec, status, observed, LATER,
                               annotations=_revoke("hospital-1", "client-0"), clock=T0 + 60)
    assert plan.status["phase"] == "Failed" and "1 of 3 clients left" in plan.status["message"]
