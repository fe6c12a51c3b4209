"""An externally enrolled node takes part in a tls13 FederationJob on the emulated cluster.

The test plays the site, with docs/pki.md's commands: `pqfed ca csr` in its own directory
(the key never leaves it), the request submitted as ConfigMap JOB-csr-NODE (what `kubectl
create configmap` + `kubectl label` do), `pqfed approve` as the job admin, `pqfed site fetch`
for the certificate, CA, CRL and spec, and `pqfed site run` starting the site's own TLS 1.3
sidecar and Flower client as host processes that reach the aggregator pod's PQC port. The job
(2 operator clients + the external node, minClients 3) succeeds with the external node among
every round's participants, its updates signed with the site's key; the site's private key is
in no Secret or ConfigMap of the cluster. A second job revokes its external node mid-run
(`pqfed revoke`): the site's CRL snapshot lists it, the aggregator refuses the site, and the
rounds after go on without it."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from pqfed.operator import enrolment, identities
from pqfed.operator import pods as m
from pqfed.pqc.pki.profile import load_certificate_pem

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SITE = "hospital-1"
SPEC: dict[str, Any] = {"task": "breast-cancer", "clients": 2, "minClients": 3, "rounds": 2,
                        "channel": {"protocol": "tls13"},
                        "externalClients": [{"nodeId": SITE}]}
TERMINAL = ("Succeeded", "Failed", "Cancelled")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pqfed.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _aggregator_ip(bed: Any, name: str) -> str | None:
    pods = bed.pods(f"pqfed.io/job={name},pqfed.io/role=aggregator")
    ready = [p for p in pods if p.status.pod_ip and any(
        c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
    return str(ready[0].status.pod_ip) if ready else None


@pytest.mark.timeout(900)  # the cluster's setup, the enrolment, two rounds on a loaded host
def test_an_external_node_takes_part_in_a_tls13_job(testbed: Any, tmp_path: Path) -> None:
    bed = testbed
    name = bed.unique_name("ext")
    t0 = time.monotonic()
    bed.create_job(name, SPEC)
    bed.wait_phase(name, ("Running", *TERMINAL), 60)
    kube = ("--kubeconfig", bed.kubeconfig, "-n", bed.namespace, "--job", name)
    site = _request(bed, name, SITE, tmp_path)
    # Before the approval there is nothing to fetch: the site cannot run.
    early = _cli("site", "fetch", *kube, "--node", SITE, "--out", str(site))
    assert early.returncode == 2 and "pqfed approve" in early.stderr, early
    _approve_and_fetch(bed, name, SITE, site)
    assert {p.name for p in site.iterdir()} >= {"tls.key", "tls.crt", "ca.crt", "crl.pem",
                                                "spec.json"}
    ip = bed.wait_for(lambda: _aggregator_ip(bed, name), 240, "the aggregator pod Ready", 1.0,
                      lambda: bed.diagnose(name))
    node = _start_site(site, ip, kube, tmp_path / "site-run.log")
    try:
        st = bed.wait_phase(name, TERMINAL, 480)
        bed.timings["external node: succeeded"] = time.monotonic() - t0
        assert node.poll() is None, (tmp_path / "site-run.log").read_text()
        assert st["phase"] == "Succeeded", bed.diagnose(name) + _site_logs(site)
        assert len(st["rounds"]) == SPEC["rounds"]
        for r in st["rounds"]:  # minClients 3: no round without the site
            assert sorted(r["participants"]) == ["client-0", "client-1", SITE], r
            assert not r.get("rejectedUpdates"), r
        sidecar = (site / "state" / "logs" / "sidecar.log").read_text()
        assert "channel with aggregator" in sidecar and "TLSv1.3, X25519MLKEM768" in sidecar
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(30)
    # The CRL snapshot the site holds is the job's current X.509 CRL.
    crl = _secret(bed, m.crl_secret_name(name))[identities.X509_CRL_KEY]
    assert (site / "crl.pem").read_text() == crl
    # The operator never held the site's key: no Secret or ConfigMap anywhere has it.
    key_body = "".join((site / "tls.key").read_text().splitlines()[1:-1])
    assert bed.stored_anywhere(key_body[:64]) == []
    # The scan does find what the cluster holds: the site's certificate, published to it.
    cert_body = "".join((site / "tls.crt").read_text().splitlines()[1:-1])
    assert bed.stored_anywhere(cert_body[:64])
    bed.delete_job(name)


REVOKED = "hospital-2"
REVOKE_SPEC: dict[str, Any] = {"task": "breast-cancer", "clients": 2, "minClients": 2,
                               "rounds": 20, "channel": {"protocol": "tls13"},
                               "timeouts": {"roundSeconds": 120},
                               "externalClients": [{"nodeId": REVOKED}]}


@pytest.mark.timeout(900)
def test_a_revoked_external_node_is_cut_off_and_its_crl_snapshot_refreshed(
        testbed: Any, tmp_path: Path) -> None:
    """`pqfed revoke` on an external node: its X.509 serial goes on the job's CRL, the
    aggregator refuses the site's channel and updates from then on, the job goes on with the
    operator's clients, and the CRL snapshot in JOB-cert-NODE (re-fetched by `pqfed site
    run`) lists the serial."""
    bed = testbed
    name = bed.unique_name("rev")
    bed.create_job(name, REVOKE_SPEC)
    bed.wait_phase(name, ("Running", *TERMINAL), 60)
    site = _enrol(bed, name, REVOKED, tmp_path)
    serial = load_certificate_pem((site / "tls.crt").read_bytes()).serial_number
    kube = ("--kubeconfig", bed.kubeconfig, "-n", bed.namespace, "--job", name)
    ip = bed.wait_for(lambda: _aggregator_ip(bed, name), 240, "the aggregator pod Ready", 1.0,
                      lambda: bed.diagnose(name))
    node = _start_site(site, ip, kube, tmp_path / "site-run.log")
    try:
        def took_part() -> int | None:
            st = bed.status(name)
            assert st.get("phase") not in TERMINAL, bed.diagnose(name)
            return next((r["round"] for r in st.get("rounds") or []
                         if REVOKED in r["participants"]), None)

        first = bed.wait_for(took_part, 360, f"a round with {REVOKED}", 1.0,
                             lambda: bed.diagnose(name) + _site_logs(site))
        revoked = _cli("revoke", *kube, "--node", REVOKED, "--reason", "key-compromise")
        assert revoked.returncode == 0, revoked.stderr
        # The operator's CRL, copied into JOB-cert-NODE, reaches the site's directory.
        bed.wait_for(lambda: serial in {r.serial_number for r in x509.load_pem_x509_crl(
            (site / "crl.pem").read_bytes())}, 120, "the site's CRL snapshot to list it",
            1.0, lambda: bed.diagnose(name))
        # The aggregator's pod holds the new CRL once its sidecar refuses or cuts the site;
        # its ServerApp re-reads the same file before it verifies the next updates.
        refused = f"serial {serial:#x} is revoked"
        bed.wait_for(lambda: refused in _aggregator_sidecar_log(bed, name), 120,
                     "the aggregator's sidecar to refuse the site", 1.0,
                     lambda: bed.diagnose(name))
        at_revocation = max(r["round"] for r in bed.status(name)["rounds"])
        st = bed.wait_phase(name, TERMINAL, 600)
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(30)
    assert st["phase"] == "Succeeded", bed.diagnose(name)
    rounds = st["rounds"]
    assert len(rounds) == REVOKE_SPEC["rounds"] and first <= at_revocation
    # A round in flight may still count it; every round started after that one does not.
    # 20 rounds: on an idle host a round takes seconds, and the revocation needs a few
    # rounds' time to reach the aggregator's pod, so 8 could all be over by then.
    later = [r for r in rounds if r["round"] > at_revocation + 1]
    assert later and all(sorted(r["participants"]) == ["client-0", "client-1"]
                         for r in later), (at_revocation, rounds)
    assert REVOKED in _condition(bed, name, "NodesRevoked")
    bed.delete_job(name)


def _aggregator_sidecar_log(bed: Any, name: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(
        (bed.dir / "cluster" / "agents").glob(
            f"*/pods/{bed.namespace}_{m.aggregator_pod_name(name)}*/sidecar*.log")))


def _request(bed: Any, name: str, node: str, tmp_path: Path) -> Path:
    """The site's side of docs/pki.md up to the approval: key and request made in the site's
    own directory, the request submitted as ConfigMap JOB-csr-NODE. Returns the directory."""
    site = tmp_path / "site"
    made = _cli("ca", "csr", "--federation", name, "--role", "client", "--node-id", node,
                "--out", str(site))
    assert made.returncode == 0, made.stderr
    bed.core.create_namespaced_config_map(bed.namespace, {
        "metadata": {"name": enrolment.request_configmap_name(name, node),
                     "labels": {enrolment.CSR_LABEL: name}},
        "data": {enrolment.CSR_KEY: (site / "tls.csr").read_text()}})
    return site


def _approve_and_fetch(bed: Any, name: str, node: str, site: Path) -> None:
    """The admin's `pqfed approve` once the operator has seen the request, then the site's
    `pqfed site fetch` of its certificate, CA, CRL and the job's spec."""
    kube = ("--kubeconfig", bed.kubeconfig, "-n", bed.namespace, "--job", name)
    bed.wait_for(lambda: "AwaitingApproval" in _enrolment(bed, name), 60, "the request seen",
                 1.0, lambda: bed.diagnose(name))
    approved = _cli("approve", *kube, "--node", node)
    assert approved.returncode == 0, approved.stderr
    cert_cm = enrolment.certificate_configmap_name(name, node)
    bed.wait_for(lambda: _configmap(bed, cert_cm), 60, f"ConfigMap {cert_cm}", 1.0,
                 lambda: bed.diagnose(name))
    fetched = _cli("site", "fetch", *kube, "--node", node, "--out", str(site))
    assert fetched.returncode == 0, fetched.stderr


def _enrol(bed: Any, name: str, node: str, tmp_path: Path) -> Path:
    """Request, approval and fetch in one. Returns the site directory."""
    site = _request(bed, name, node, tmp_path)
    _approve_and_fetch(bed, name, node, site)
    return site


def _start_site(site: Path, ip: str, kube: tuple[str, ...], log_path: Path
                ) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pqfed.cli", "site", "run", "--dir", str(site),
             "--aggregator", f"{ip}:{m.PQC_PORT}", "--partition", "1",
             "--route-port", str(_free_port()), "--runtime-port", str(_free_port()),
             "--admin-port", str(_free_port()), *kube, "--refresh", "5"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _condition(bed: Any, name: str, type_: str) -> str:
    for cond in bed.status(name).get("conditions") or []:
        if cond.get("type") == type_:
            return str(cond.get("message", ""))
    return ""


def _enrolment(bed: Any, name: str) -> str:
    for cond in bed.status(name).get("conditions") or []:
        if cond.get("type") == enrolment.ENROLMENT:
            return str(cond.get("message", ""))
    return ""


def _configmap(bed: Any, name: str) -> Any:
    try:
        return bed.core.read_namespaced_config_map(name, bed.namespace)
    except Exception:  # not yet
        return None


def _secret(bed: Any, name: str) -> dict[str, str]:
    sec = bed.core.read_namespaced_secret(name, bed.namespace)
    return {k: base64.b64decode(v).decode() for k, v in (sec.data or {}).items()}


def _site_logs(site: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted((site / "state" / "logs").glob("*.log")))
