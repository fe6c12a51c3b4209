"""`pqfed run`: a real federation (Flower deployment mode, real training) through real PQC
sidecars on this machine; and bad job files refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqfed.cli import main
from pqfed.pqc.audit import verify_audit_log
from pqfed.pqc.identity import Certificate, TrustAnchor
from pqfed.services.rounds import read_status
from pqfed.services.runner import run_local

JOB = """apiVersion: pqfed.io/v1alpha1
kind: FederationJob
metadata: {name: e2e}
spec:
  task: breast-cancer
  clients: 3
  minClients: 2
  rounds: 2
  training: {localEpochs: 2}
  compression: {method: topk+int8, topkFraction: 0.3}
"""


@pytest.mark.slow
def test_local_federation_through_pqc_sidecars(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    res = run_local(job, tmp_path / "runs", show=False, timeout=400)
    st = res["status"]
    assert st["phase"] == "Succeeded" and st["currentRound"] == 2
    assert st["accuracy"] > 0.9
    for r in st["rounds"]:
        assert sorted(r["participants"]) == ["client-0", "client-1", "client-2"]
        assert r["rejectedUpdates"] == 0 and r["cryptoSeconds"] > 0
    assert res["sidecars"]["handshakes"] >= 3  # every client came through a PQC channel
    run = Path(res["runDir"])
    ca = TrustAnchor(Certificate.from_pem((run / "identities/aggregator/ca.crt").read_text()))
    audit = verify_audit_log(run / "state/aggregator/audit.jsonl", ca)
    assert audit.events["update-accepted"] == 6 and audit.head == st["auditHead"]
    assert (run / "accuracy.png").stat().st_size > 1000


@pytest.mark.slow
def test_hierarchical_federation_through_edge_aggregators(tmp_path: Path) -> None:
    """4 clients -> 2 edge aggregators -> centre; every hop a PQC channel, every update signed
    (clients' by clients and checked by their edge, edges' by edges and checked centrally)."""
    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("metadata: {name: e2e}", "metadata: {name: hier}")
                   .replace("clients: 3", "clients: 4")
                   .replace("rounds: 2", "rounds: 2\n  hierarchy: {enabled: true, edges: 2}"))
    res = run_local(job, tmp_path / "runs", show=False, timeout=400)
    st = res["status"]
    assert st["phase"] == "Succeeded" and st["currentRound"] == 2
    assert st["accuracy"] > 0.85
    for r in st["rounds"]:
        assert sorted(r["participants"]) == ["edge-0", "edge-1"]
        assert r["rejectedUpdates"] == 0
    run = Path(res["runDir"])
    ca = TrustAnchor(Certificate.from_pem((run / "identities/aggregator/ca.crt").read_text()))
    assert verify_audit_log(run / "state/aggregator/audit.jsonl", ca).events[
        "update-accepted"] == 4
    for e, members in ((0, ["client-0", "client-2"]), (1, ["client-1", "client-3"])):
        edge_status = read_status(run / f"state/edge-{e}")
        assert edge_status is not None and edge_status["currentRound"] == 2
        for r in edge_status["rounds"]:
            assert sorted(r["participants"]) == members
        edge_audit = verify_audit_log(run / f"state/edge-{e}/audit.jsonl", ca)
        assert edge_audit.events["update-accepted"] == 4
    # clients -> edges, edges -> centre: 4 + 2 channels at least
    assert res["sidecars"]["handshakes"] >= 6


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ("rounds: 2", "spec.rounds"),
        ("minClients: 2", "spec.minClients"),
        ("task: breast-cancer", "spec.task"),
        ("rounds: 2", "spec.privacy.mode"),
    ],
)
def test_invalid_job_is_refused_before_start(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             patch: str, field: str) -> None:
    bad = {"rounds: 2": "rounds: -1", "minClients: 2": "minClients: 9",
           "task: breast-cancer": "task: mnist"}[patch]
    if field == "spec.privacy.mode":  # central DP needs individual updates, edges hide them
        bad = "rounds: 2\n  hierarchy: {enabled: true}\n  privacy: {enabled: true}"
    job = tmp_path / "bad.yaml"
    job.write_text(JOB.replace(patch, bad))
    assert main(["run", str(job), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert field in err
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "examples" / "jobs")
                                        .glob("*.yaml")), ids=lambda p: p.name)
def test_example_jobs_are_valid(path: Path) -> None:
    from pqfed.services.spec import load_job

    job = load_job(path)
    assert job.name and job.spec.rounds >= 1


@pytest.mark.slow
def test_plaintext_baseline_runs_without_sidecars(tmp_path: Path) -> None:
    """The transport benchmark's baseline: the same processes, no sidecars."""
    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("rounds: 2", "rounds: 1"))
    res = run_local(job, tmp_path / "runs", pqc=False, show=False, timeout=300)
    assert res["status"]["phase"] == "Succeeded" and not res["sidecars"]
    assert not list((Path(res["runDir"]) / "logs").glob("sidecar-*.log"))
