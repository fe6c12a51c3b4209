"""``pqfed bench capacity``: one real aggregator under 10 to 1,000 emulated clients.

The aggregator is the production one, started as `pqfed run` starts it (runner.py): its PQC
sidecar (`pqfed sidecar`, Fleet paths only) in front of `pqfed fl aggregator` (SuperLink,
SuperExec, ServerApp with `VerifiedStrategy`: ML-DSA verification of every update, one vote
per certified node, decoding, FedAvg, central evaluation, checkpoint, audit log). Nothing in
it is changed or told that its clients are emulated.

The clients are emulated (testbed/bench/capacity_client.py, where what they skip and why is
written down): each has its own certificate from the job's CA, its own outbound sidecar and
pqfed1 channel, speaks Flower's Fleet API with Flower's own client code and runs pqfed's
client mods (compression, ML-DSA signature bound to job and round); they share a few
processes (`--client-procs`) and do not train.

Per client count and repetition it measures, per round: latency (the ServerApp's round
duration, status.json), CPU-seconds of the aggregator's whole process tree (sidecar,
`fl aggregator`, SuperLink, SuperExec, ServerApp), its peak proportional memory (PSS, summed
over the tree), the updates accepted and rejected, and the 1-minute load average. Writes
results.json, a Markdown table (report.md) and capacity.png to --out.

Longer than our ~500-line habit on purpose: it is one benchmark driver (settings, the
aggregator's start, per-round sampling of its process tree, the table and the curve), and
every part reads the same per-round records; split, each piece would only make sense with
the others open beside it. The emulated clients live apart, in capacity_client.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from pqfed.pqc import CertificateAuthority, Role
from pqfed.services import (
    API_GROUP_VERSION,
    KIND,
    SidecarRoute,
    aggregator_command,
    edge_command,
    edge_members,
    edge_node_id,
    free_ports,
    load_spec,
    read_status,
    sidecar_command,
    terminate_process_tree,
)

JOB_NAME = "capacity"
GROUP = "X25519_MLKEM768"
DEFAULT_CLIENTS = "10,30,100,300,1000"


@dataclass(frozen=True)
class Variant:
    """What differs between the runs a before/after comparison alternates: how the emulated
    clients poll while idle and which middleware stack the aggregator's SuperLink runs."""

    idle_backoff: bool  # clients back off as pqfed's SuperNodes (fl_node.IDLE_BACKOFF)
    superlink_middleware: str  # FlowerTuning.superlink_middleware of the SuperLink
    long_poll: bool = False  # the SuperLink holds empty pulls (fl_node.LONG_POLL_S)

    def env(self) -> dict[str, str]:
        """The aggregator's environment for this variant (services/fl_node.py reads it)."""
        return {"PQFED_SUPERLINK_MIDDLEWARE": self.superlink_middleware,
                "PQFED_LONG_POLL": "" if self.long_poll else "0"}


#: ``--variants``: "before" is pqfed before adaptive polling and the ASGI middlewares;
#: "after" adds both; "longpoll" (what `pqfed fl` runs now) adds the SuperLink's long poll.
VARIANTS = {
    "before": Variant(idle_backoff=False, superlink_middleware="stock"),
    "backoff": Variant(idle_backoff=True, superlink_middleware="stock"),
    "asgi": Variant(idle_backoff=False, superlink_middleware="asgi"),
    "after": Variant(idle_backoff=True, superlink_middleware="asgi"),
    "longpoll": Variant(idle_backoff=True, superlink_middleware="asgi", long_poll=True),
}


class CapacityError(RuntimeError):
    """A capacity run could not complete (the field names what failed)."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True)
class CapacitySettings:
    clients: int
    rounds: int = 3
    client_procs: int = 2
    poll: float = 0.1
    round_seconds: int = 300
    topk_fraction: float = 0.3
    tamper: tuple[int, ...] = ()
    replay: tuple[int, ...] = ()
    min_clients: int | None = None  # default: every client
    profile: bool = False  # py-spy the ServerApp and SuperLink (needs --py-spy)
    py_spy: str = ""
    variant: str = "longpoll"  # a key of VARIANTS
    edges: int = 0  # hierarchical mode: this many edge aggregators (0: flat)


def job_document(s: CapacitySettings) -> dict[str, Any]:
    """The job: the demo's task and compression, every client in every round (with edges:
    every edge, each over all of its clients)."""
    spec: dict[str, Any] = {
        "task": "breast-cancer", "clients": s.clients,
        "minClients": s.min_clients or (s.edges or s.clients),
        "rounds": s.rounds, "dataset": {"partition": "iid"},
        "training": {"localEpochs": 1},
        "compression": {"method": "topk+int8", "topkFraction": s.topk_fraction},
        "timeouts": {"roundSeconds": s.round_seconds}}
    if s.edges:
        spec["hierarchy"] = {"enabled": True, "edges": s.edges}
    return {"apiVersion": API_GROUP_VERSION, "kind": KIND, "metadata": {"name": JOB_NAME},
            "spec": spec}


def enroll(run_dir: Path, clients: int, edges: int = 0) -> tuple[Path, Path]:
    """A fresh federation CA and identities: the aggregator's, one per client
    (identities/client-<i>/{tls.crt,tls.key,ca.crt}) and one per edge (identities/edge-<e>),
    as `pqfed run` writes them."""
    ca = CertificateAuthority.generate(JOB_NAME)
    base = run_dir / "identities"

    def save(node_id: str, role: Role) -> Path:
        d = base / node_id
        d.mkdir(parents=True, exist_ok=True)
        ca.new_identity(node_id, role).save(d / "tls.crt", d / "tls.key")
        (d / "ca.crt").write_text(ca.root.to_pem())
        return d

    agg = save("aggregator", Role.AGGREGATOR)
    for i in range(clients):
        save(f"client-{i}", Role.CLIENT)
    for e in range(edges):
        save(edge_node_id(e), Role.EDGE)
    return agg, base


# ------------------------------------------------------------------- aggregator tree sampling

def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _role(cmdline: str) -> str:
    for marker, role in (("flwr-serverapp", "serverapp"), ("flower-superlink", "superlink"),
                         ("flower-superexec", "superexec"), (" sidecar ", "sidecar"),
                         ("fl aggregator", "fl-aggregator"), ("fl edge", "fl-edge"),
                         ("flower-supernode", "supernode")):
        if marker in cmdline:
            return role
    return "other"


class TreeSampler:
    """CPU-seconds (cumulative, including exited children the tree waited for) and PSS of
    the process trees under `roots`, sampled on a thread every `interval` seconds."""

    def __init__(self, roots: list[int], interval: float = 0.25) -> None:
        import psutil

        self.roots = [psutil.Process(p) for p in roots]
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seen: dict[int, float] = {}  # pid -> last CPU-seconds (children that exited)
        self._role: dict[int, str] = {}  # pid -> which part of the aggregator it is
        self.peak_pss_kib = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-sampler")

    def _procs(self) -> list[Any]:
        import psutil

        out = []
        for root in self.roots:
            with contextlib.suppress(psutil.Error):
                out += [root, *root.children(recursive=True)]
        return out

    def sample(self) -> tuple[float, int]:
        """(CPU-seconds of every process seen so far, PSS KiB of the live tree now)."""
        import psutil

        pss = 0
        with self._lock:
            for p in self._procs():
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    self._seen[p.pid] = t.user + t.system
                    if p.pid not in self._role:
                        self._role[p.pid] = _role(" ".join(p.cmdline()))
                    pss += _pss_kib(p.pid)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            return sum(self._seen.values()), pss

    def by_role(self) -> dict[str, float]:
        """CPU-seconds so far per part of the aggregator (sidecar, superlink, ...)."""
        out: dict[str, float] = {}
        with self._lock:
            for pid, cpu in self._seen.items():
                role = self._role.get(pid, "other")
                out[role] = out.get(role, 0.0) + cpu
        return out

    def reset_peak(self) -> int:
        with self._lock:
            peak, self.peak_pss_kib = self.peak_pss_kib, 0
        return peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# ------------------------------------------------------------------- one run

@dataclass
class _Spawned:
    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes] = field(repr=False)


@dataclass
class CapacityRun:
    settings: CapacitySettings
    run_dir: Path
    procs: list[_Spawned] = field(default_factory=list)

    def _spawn(self, name: str, argv: list[str], stdout: int | None = None,
               env_extra: dict[str, str] | None = None) -> _Spawned:
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
        popen = subprocess.Popen(argv, stdout=stdout if stdout is not None else handle,
                                 stderr=handle, env=env, start_new_session=True)
        spawned = _Spawned(name, popen, handle)
        self.procs.append(spawned)
        return spawned

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                terminate_process_tree(p.popen.pid, timeout=10)
            p.log.close()

    def run(self) -> dict[str, Any]:
        s = self.settings
        self.run_dir.mkdir(parents=True, exist_ok=True)
        job_file = self.run_dir / "job.yaml"
        job_file.write_text(yaml.safe_dump(job_document(s), sort_keys=False))
        t_enroll = time.perf_counter()
        agg_dir, ids = enroll(self.run_dir, s.clients, s.edges)
        enroll_s = time.perf_counter() - t_enroll
        fleet, status_port, secure, admin = free_ports(4)
        sidecar = self._spawn("sidecar-aggregator", sidecar_command(
            agg_dir, GROUP, admin, listen_port=secure, upstream_port=fleet,
            edge_peers=bool(s.edges)))
        state = self.run_dir / "state" / "aggregator"
        variant = VARIANTS[s.variant]
        aggregator = self._spawn(
            "aggregator", aggregator_command(job_file, agg_dir, state, fleet, status_port),
            env_extra=variant.env())
        # The clients open thousands of connections, each from an ephemeral port: the
        # aggregator's and the edges' ports (picked free, not yet bound) must be bound first.
        self._wait_listening(status_port, aggregator)
        # Who each client dials: the aggregator's sidecar, or its edge's (hierarchical).
        groups: list[tuple[str, str, list[int]]] = [
            (f"127.0.0.1:{secure}", "aggregator", list(range(s.clients)))]
        edge_roots: list[int] = []
        if s.edges:
            _, spec = load_spec(job_file)
            groups = []
            for e in range(s.edges):
                address, roots = self._start_edge(e, ids, job_file, secure, variant)
                edge_roots += roots
                groups.append((address, edge_node_id(e), edge_members(spec, e)))
        workers: list[_Spawned] = []
        t0 = time.perf_counter()
        procs_per_group = max(1, s.client_procs // len(groups))
        for address, peer_id, members in groups:
            per = -(-len(members) // procs_per_group)
            for first in range(0, len(members), per):
                chunk = members[first:first + per]
                argv = [sys.executable, "-m", "pqfed.testbed.bench.capacity_client",
                        "--identities", str(ids), "--indices", ",".join(map(str, chunk)),
                        "--aggregator", address, "--peer-id", peer_id,
                        "--poll", str(s.poll)]
                if variant.idle_backoff:
                    from pqfed.services import IDLE_BACKOFF

                    argv += ["--idle-backoff", IDLE_BACKOFF.to_arg()]
                for i in s.tamper:
                    argv += ["--tamper", str(i)]
                for i in s.replay:
                    argv += ["--replay", str(i)]
                workers.append(self._spawn(f"clients-{len(workers)}", argv,
                                           stdout=subprocess.PIPE))
        with TreeSampler([sidecar.popen.pid, aggregator.popen.pid]) as sampler, \
                TreeSampler(edge_roots) as edge_sampler:
            rounds = self._watch(aggregator, workers, sampler, state, t0,
                                 edge_sampler if s.edges else None)
        counts: dict[str, Any] = {}
        for wk in workers:
            with contextlib.suppress(OSError):
                wk.popen.terminate()
        for wk in workers:
            try:
                out, _ = wk.popen.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                wk.popen.kill()
                out, _ = wk.popen.communicate()
            for line in (out or b"").decode(errors="replace").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    counts.update(json.loads(line).get("counts", {}))
        status = read_status(state) or {}
        audit = _audit_events(state / "audit.jsonl")
        edges = [{"rounds": (read_status(self.run_dir / "state" / edge_node_id(e)) or {})
                  .get("rounds", []),
                  "audit": _audit_events(self.run_dir / "state" / edge_node_id(e)
                                         / "audit.jsonl")} for e in range(s.edges)]
        for rd in rounds:  # the clients' updates the edges accepted in that central round
            per_edge: list[dict[str, Any]] = [
                next((r for r in e["rounds"] if r.get("round") == rd["round"]), {})
                for e in edges]
            if edges:
                rd["clients_accepted"] = sum(len(r.get("participants", [])) for r in per_edge)
                rd["edge_seconds_max"] = max(r.get("durationSeconds", 0.0) for r in per_edge)
                # new global model ready -> every client holds it: to the edges, then on
                rd["edge_dispatch_max"] = max(r.get("dispatchSeconds") or 0.0 for r in per_edge)
        return {"clients": s.clients, "variant": s.variant, "client_procs": s.client_procs,
                "edges": s.edges, "edge_audit": [e["audit"] for e in edges],
                "poll_s": s.poll,
                "enroll_seconds": enroll_s, "rounds": rounds, "status": status,
                "audit": audit, "client_counts": counts, "run_dir": str(self.run_dir)}

    def _start_edge(self, e: int, ids: Path, job_file: Path, central: int, variant: Variant
                    ) -> tuple[str, list[int]]:
        """Edge ``e`` as `pqfed run` starts it: one sidecar (its clients in, the route to the
        central aggregator out) and `pqfed fl edge`; returns its clients' address and the
        pids to sample."""
        node = edge_node_id(e)
        d = ids / node
        e_fleet, e_secure, e_route, e_runtime, e_admin = free_ports(5)
        car = self._spawn(f"sidecar-{node}", sidecar_command(
            d, GROUP, e_admin, listen_port=e_secure, upstream_port=e_fleet,
            route=SidecarRoute(e_route, f"127.0.0.1:{central}", "aggregator")))
        edge = self._spawn(node, edge_command(
            job_file, e, d, self.run_dir / "state" / node, f"127.0.0.1:{e_route}", e_fleet,
            e_runtime), env_extra=variant.env())
        self._wait_listening(e_fleet, edge)
        return f"127.0.0.1:{e_secure}", [car.popen.pid, edge.popen.pid]

    def _wait_listening(self, port: int, owner: _Spawned, timeout_s: float = 300.0) -> None:
        """Until ``port`` on 127.0.0.1 accepts a connection (``owner`` binds it)."""
        import socket

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if owner.popen.poll() is not None:
                raise CapacityError(owner.name, f"exited with {owner.popen.returncode} before "
                                    f"listening on {port}; see {self.run_dir}/logs")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                        timeout=0.5):
                return
            time.sleep(0.2)
        raise CapacityError(owner.name, f"not listening on {port} after {timeout_s:.0f}s")

    def _watch(self, aggregator: _Spawned, workers: list[_Spawned], sampler: TreeSampler,
               state: Path, t0: float, edge_sampler: TreeSampler | None = None
               ) -> list[dict[str, Any]]:
        """Follows status.json; closes a round's CPU/PSS window at each status change (the
        edges' trees, when given, in the same windows)."""
        s = self.settings
        limit = s.round_seconds * (s.rounds + 2) + 120
        rounds: list[dict[str, Any]] = []
        seen = 0
        started: tuple[float, float] | None = None  # (wall, cpu) when round `seen+1` began
        roles0: dict[str, float] = {}
        edge_cpu0 = 0.0
        profiler: subprocess.Popen[bytes] | None = None
        while aggregator.popen.poll() is None:
            if time.perf_counter() - t0 > limit:
                raise CapacityError("rounds", f"{s.clients} clients: the job did not finish "
                                    f"within {limit:.0f}s; see {self.run_dir}/logs")
            for wk in workers:
                if wk.popen.poll() is not None:
                    raise CapacityError("clients", f"{wk.name} exited with "
                                        f"{wk.popen.returncode}; see {self.run_dir}/logs")
            st = read_status(state) or {}
            done = st.get("rounds", [])
            if started is None and st.get("phase") == "Running":
                cpu, _ = sampler.sample()
                sampler.reset_peak()
                if edge_sampler is not None:
                    edge_cpu0 = edge_sampler.sample()[0]
                    edge_sampler.reset_peak()
                started = (time.perf_counter(), cpu)
                roles0 = sampler.by_role()
                if s.profile and profiler is None:
                    profiler = self._profile(aggregator.popen.pid)
            if len(done) > seen and started is not None:
                cpu, _ = sampler.sample()
                roles = sampler.by_role()
                share = len(done) - seen
                by_role = {k: (v - roles0.get(k, 0.0)) / share for k, v in roles.items()}
                roles0 = roles
                for rec in done[seen:]:
                    rounds.append({
                        "round": rec["round"], "seconds": rec["durationSeconds"],
                        "cpu_seconds": (cpu - started[1]) / share,
                        "cpu_by_role": by_role,
                        "peak_pss_mib": sampler.reset_peak() / 1024,
                        "accepted": len(rec.get("participants", [])),
                        "rejected": rec.get("rejectedUpdates", 0),
                        "dispatch_seconds": rec.get("dispatchSeconds"),
                        "server_seconds": rec.get("serverSeconds"),
                        "crypto_seconds": rec.get("cryptoSeconds"),
                        "load_1m": os.getloadavg()[0],
                        "participants": rec.get("participants", []),
                    })
                if edge_sampler is not None:
                    edge_cpu = edge_sampler.sample()[0]
                    edge_pss = edge_sampler.reset_peak() / 1024
                    for rd in rounds[-share:]:
                        rd["edge_cpu_seconds"] = (edge_cpu - edge_cpu0) / share
                        rd["edge_peak_pss_mib"] = edge_pss
                    edge_cpu0 = edge_cpu
                seen = len(done)
                started = (time.perf_counter(), cpu)
            time.sleep(0.1)
        if profiler is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(30)
        if aggregator.popen.returncode != 0:
            raise CapacityError("aggregator", f"{s.clients} clients: exited with "
                                f"{aggregator.popen.returncode}; see {self.run_dir}/logs")
        return rounds

    def _profile(self, root: int) -> subprocess.Popen[bytes] | None:
        """py-spy on the ServerApp and the SuperLink for the rest of the job (--profile)."""
        import psutil

        targets = {}
        for p in psutil.Process(root).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())
                if "flwr-serverapp" in cmd:
                    targets["serverapp"] = p.pid
                elif "flower-superlink" in cmd:
                    targets["superlink"] = p.pid
        procs = []
        for name, pid in targets.items():
            out = self.run_dir / f"profile-{name}.txt"
            procs.append(subprocess.Popen(
                [s for s in (self.settings.py_spy, "record", "--pid", str(pid), "--format",
                             "raw", "--output", str(out), "--rate", "50", "--nonblocking")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return procs[0] if procs else None


def _audit_events(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                event = json.loads(line).get("event") or json.loads(line).get("type")
                counts[str(event)] = counts.get(str(event), 0) + 1
    return counts


# ------------------------------------------------------------------- statistics and report

def median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return (ys[n // 2] + ys[(n - 1) // 2]) / 2 if n else float("nan")


def bootstrap_ci(xs: list[float], *, level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the median (resampling rounds)."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"), float("nan"))
    rng = random.Random(seed)
    meds = sorted(median([rng.choice(xs) for _ in xs]) for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * resamples)]
    hi = meds[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per client count, over every measured round of its repetitions (the first
    round of each job is left out: it carries connection set-up and the dense model)."""
    rows = []
    keys = sorted({(r["clients"], r.get("variant", "after"), r.get("edges", 0)) for r in runs},
                  key=lambda k: (k[2], k[0],
                                 list(VARIANTS).index(k[1]) if k[1] in VARIANTS else 99))
    for n, variant, edges in keys:
        mine = [r for r in runs if r["clients"] == n and r.get("variant", "after") == variant
                and r.get("edges", 0) == edges]
        rounds = [rd for r in mine for rd in r["rounds"][1:]]
        if not rounds:
            rounds = [rd for r in mine for rd in r["rounds"]]
        if not rounds:
            continue
        lat = [rd["seconds"] for rd in rounds]
        cpu = [rd["cpu_seconds"] for rd in rounds]
        pss = [rd["peak_pss_mib"] for rd in rounds]
        lo, hi = bootstrap_ci(lat)
        cpu_ci = bootstrap_ci(cpu)
        rows.append({
            "clients": n, "variant": variant, "rounds": len(rounds), "latency_median": median(lat),
            "latency_ci": [lo, hi], "latency_min": min(lat), "latency_max": max(lat),
            "cpu_median": median(cpu), "cpu_ci": list(cpu_ci),
            "cpu_per_client_ms": median(cpu) / n * 1e3,
            "pss_peak_mib": max(pss), "pss_median_mib": median(pss),
            "accepted_min": min(rd["accepted"] for rd in rounds),
            "rejected_max": max(rd["rejected"] for rd in rounds),
            "load_1m": [min(rd["load_1m"] for rd in rounds), max(rd["load_1m"] for rd in rounds)],
            "cpu_by_role_median": {k: median([rd.get("cpu_by_role", {}).get(k, 0.0)
                                              for rd in rounds])
                                   for k in sorted({k for rd in rounds
                                                    for k in rd.get("cpu_by_role", {})})},
            "dispatch_median": median([rd["dispatch_seconds"] or 0.0 for rd in rounds]),
            "server_median": median([rd["server_seconds"] or 0.0 for rd in rounds]),
            "edges": edges,
            **({"edge_cpu_median": median([rd.get("edge_cpu_seconds", 0.0) for rd in rounds]),
                "edge_cpu_ci": list(bootstrap_ci([rd.get("edge_cpu_seconds", 0.0)
                                                  for rd in rounds])),
                "edge_pss_peak_mib": max(rd.get("edge_peak_pss_mib", 0.0) for rd in rounds),
                "clients_accepted_min": min(rd.get("clients_accepted", 0) for rd in rounds),
                "edge_round_median": median([rd.get("edge_seconds_max", 0.0)
                                             for rd in rounds]),
                "distribution_median": median([(rd["dispatch_seconds"] or 0.0)
                                               + rd.get("edge_dispatch_max", 0.0)
                                               for rd in rounds])}
               if edges else {}),
        })
    return rows


def report(rows: list[dict[str, Any]], failures: dict[str, str]) -> str:
    lines = ["| clients | variant | rounds | round s, median [95% CI] (min-max) | aggregator "
             "CPU-s / round [95% CI] | CPU ms / client | of it SuperLink / sidecar / ServerApp |"
             " dispatch s | peak PSS MiB | accepted (min) | rejected | load 1-min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    flat = [r for r in rows if not r.get("edges")]
    hier = [r for r in rows if r.get("edges")]
    for r in flat:
        lo, hi = r["latency_ci"]
        clo, chi = r.get("cpu_ci", (float("nan"), float("nan")))
        roles = r.get("cpu_by_role_median", {})
        split = " / ".join(f"{roles.get(k, 0.0):.2f}" for k in ("superlink", "sidecar",
                                                                "serverapp"))
        lines.append(
            f"| {r['clients']} | {r.get('variant', '')} | {r['rounds']} | "
            f"{r['latency_median']:.2f} [{lo:.2f}, "
            f"{hi:.2f}] ({r['latency_min']:.2f}-{r['latency_max']:.2f}) | "
            f"{r['cpu_median']:.2f} [{clo:.2f}, {chi:.2f}] | {r['cpu_per_client_ms']:.1f} | "
            f"{split} | {r['dispatch_median']:.2f} | "
            f"{r['pss_peak_mib']:.0f} | {r['accepted_min']} | {r['rejected_max']} | "
            f"{r['load_1m'][0]:.1f}-{r['load_1m'][1]:.1f} |")
    if hier:
        lines += ["", "| clients | edges | variant | rounds | round s, median [95% CI] | "
                  "central CPU-s / round [95% CI] | all edges CPU-s / round [95% CI] | edges "
                  "CPU ms / client | slowest edge round s | distribution s (to edges + on to "
                  "clients) | central / edges peak PSS MiB | client updates accepted (min) | "
                  "load 1-min |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in hier:
            lo, hi = r["latency_ci"]
            clo, chi = r["cpu_ci"]
            elo, ehi = r["edge_cpu_ci"]
            lines.append(
                f"| {r['clients']} | {r['edges']} | {r.get('variant', '')} | {r['rounds']} | "
                f"{r['latency_median']:.2f} [{lo:.2f}, {hi:.2f}] | "
                f"{r['cpu_median']:.2f} [{clo:.2f}, {chi:.2f}] | "
                f"{r['edge_cpu_median']:.2f} [{elo:.2f}, {ehi:.2f}] | "
                f"{r['edge_cpu_median'] / r['clients'] * 1e3:.1f} | "
                f"{r['edge_round_median']:.2f} | {r['distribution_median']:.2f} | "
                f"{r['pss_peak_mib']:.0f} / "
                f"{r['edge_pss_peak_mib']:.0f} | {r['clients_accepted_min']}/{r['clients']} | "
                f"{r['load_1m'][0]:.1f}-{r['load_1m'][1]:.1f} |")
    for n, why in failures.items():
        lines.append(f"| {n} | - | - | did not complete: {why} | | | | | | | | |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax2 = ax.twinx()
    variants = sorted({r.get("variant", "after") for r in rows},
                      key=lambda v: list(VARIANTS).index(v) if v in VARIANTS else 99)
    for v in variants:
        mine = [r for r in rows if r.get("variant", "after") == v and not r.get("edges")]
        if not mine:
            continue
        xs = [r["clients"] for r in mine]
        med = [r["latency_median"] for r in mine]
        err = [[m - r["latency_ci"][0] for m, r in zip(med, mine, strict=True)],
               [r["latency_ci"][1] - m for m, r in zip(med, mine, strict=True)]]
        tag = f" [{v}]" if len(variants) > 1 else ""
        ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=f"round latency (s){tag}")
        ax.plot(xs, [r["cpu_median"] for r in mine], marker="s",
                label=f"aggregator CPU-s / round{tag}")
        ax2.plot(xs, [r["pss_peak_mib"] for r in mine], marker="^", color="gray",
                 linestyle="--", label=f"aggregator peak PSS (MiB){tag}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients per round (emulated, real Fleet API + pqfed1 channels)")
    ax.set_ylabel("seconds")
    ax2.set_ylabel("MiB")
    ax2.set_ylim(0, 1.3 * max(r["pss_peak_mib"] for r in rows))  # memory barely moves
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_title("One pqfed aggregator (2-core host), flat federation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, runs: list[dict[str, Any]], failures: dict[str, str]) -> str:
    """results.json, report.md and capacity.png of the runs so far (rewritten after each run,
    so an interrupted sweep keeps what it measured); returns the table."""
    rows = summarize(runs)
    slim = [{**r, "status": None, "rounds": [{k: v for k, v in rd.items()
                                               if k != "participants"} for rd in r["rounds"]]}
            for r in runs]
    (out / "results.json").write_text(json.dumps(
        {"command": ["pqfed", *sys.argv[sys.argv.index("bench"):]] if "bench" in sys.argv
         else [], "host_cpus": os.cpu_count(), "rows": rows, "failures": failures,
         "runs": slim}, indent=1))
    text = report(rows, failures)
    (out / "report.md").write_text(text)
    if rows:
        plot(rows, out / "capacity.png")
    return text


# ------------------------------------------------------------------- CLI

def run(args: argparse.Namespace) -> int:
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if not counts or min(counts) < 1 or max(counts) > 1000:
        raise SystemExit(f"--clients {args.clients!r}: give counts in [1, 1000], e.g. "
                         f"{DEFAULT_CLIENTS} (the job spec allows at most 1000 clients)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import signal

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)  # `finally` stops the processes

    signal.signal(signal.SIGTERM, stop)
    if not 0 <= args.edges <= min(counts):
        raise SystemExit(f"--edges {args.edges}: give 0 (flat) up to the smallest client "
                         f"count ({min(counts)}); every edge needs a client")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants {args.variants!r}: choose from {', '.join(VARIANTS)}, "
                         "comma-separated (they alternate within each repetition)")
    runs: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    for rep in range(args.repeats):
        for n in counts:
            # alternate, and start each repetition with the other variant than the last
            for variant in variants if rep % 2 == 0 else variants[::-1]:
                result = _run_one(args, n, variant, rep, out, failures)
                if result is not None:
                    runs.append(result)
                    write_results(out, runs, failures)
    print(write_results(out, runs, failures))
    return 0 if not failures else 1


def _run_one(args: argparse.Namespace, n: int, variant: str, rep: int, out: Path,
             failures: dict[str, str]) -> dict[str, Any] | None:
    key = f"{n} ({variant}{f', {args.edges} edges' if args.edges else ''})"
    if key in failures:
        return None
    settings = CapacitySettings(
        clients=n, rounds=args.rounds, client_procs=args.client_procs, poll=args.poll,
        round_seconds=args.round_seconds,
        profile=bool(args.profile_at) and n == args.profile_at and rep == 0,
        py_spy=args.py_spy, variant=variant, edges=args.edges)
    name = f"n{n}{f'-e{args.edges}' if args.edges else ''}-{variant}-r{rep}"
    cap = CapacityRun(settings, out / name)
    print(f"capacity: {n} clients, {variant}, repetition {rep + 1}/{args.repeats}", flush=True)
    try:
        result = cap.run()
    except CapacityError as exc:
        failures[key] = str(exc)
        print(f"capacity: {exc}", flush=True)
        return None
    finally:
        cap.stop()
    result["repetition"] = rep
    for rd in result["rounds"]:
        print(f"  round {rd['round']}: {rd['seconds']:.2f}s, cpu {rd['cpu_seconds']:.2f}s,"
              f" pss {rd['peak_pss_mib']:.0f} MiB, accepted {rd['accepted']}, "
              f"rejected {rd['rejected']}, load {rd['load_1m']:.1f}, cpu by part "
              + ", ".join(f"{k} {v:.2f}" for k, v in rd["cpu_by_role"].items())
              + (f"; edges cpu {rd['edge_cpu_seconds']:.2f}s, client updates accepted "
                 f"{rd.get('clients_accepted')}" if "edge_cpu_seconds" in rd else ""),
              flush=True)
    if not args.keep:
        import shutil

        shutil.rmtree(out / name / "identities", ignore_errors=True)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", default=DEFAULT_CLIENTS, help="client counts to measure")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds per job (the first is left out of the table)")
    p.add_argument("--repeats", type=int, default=2, help="jobs per client count")
    p.add_argument("--client-procs", type=int, default=2,
                   help="processes the emulated clients share")
    p.add_argument("--poll", type=float, default=0.1,
                   help="emulated clients' Fleet poll interval (pqfed SuperNodes: 0.1 s)")
    p.add_argument("--round-seconds", type=int, default=300, help="job's round timeout")
    p.add_argument("--variants", default="longpoll",
                   help="comma-separated, alternated per client count and repetition: "
                        + "; ".join(f"{k}: idle back-off {'on' if v.idle_backoff else 'off'}, "
                                    f"SuperLink middleware {v.superlink_middleware}, long poll "
                                    f"{'on' if v.long_poll else 'off'}"
                                    for k, v in VARIANTS.items()))
    p.add_argument("--edges", type=int, default=0,
                   help="hierarchical mode: this many edge aggregators between the clients "
                        "and the aggregator (each a real `pqfed fl edge` with its sidecar)")
    p.add_argument("--profile-at", type=int, default=0,
                   help="py-spy the ServerApp and SuperLink at this client count")
    p.add_argument("--py-spy", default="py-spy", help="py-spy executable")
    p.add_argument("--keep", action="store_true", help="keep the identities")
    p.add_argument("--out", default="results/bench-capacity")
    p.set_defaults(role_func=run)
