"""`pqfed run`: a real federation (Flower deployment mode, real training) through real PQC
sidecars on this machine; bad job files refused before anything starts (and the one table of
invalid jobs in test_invalid_jobs.py); SIGINT/SIGTERM at any moment leave no process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pqfed.cli import main
from pqfed.pqc.audit import verify_audit_log
from pqfed.pqc.identity import Certificate, Identity, Role, TrustAnchor
from pqfed.services.rounds import read_status
from pqfed.services.runner import LocalFederation, run_local

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


HIER_JOB = (JOB.replace("metadata: {name: e2e}", "metadata: {name: hier}")
            .replace("clients: 3", "clients: 4")
            .replace("rounds: 2", "rounds: 2\n  hierarchy: {enabled: true, edges: 2}"))


async def _fleet_request(port: int, ident: Identity, trust: TrustAnchor) -> bytes:
    """A Fleet API request to the central aggregator's sidecar under `ident`; the bytes
    that come back (b"" when the channel is refused)."""
    import asyncio

    from pqfed.pqc.channel import client_channel
    from pqfed.pqc.errors import PqcError
    from pqfed.pqc.handshake import HandshakeConfig

    config = HandshakeConfig(ident, trust, peer_roles=(Role.AGGREGATOR,),
                             peer_node_id="aggregator")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:  # not listening yet
        return b""
    try:
        channel = await client_channel(reader, writer, config)
        await channel.send(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Length: 0\r\n\r\n")
        return await asyncio.wait_for(channel.recv(), 20)
    except (PqcError, OSError, TimeoutError):
        return b""
    finally:
        writer.close()


@pytest.mark.slow
def test_hierarchical_centre_refuses_client_certificates(tmp_path: Path) -> None:
    """The central aggregator's sidecar of a hierarchical job, as `pqfed run` starts it, lets
    edges reach the Fleet API and refuses a client certificate at the handshake: no client
    can bypass its edge (nor register SuperNodes at the centre)."""
    import asyncio
    import urllib.request

    from pqfed.services.spec import load_job

    job_file = tmp_path / "job.yaml"
    job_file.write_text(HIER_JOB)
    fed = LocalFederation(load_job(job_file), job_file, tmp_path / "run")
    try:
        fed.start()
        argv = next(p for p in fed.procs if p.name == "sidecar-aggregator").popen.args
        port = int(str(argv[argv.index("--listen") + 1]).rsplit(":", 1)[1])
        ids = tmp_path / "run" / "identities"
        trust = TrustAnchor(Certificate.from_pem((ids / "aggregator/ca.crt").read_text()))

        def ask(node: str) -> bytes:
            ident = Identity.load_files(ids / node / "tls.crt", ids / node / "tls.key")
            return asyncio.run(_fleet_request(port, ident, trust))

        deadline = time.monotonic() + 120
        while not (answer := ask("edge-0")).startswith(b"HTTP/1.1") and \
                time.monotonic() < deadline:  # the sidecar and SuperLink may be starting
            time.sleep(1)
        assert answer.startswith(b"HTTP/1.1")  # an edge reaches the Fleet API
        assert ask("client-0") == b""
        admin = fed.admin_ports["aggregator"]
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert ('pqfed_channel_failures_total{field="client_flight.certificate.role",'
                'stage="handshake"} 1.0') in metrics
    finally:
        fed.stop()


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


# ---- interrupted runs -----------------------------------------------------------------------

def _tagged(tag: str) -> dict[int, tuple[int, int]]:
    """Live processes whose environment carries `tag` -> (process group, session)."""
    marker = f"PQFED_TEST_TAG={tag}".encode()
    found: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pid = int(entry.name)
                found[pid] = (os.getpgid(pid), os.getsid(pid))
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile, or a zombie (no environment left)
    return found


def _logs(run_root: Path) -> list[Path]:
    return list(run_root.glob("*/logs/*.log"))


def _first_round_done(run_root: Path) -> bool:
    return any((read_status(d) or {}).get("rounds") for d in run_root.glob("*/state/aggregator"))


# (moment, signal): before anything started, while the processes are being spawned, right
# after the last one, and with a round done and the clients training the next.
MOMENTS: list[tuple[str, signal.Signals]] = [
    ("at-once", signal.SIGINT),
    ("first-process", signal.SIGTERM),
    ("half-spawned", signal.SIGINT),
    ("all-spawned", signal.SIGTERM),
    ("clients-working", signal.SIGINT),
    ("clients-working", signal.SIGTERM),
]


@pytest.mark.slow
@pytest.mark.parametrize(("moment", "sig"), MOMENTS, ids=lambda v: getattr(v, "name", v))
def test_interrupted_run_leaves_no_process_behind(tmp_path: Path, moment: str,
                                                  sig: signal.Signals) -> None:
    """`pqfed run` with 3 clients (7 processes through PQC sidecars) gets SIGINT or SIGTERM at
    one moment; afterwards no process it started, directly or not, may be alive, and no
    process group or session of one either."""
    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("rounds: 2", "rounds: 200"))
    runs = tmp_path / "runs"
    tag = uuid.uuid4().hex
    env = {**os.environ, "PQFED_TEST_TAG": tag}
    # Its own session, as a shell's job: the signal reaches `pqfed run` only, like Ctrl-C does
    # (the processes it starts live in sessions of their own). SIGINT at its default action,
    # as in a foreground job: when the tests themselves run in a non-interactive shell's
    # background (`make test &`), SIGINT is ignored and an ignored signal survives exec, so
    # the "at-once" SIGINT, arriving before pqfed installs its handlers, would be lost.
    # A handled signal is reset to its default by exec, an ignored one is not.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pqfed.cli", "run", str(job), "--out",
                                 str(runs)], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, previous)
    ready = {
        "at-once": lambda: True,
        "first-process": lambda: len(_logs(runs)) >= 1,
        "half-spawned": lambda: len(_logs(runs)) >= 4,
        "all-spawned": lambda: len(_logs(runs)) >= 7,
        "clients-working": lambda: _first_round_done(runs),
    }[moment]
    seen: dict[int, tuple[int, int]] = {}
    try:
        deadline = time.monotonic() + 240
        while not ready():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, f"{moment} not reached"
            seen.update(_tagged(tag))
            time.sleep(0.05)
        seen.update(_tagged(tag))
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
        err = proc.stderr.read().decode() if proc.stderr else ""
        survivors = _tagged(tag)
    finally:
        if proc.poll() is None:
            proc.kill()
        # Whatever failed above, the run's processes must not outlive the test (they would
        # load the machine for every later test).
        for pid in _tagged(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not survivors, f"still running after {sig.name} at {moment}: {survivors}"
    assert rc != 0, err
    if moment != "at-once":  # the handlers are installed before the first process starts
        assert rc == 128 + sig, err
        assert "every process of the run was stopped" in err
    groups = {g for pid, (g, _) in seen.items() if pid != proc.pid}
    sessions = {s for pid, (_, s) in seen.items() if pid != proc.pid}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        with contextlib.suppress(OSError):
            assert os.getpgid(pid) not in groups and os.getsid(pid) not in sessions, pid
