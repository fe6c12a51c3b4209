"""A FederationJob with `channel.protocol: tls13` on the emulated cluster: the operator issues
X.509 ML-DSA-65 identities, every sidecar speaks TLS 1.3 (X25519MLKEM768), the operator reads
the aggregator over TLS 1.3 too, and the job succeeds. A peer speaking pqfed1 with the job's
own pqfed identity cannot join it. A site's own key is enrolled into a job after approval."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pqfed.operator import enrolment, identities
from pqfed.operator import pods as m
from pqfed.pqc import Certificate, HandshakeConfig, Identity, PqcError, Role, TrustAnchor, connect
from pqfed.pqc.pki import Usage, X509TrustAnchor
from pqfed.pqc.pki.profile import load_certificate_pem, load_private_key_pem
from pqfed.pqc.tls13 import TlsConfig, TlsContext, tls_connect

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SPEC: dict[str, Any] = {"task": "breast-cancer", "clients": 2, "minClients": 2, "rounds": 2,
                        "channel": {"protocol": "tls13"}}
TERMINAL = ("Succeeded", "Failed", "Cancelled")


def _secret(bed: Any, name: str) -> dict[str, str]:
    sec = bed.core.read_namespaced_secret(name, bed.namespace)
    return {k: base64.b64decode(v).decode() for k, v in (sec.data or {}).items()}


def _sidecar_logs(bed: Any, pod_prefix: str) -> str:
    logs = sorted((bed.dir / "cluster" / "agents").glob(
        f"*/pods/{bed.namespace}_{pod_prefix}*/sidecar*.log"))
    return "\n".join(p.read_text(errors="replace") for p in logs)


async def _pqfed1_join(ip: str, data: dict[str, str]) -> None:
    config = HandshakeConfig(Identity.load(data["tls.crt"], data["tls.key"]),
                             TrustAnchor(Certificate.from_pem(data["ca.crt"])),
                             peer_roles=(Role.AGGREGATOR,), peer_node_id=m.AGGREGATOR_NODE_ID,
                             timeout_s=10)
    channel = await connect(ip, m.PQC_PORT, config)
    await channel.close()


async def _tls13_join(ip: str, data: dict[str, str]) -> str:
    ctx = TlsContext(TlsConfig(
        load_certificate_pem(data[identities.X509_CERT_KEY]),
        load_private_key_pem(data[identities.X509_KEY_KEY].encode()),
        X509TrustAnchor(load_certificate_pem(data[identities.X509_CA_KEY])),
        peer_roles=(Role.AGGREGATOR,), peer_node_id=m.AGGREGATOR_NODE_ID), Usage.CLIENT)
    channel = await tls_connect(ip, m.PQC_PORT, ctx)
    group = f"{channel.version} {channel.group}"
    await channel.close()
    return group


def test_tls13_job_succeeds_over_tls13_and_refuses_pqfed1(testbed: Any) -> None:
    bed = testbed
    name = bed.unique_name("tls")
    t0 = time.monotonic()
    bed.create_job(name, SPEC)
    st = bed.wait_phase(name, ("Running", *TERMINAL), 60)
    assert st["channelProtocol"] == "tls13"
    client = bed.wait_for(lambda: _has_x509(bed, m.identity_secret_name(name, "client-0")),
                          60, "client-0's identity Secret with its X.509 twin")
    ca = _secret(bed, m.ca_secret_name(name))
    assert identities.X509_CA_KEY in ca
    assert identities.X509_CRL_KEY in _secret(bed, m.crl_secret_name(name))

    def agg_ip() -> str | None:
        pods = bed.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator")
        ready = [p for p in pods if p.status.pod_ip and any(
            c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
        return str(ready[0].status.pod_ip) if ready else None

    ip = bed.wait_for(agg_ip, 240, "the aggregator pod Ready", 1.0, lambda: bed.diagnose(name))
    # The job's own client identity, over pqfed1: refused (no fallback). The same client over
    # TLS 1.3 with its X.509 twin gets through: what failed was the protocol, not the network.
    with pytest.raises((PqcError, OSError)):
        asyncio.run(_pqfed1_join(ip, client))
    assert asyncio.run(_tls13_join(ip, client)) == "TLSv1.3 X25519MLKEM768"

    st = bed.wait_phase(name, TERMINAL, 420)
    bed.timings["tls13: succeeded"] = time.monotonic() - t0
    assert st["phase"] == "Succeeded", bed.diagnose(name)
    assert len(st["rounds"]) == SPEC["rounds"]
    assert all(len(r["participants"]) == 2 for r in st["rounds"])
    # Every client sidecar negotiated TLS 1.3 with the hybrid group (its log says which).
    for i in range(SPEC["clients"]):
        text = _sidecar_logs(bed, m.client_pod_name(name, i))
        assert "channel with aggregator" in text and "TLSv1.3, X25519MLKEM768" in text, text
    agg_log = _sidecar_logs(bed, m.aggregator_pod_name(name))
    assert "channel with operator" in agg_log and "TLSv1.3, X25519MLKEM768" in agg_log
    assert "(tls13) ready" in agg_log


def _has_x509(bed: Any, secret: str) -> dict[str, str] | None:
    try:
        data = _secret(bed, secret)
    except Exception:  # not issued yet
        return None
    return data if identities.X509_CERT_KEY in data else None



def _cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pqfed.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False, **kwargs)


def _enrolment(bed: Any, name: str) -> str:
    for cond in bed.status(name).get("conditions") or []:
        if cond.get("type") == enrolment.ENROLMENT:
            return str(cond.get("message", ""))
    return ""


def test_a_site_held_key_is_enrolled_after_approval(testbed: Any, tmp_path: Path) -> None:
    """docs/pki.md's enrolment commands against the cluster: the site's request waits for an
    admin, a request for another federation is refused by name, the approved one is signed by
    the job's X.509 CA, and the site's private key is nowhere in the cluster."""
    bed = testbed
    name = bed.unique_name("enr")
    # No node carries this label: the job runs (the operator reconciles it) without pods.
    nowhere = {"pqfed.io/nowhere": "true"}
    bed.create_job(name, {**SPEC, "placement": {"nodeSelector": nowhere,
                                                "aggregatorNodeSelector": nowhere}})
    bed.wait_phase(name, ("Running",), 60)
    for node, federation in (("hospital-1", name), ("hospital-2", "another-fed")):
        site = tmp_path / node
        made = _cli("ca", "csr", "--federation", federation, "--role", "client",
                    "--node-id", node, "--out", str(site))
        assert made.returncode == 0, made.stderr
        # `kubectl create configmap ... --from-file=tls.csr=...` + `kubectl label ...`
        bed.core.create_namespaced_config_map(bed.namespace, {
            "metadata": {"name": enrolment.request_configmap_name(name, node),
                         "labels": {enrolment.CSR_LABEL: name}},
            "data": {enrolment.CSR_KEY: (site / "tls.csr").read_text()}})
    text = bed.wait_for(lambda: (t := _enrolment(bed, name)) and "hospital-2" in t and t,
                        60, "the Enrolment condition", 1.0, lambda: bed.diagnose(name))
    assert "hospital-1: pending (AwaitingApproval)" in text, text
    assert "hospital-2: denied (WrongFederation)" in text, text
    cert_cm = enrolment.certificate_configmap_name(name, "hospital-1")
    assert cert_cm not in {c.metadata.name for c in
                           bed.core.list_namespaced_config_map(bed.namespace).items}
    kube = ("--kubeconfig", bed.kubeconfig, "-n", bed.namespace, "--job", name)
    refused = _cli("approve", *kube, "--node", "hospital-2")
    assert refused.returncode == 2 and "WrongFederation" in refused.stderr, refused
    approved = _cli("approve", *kube, "--node", "hospital-1")
    assert approved.returncode == 0, approved.stderr

    def published() -> Any:
        try:
            return bed.core.read_namespaced_config_map(cert_cm, bed.namespace)
        except Exception:  # not yet
            return None

    cm = bed.wait_for(published, 60, f"ConfigMap {cert_cm}", 1.0, lambda: bed.diagnose(name))
    site = tmp_path / "hospital-1"
    key = load_private_key_pem((site / "tls.key").read_bytes())
    cert = load_certificate_pem(cm.data["tls.crt"])
    assert cert.public_key() == key.public_key()
    ca_pem = _secret(bed, m.ca_secret_name(name))[identities.X509_CA_KEY]
    assert cm.data["ca.crt"] == ca_pem
    node = X509TrustAnchor(load_certificate_pem(ca_pem)).verify(
        cert, roles=(Role.CLIENT,), node_id="hospital-1", usage=Usage.CLIENT)
    assert node.federation == name
    bed.wait_for(lambda: "hospital-1: issued" in _enrolment(bed, name), 30, "issued")
    # The operator never held the site's key: no Secret or ConfigMap anywhere has it.
    key_body = "".join((site / "tls.key").read_text().splitlines()[1:-1])
    assert bed.stored_anywhere(key_body[:64]) == []
    bed.delete_job(name)
