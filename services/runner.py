"""`pqfed run job.yaml`: a whole federation on one machine, without Kubernetes.

Starts, as local processes, exactly what the operator starts as pods: the aggregator
(`pqfed fl aggregator`) behind its PQC sidecar, and per client a sidecar plus
`pqfed fl client`. A fresh federation CA issues every identity. The job file is validated
before anything starts. Shows a progress bar per round and ends with a summary; writes
results.json and a PNG plot.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from pqfed.pqc import CertificateAuthority, Identity, Role
from pqfed.pqc.backends import BACKEND_ENV
from pqfed.services.commands import (
    SidecarRoute,
    aggregator_command,
    client_command,
    edge_command,
    sidecar_command,
)
from pqfed.services.hierarchy import edge_members, edge_node_id
from pqfed.services.ports import free_ports
from pqfed.services.procs import terminate_process_tree
from pqfed.services.rounds import read_status
from pqfed.services.spec import FederationJobFile, check_runnable, load_job

# Every process `pqfed run` starts, and everything those start, inherit this variable with the
# run's id: the last sweep of `stop` finds what escaped the process trees (a grandchild started
# after the tree was listed, or one whose parent died first and that was re-parented).
RUN_ID_ENV = "PQFED_LOCAL_RUN_ID"


class Interrupted(KeyboardInterrupt):
    """`pqfed run` got SIGINT or SIGTERM; every process it started has been stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _SignalGuard:
    """SIGINT/SIGTERM become `Interrupted`, except inside `critical()`, where they are held
    until it ends: between `Popen` returning and the process being recorded a signal would
    leak that process, and a second Ctrl-C must not cut the cleanup short."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.depth:
            self.pending = self.pending or signum
            return
        raise Interrupted(signum)

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread receives signals; a caller there owns them
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def critical(self, *, deliver: bool = True) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if deliver and not self.depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes] = field(repr=False)


@dataclass
class LocalFederation:
    job: FederationJobFile
    job_file: Path
    run_dir: Path
    pqc: bool = True
    attackers: frozenset[int] = frozenset()
    procs: list[_Proc] = field(default_factory=list)
    admin_ports: dict[str, int] = field(default_factory=dict)
    status_port: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    guard: _SignalGuard = field(default_factory=_SignalGuard)

    def _identity_dir(self, ident: Identity, ca: CertificateAuthority) -> Path:
        d = self.run_dir / "identities" / ident.certificate.node_id
        d.mkdir(parents=True, exist_ok=True)
        ident.save(d / "tls.crt", d / "tls.key")
        (d / "ca.crt").write_text(ca.root.to_pem())
        return d

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = self.run_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        # Every process (sidecars, in-process identities) uses the job's crypto backend.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", RUN_ID_ENV: self.run_id,
               BACKEND_ENV: self.job.spec.crypto.backend}
        with self.guard.critical():  # started == recorded, whatever signal arrives
            handle = log.open("wb")
            popen = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
            self.procs.append(_Proc(name, popen, log, handle))

    def start(self) -> None:
        spec = self.job.spec
        n = spec.clients
        ca = CertificateAuthority.generate(self.job.name, algorithm=spec.crypto.signature)
        agg = ca.new_identity("aggregator", Role.AGGREGATOR, algorithm=spec.crypto.signature)
        agg_dir = self._identity_dir(agg, ca)
        edges = spec.hierarchy.edges if spec.hierarchy.enabled else 0
        (fleet, self.status_port, secure, agg_admin, *rest) = free_ports(4 + 3 * n + 5 * edges)
        groups = "X25519_MLKEM1024" if spec.crypto.kem == "ML-KEM-1024" else "X25519_MLKEM768"
        if self.pqc:
            self._spawn("sidecar-aggregator", sidecar_command(
                agg_dir, groups, agg_admin, listen_port=secure, upstream_port=fleet,
                edge_peers=bool(edges)))
            self.admin_ports["aggregator"] = agg_admin
        self._spawn("aggregator", aggregator_command(
            self.job_file, agg_dir, self.run_dir / "state" / "aggregator", fleet,
            self.status_port, poisoning=bool(self.attackers)))
        # Hierarchical jobs: clients dial their edge's sidecar instead of the aggregator's.
        direct = secure if self.pqc else fleet  # plaintext baseline: straight to SuperLink
        client_peer = {i: (f"127.0.0.1:{direct}", "aggregator") for i in range(n)}
        if spec.hierarchy.enabled:
            edge_ports = rest[3 * n :]
            for e in range(edges):
                e_fleet, e_secure, e_route, e_runtime, e_admin = edge_ports[5 * e : 5 * e + 5]
                node = edge_node_id(e)
                d = self._identity_dir(
                    ca.new_identity(node, Role.EDGE, algorithm=spec.crypto.signature), ca)
                upstream = f"127.0.0.1:{e_route}" if self.pqc else f"127.0.0.1:{fleet}"
                if self.pqc:
                    # One sidecar, both directions: inbound from the edge's clients to its
                    # SuperLink, outbound route to the central aggregator.
                    self._spawn(f"sidecar-{node}", sidecar_command(
                        d, groups, e_admin, listen_port=e_secure, upstream_port=e_fleet,
                        route=SidecarRoute(e_route, f"127.0.0.1:{secure}", "aggregator")))
                    self.admin_ports[node] = e_admin
                self._spawn(node, edge_command(
                    self.job_file, e, d, self.run_dir / "state" / node, upstream, e_fleet,
                    e_runtime))
                for i in edge_members(spec, e):
                    client_peer[i] = (f"127.0.0.1:{e_secure if self.pqc else e_fleet}", node)
        for i in range(n):
            route, runtime, admin = rest[3 * i : 3 * i + 3]
            peer, peer_id = client_peer[i]
            ident = ca.new_identity(f"client-{i}", Role.CLIENT, algorithm=spec.crypto.signature)
            d = self._identity_dir(ident, ca)
            if self.pqc:
                self._spawn(f"sidecar-client-{i}", sidecar_command(
                    d, groups, admin, route=SidecarRoute(route, peer, peer_id)))
                self.admin_ports[f"client-{i}"] = admin
            superlink = f"127.0.0.1:{route}" if self.pqc else peer
            self._spawn(f"client-{i}", client_command(
                self.job_file, i, d, self.run_dir / "state" / f"client-{i}", superlink,
                runtime, attack="label-flip" if i in self.attackers else None))

    def aggregator(self) -> _Proc:
        return next(p for p in self.procs if p.name == "aggregator")

    def status(self) -> dict[str, Any] | None:
        return read_status(self.run_dir / "state" / "aggregator")

    def check_alive(self) -> None:
        for p in self.procs:
            if p.name != "aggregator" and p.popen.poll() is not None:
                tail = p.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{tail}")

    def sidecar_metrics(self) -> dict[str, float]:
        """Sums of handshake time and wire bytes over all sidecars (Prometheus text)."""
        totals = {"handshake_seconds": 0.0, "handshakes": 0.0, "wire_bytes_tx": 0.0}
        pattern = re.compile(r"^(pqfed_\w+)(\{[^}]*\})? ([0-9.e+-]+)$")
        for port in self.admin_ports.values():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                m = pattern.match(line)
                if not m:
                    continue
                name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
                if name == "pqfed_handshake_seconds_sum":
                    totals["handshake_seconds"] += value
                elif name == "pqfed_handshake_seconds_count":
                    totals["handshakes"] += value
                elif name == "pqfed_channel_bytes_total" and 'direction="tx"' in labels:
                    totals["wire_bytes_tx"] += value
        return totals

    def stop(self) -> None:
        """Stops every process this run started and everything they started. Signals that
        arrive meanwhile wait (`Interrupted` is raised by the caller's guard afterwards)."""
        with self.guard.critical(deliver=False):
            for p in reversed(self.procs):
                if p.popen.poll() is None:
                    terminate_process_tree(p.popen.pid, timeout=10)
                p.handle.close()
            for pid in run_processes(self.run_id):
                terminate_process_tree(pid, timeout=5)


def run_processes(run_id: str) -> list[int]:
    """Pids of live processes that carry `run_id` in their environment."""
    import psutil

    marker = f"{RUN_ID_ENV}={run_id}".encode()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as fh:
                if marker in fh.read().split(b"\0"):
                    found.append(proc.pid)
        except OSError:
            continue  # gone, or not ours to read
    return found


def run_local(job_file: Path, out_dir: Path, *, pqc: bool = True,
              attackers: frozenset[int] = frozenset(), show: bool = True,
              timeout: float | None = None) -> dict[str, Any]:
    """Runs the job; returns the results dict (also written to out_dir/results.json)."""
    job = load_job(job_file)  # raises JobSpecError naming the field before anything starts
    check_runnable(job.spec, str(job_file))
    if job.spec.secure_aggregation.enabled:
        from pqfed.services.secagg import check_secagg_spec

        check_secagg_spec(job.spec, str(job_file))
    run_dir = out_dir / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    fed = LocalFederation(job, job_file.resolve(), run_dir, pqc=pqc, attackers=attackers)
    spec = job.spec
    limit = timeout or spec.timeouts.round_seconds * (spec.rounds + 2)
    t0 = time.time()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(quiet=not show, width=None if sys.stdout.isatty() else 150)
    fed.guard.install()
    try:
        fed.start()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=console, transient=False) as progress:
            task = progress.add_task(f"{job.name}: starting", total=spec.rounds)
            while fed.aggregator().popen.poll() is None:
                fed.check_alive()
                st = fed.status() or {}
                rounds = st.get("rounds", [])
                if rounds:
                    last = rounds[-1]
                    progress.update(task, completed=len(rounds), description=(
                        f"{job.name}: round {last['round']} acc {last['accuracy']:.3f} "
                        f"({last['durationSeconds']:.1f}s)"))
                if time.time() - t0 > limit:
                    raise TimeoutError(f"job {job.name} did not finish in {limit:.0f}s")
                time.sleep(0.3)
            st = fed.status() or {}
            progress.update(task, completed=len(st.get("rounds", [])))
        metrics = fed.sidecar_metrics() if pqc else {}
        rc = fed.aggregator().popen.returncode
    finally:
        try:
            fed.stop()
        finally:
            fed.guard.restore()
    if fed.guard.pending is not None:  # a signal that arrived while stopping
        raise Interrupted(fed.guard.pending)
    results = {"job": job.name, "pqc": pqc, "returncode": rc, "wallSeconds": time.time() - t0,
               "spec": spec.model_dump(by_alias=True), "status": st, "sidecars": metrics,
               "runDir": str(run_dir)}
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    if st.get("rounds"):
        _plot(st, run_dir / "accuracy.png", job.name)
    if show:
        _summary(console, results)
    if rc != 0:
        agg_log = fed.aggregator().log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"job {job.name} failed (aggregator exit {rc}); see {run_dir}/logs\n"
                           f"{agg_log}")
    return results


def _summary(console: Any, results: dict[str, Any]) -> None:
    from rich.table import Table

    st = results["status"]
    table = Table(title=f"{results['job']}: {st.get('phase')} in {results['wallSeconds']:.0f}s"
                        f" ({'PQC sidecars' if results['pqc'] else 'plaintext'})")
    for col in ("round", "accuracy", "loss", "sent KiB", "received KiB", "crypto ms",
                "round s", "participants", "rejected", "epsilon"):
        table.add_column(col, justify="right")
    for r in st.get("rounds", []):
        eps = r.get("epsilon")
        table.add_row(str(r["round"]), f"{r['accuracy']:.4f}", f"{r['loss']:.4f}",
                      f"{r['bytesSent'] / 1024:.1f}", f"{r['bytesReceived'] / 1024:.1f}",
                      f"{r['cryptoSeconds'] * 1e3:.1f}", f"{r['durationSeconds']:.2f}",
                      str(len(r["participants"])), str(r["rejectedUpdates"]),
                      "-" if eps is None else f"{eps:.2f}")
    console.print(table)
    sc = results.get("sidecars") or {}
    if sc:
        console.print(f"PQC channels: {int(sc['handshakes'])} handshakes, "
                      f"{sc['handshake_seconds'] * 1e3:.1f} ms total; "
                      f"{sc['wire_bytes_tx'] / 1024:.1f} KiB on the wire")
    console.print(f"audit log head: {st.get('auditHead', '-')}; results: "
                  f"{results['runDir']}/results.json, accuracy.png")


def _plot(status: dict[str, Any], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = status["rounds"]
    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["accuracy"] for r in rounds], marker="o", label="global accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (global test set)")
    ax.set_title(f"{name}")
    ax2 = ax.twinx()
    ax2.bar(xs, [r["bytesReceived"] / 1024 for r in rounds], alpha=0.25, color="gray",
            label="update KiB received")
    ax2.set_ylabel("KiB received by the aggregator")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
