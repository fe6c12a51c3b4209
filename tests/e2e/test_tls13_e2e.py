"""A FederationJob with `channel.protocol: tls13` on the emulated cluster: the operator issues
X.509 ML-DSA-65 identities, every sidecar speaks TLS 1.3 (X25519MLKEM768), the operator reads
the aggregator over TLS 1.3 too, and the job succeeds. A peer speaking pqfed1 with the job's
own pqfed identity cannot join it."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest

from pqfed.operator import identities
from pqfed.operator import pods as m
from pqfed.pqc.channel import connect
from pqfed.pqc.errors import PqcError
from pqfed.pqc.handshake import HandshakeConfig
from pqfed.pqc.identity import Certificate, Identity, Role, TrustAnchor
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

