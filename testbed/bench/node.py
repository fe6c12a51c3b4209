"""``pqfed bench node``: what runs on every (emulated or real) node.

Under the aggregator's lock (one node at a time): ML-KEM-768 / ML-DSA-65 primitives on every
available backend, AEAD throughput, handshakes to the aggregator over the network (hybrid PQ
vs classical) and channel throughput through a local PQC sidecar vs plaintext (with the
sidecar's CPU and RSS). Then, together with the other nodes (barriers), its share of the
seed-004 "distributed" crypto work. Prints progress lines and one JSON result (see common).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pqfed.services import free_ports
from pqfed.testbed.bench.common import (
    AggregatorPorts,
    Barrier,
    Material,
    control_finished,
    control_lock,
    emit_progress,
    emit_result,
    host_info,
    shares,
    stats,
)

KEM, SIG = "ML-KEM-768", "ML-DSA-65"


# --- primitives --------------------------------------------------------------------------

def bench_primitives(backend_name: str, n: int) -> dict[str, Any]:
    from pqfed.pqc.backends import get_backend

    be = get_backend(backend_name)
    kem = be.kem_generate(KEM)
    kem_pk = kem.public_bytes()
    ct, _ = be.kem_encapsulate(KEM, kem_pk)
    sig = be.sig_generate(SIG)
    sig_pk = sig.public_bytes()
    msgs = [os.urandom(1024) for _ in range(64)]  # distinct messages: ML-DSA's rejection loop
    sigs = [sig.sign(m) for m in msgs]
    ops: dict[str, Callable[[int], object]] = {
        f"{KEM} keygen": lambda i: be.kem_generate(KEM).public_bytes(),
        f"{KEM} encaps": lambda i: be.kem_encapsulate(KEM, kem_pk),
        f"{KEM} decaps": lambda i: kem.decapsulate(ct),
        f"{SIG} keygen": lambda i: be.sig_generate(SIG).public_bytes(),
        f"{SIG} sign": lambda i: sig.sign(msgs[i % 64]),
        f"{SIG} verify": lambda i: be.sig_verify(SIG, sig_pk, msgs[i % 64], sigs[i % 64]),
    }
    out: dict[str, Any] = {}
    for name, fn in ops.items():
        for i in range(max(3, n // 10)):
            fn(i)
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            fn(i)
            samples.append(time.perf_counter() - t0)
        out[name] = stats(samples)
    return out


def bench_aead(total_mib: float) -> dict[str, Any]:
    """One-shot AEAD throughput of the two record suites (64 KiB records), best of 3."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    record = os.urandom(1 << 16)
    count = max(8, int(total_mib * 16))
    out: dict[str, Any] = {}
    for name, aead in (("AES-256-GCM", AESGCM(os.urandom(32))),
                       ("CHACHA20-POLY1305", ChaCha20Poly1305(os.urandom(32)))):
        nonce = os.urandom(12)
        for _ in range(4):
            aead.encrypt(nonce, record, None)
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(count):
                aead.encrypt(nonce, record, None)  # one nonce: a timing loop, nothing is kept
            best = max(best, count * len(record) / (time.perf_counter() - t0) / 1e6)
        out[name] = {"MBps": best}
    return out


# --- handshakes over the network -----------------------------------------------------------

async def _handshakes(host: str, ports: AggregatorPorts, material: Material, n: int
                      ) -> dict[str, Any]:
    from pqfed.pqc import connect

    cfgs = {"pq": material.handshake_config("pq", "client"),
            "classical": material.handshake_config("classical", "client")}
    port = {"pq": ports.handshake_pq, "classical": ports.handshake_classical}
    samples: dict[str, list[float]] = {k: [] for k in cfgs}
    wire: dict[str, tuple[int, int]] = {}
    for i in range(n + 3):  # interleaved, so drift and noise hit both alike; 3 warm-ups
        for kind, cfg in cfgs.items():
            t0 = time.perf_counter()
            ch = await connect(host, port[kind], cfg)
            dt = time.perf_counter() - t0
            wire[kind] = (ch.handshake.bytes_sent, ch.handshake.bytes_received)
            suite = ch.session.suite.name
            ch.abort()
            if i >= 3:
                samples[kind].append(dt)
    out: dict[str, Any] = {}
    for kind, s in samples.items():
        out[kind] = {**stats(s), "bytes_sent": wire[kind][0], "bytes_received": wire[kind][1]}
    out["suite"] = suite
    out["ratio_mean"] = out["pq"]["mean_us"] / out["classical"]["mean_us"]
    out["ratio_p50"] = out["pq"]["p50_us"] / out["classical"]["p50_us"]
    return out


def bench_handshake(host: str, ports: AggregatorPorts, material: Material, n: int
                    ) -> dict[str, Any]:
    return asyncio.run(_handshakes(host, ports, material, n))


# --- channel throughput: plaintext to the sink vs through the local sidecar ------------------

async def transfer(host: str, port: int, total: int, timeout: float = 300) -> float:
    """Sends `total` bytes to the aggregator's sink; returns bytes/s. The clock starts once
    the sink answered the header (so a sidecar's handshake is not counted) and stops at the
    sink's acknowledgement of the last byte."""
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
    try:
        w.write(struct.pack("!Q", total))
        await w.drain()
        if await asyncio.wait_for(r.readexactly(1), timeout) != b"R":
            raise ConnectionError("sink did not answer R")
        block = os.urandom(1 << 16)
        t0 = time.perf_counter()
        sent = 0
        while sent < total:
            chunk = block[: min(len(block), total - sent)]
            w.write(chunk)
            sent += len(chunk)
            await w.drain()
        if await asyncio.wait_for(r.readexactly(1), timeout) != b"K":
            raise ConnectionError("sink did not acknowledge")
        return total / (time.perf_counter() - t0)
    finally:
        w.close()
        with contextlib.suppress(Exception):
            await w.wait_closed()


def wait_ready(admin_port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"sidecar (admin port {admin_port}) not ready after {timeout:.0f}s")


def scrape_metrics(admin_port: int) -> dict[str, float]:
    """Handshake and byte counters from a sidecar's Prometheus /metrics."""
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        key = {
            'pqfed_channel_bytes_total{direction="tx"}': "wire_bytes_tx",
            'pqfed_channel_bytes_total{direction="rx"}': "wire_bytes_rx",
            'pqfed_handshake_seconds_count{side="client"}': "handshakes",
            'pqfed_handshake_seconds_sum{side="client"}': "handshake_seconds",
            'pqfed_handshake_seconds_count{side="server"}': "handshakes_served",
            'pqfed_handshake_seconds_sum{side="server"}': "handshake_seconds_served",
        }.get(name)
        if key:
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


class ProcSampler:
    """CPU (% of one core) and RSS of a process tree, sampled on a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self.rss: list[float] = []
        self._cpu0 = self._cpu()
        self._t0 = time.perf_counter()
        self.cpu_seconds = 0.0
        self.wall_seconds = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self) -> float:
        t = self._proc.cpu_times()
        return float(t.user + t.system)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.rss.append(self._proc.memory_info().rss / 2**20)
            self._stop.wait(self._interval)

    def __enter__(self) -> ProcSampler:
        self._cpu0 = self._cpu()
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.wall_seconds = time.perf_counter() - self._t0
        with contextlib.suppress(Exception):
            self.cpu_seconds = self._cpu() - self._cpu0

    def summary(self) -> dict[str, float]:
        return {
            "cpu_seconds": self.cpu_seconds,
            "cpu_percent": 100 * self.cpu_seconds / self.wall_seconds if self.wall_seconds else 0,
            "rss_mib_peak": max(self.rss, default=0.0),
            "rss_mib_mean": sum(self.rss) / len(self.rss) if self.rss else 0.0,
        }


def start_sidecar(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pqfed.cli", "sidecar", *argv,
                             "--log-level", "warning"], stdout=subprocess.DEVNULL,
                            start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _sustained(host: str, port: int, total: int, min_seconds: float) -> tuple[float, int]:
    """Transfers of `total` bytes until `min_seconds` of transfer time (at least one, at
    most 50): (bytes/s over them all, transfers made)."""
    sent, busy, count = 0, 0.0, 0
    while count == 0 or (busy < min_seconds and count < 50):
        bps = asyncio.run(transfer(host, port, total))
        busy += total / bps
        sent += total
        count += 1
    return sent / busy, count


def bench_throughput(host: str, ports: AggregatorPorts, material: Material, total: int,
                     min_seconds: float) -> dict[str, Any]:
    entry, admin = free_ports(2)
    res: dict[str, Any] = {"bytes": total, "min_seconds": min_seconds}
    warm = 1 << 16
    asyncio.run(transfer(host, ports.sink, warm))  # warm-up (TCP, ARP, the sink)
    res["plaintext_Bps"], res["plaintext_transfers"] = _sustained(host, ports.sink, total,
                                                                  min_seconds)
    proc = start_sidecar([
        "--cert", str(material.path("pq", "client.crt")),
        "--key", str(material.path("pq", "client.key")),
        "--ca", str(material.path("pq", "ca.crt")),
        "--route", f"127.0.0.1:{entry}={host}:{ports.secure}@aggregator",
        "--admin", f"127.0.0.1:{admin}"])
    try:
        t0 = time.perf_counter()
        wait_ready(admin, proc)
        res["sidecar_start_seconds"] = time.perf_counter() - t0
        import psutil

        idle_rss = psutil.Process(proc.pid).memory_info().rss / 2**20
        asyncio.run(transfer("127.0.0.1", entry, warm))  # warm-up: the first secure channel
        with ProcSampler(proc.pid) as sampler:
            res["secure_Bps"], count = _sustained("127.0.0.1", entry, total, min_seconds)
        res["secure_transfers"] = count
        res["sidecar"] = {**sampler.summary(), "rss_mib_idle": idle_rss,
                          "metrics": scrape_metrics(admin)}
    finally:
        stop_process(proc)
    res["ratio"] = res["secure_Bps"] / res["plaintext_Bps"]
    tx = res["sidecar"]["metrics"].get("wire_bytes_tx")
    if tx:  # app bytes through the sidecar: the warm-up and `count` transfers, 8-byte headers
        res["wire_overhead"] = tx / (warm + count * total + 8 * (count + 1)) - 1
    return res


# --- seed-004: this node's share of the per-round crypto ------------------------------------

def seed_share(args: argparse.Namespace, material: Material, ports: AggregatorPorts,
               clients: list[int], step: Callable[[str], None]) -> dict[str, Any]:
    from pqfed.pqc.bench import peer_init, peer_task

    peer_init(material.peer_pems())
    for i in range(2):
        peer_task(i)  # warm-up
    out: dict[str, Any] = {"share": {}, "seconds": {}}
    for n in clients:
        share = shares(n, args.nodes)[args.index]
        out["share"][str(n)] = share
        times = []
        for r in range(args.repeats):
            barrier = Barrier(args.aggregator, ports.control, f"seed-{n}-{r}", args.nodes,
                              args.name, args.timeout)
            t0 = time.perf_counter()
            for j in range(share):
                peer_task(j)
            dt = time.perf_counter() - t0
            barrier.done(dt)
            times.append(dt)
        out["seconds"][str(n)] = times
        step(f"seed {n} clients")
    return out


# --- entry point ----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    ports = AggregatorPorts.parse(args.ports)
    skip = set(args.skip.split(",")) if args.skip else set()
    clients = [int(c) for c in args.clients.split(",")] if args.clients else []
    material_dir = Path(args.material)
    from pqfed.pqc.backends import available_backends

    backends = available_backends()
    plan = ([f"primitives {b}" for b, ok in backends.items() if ok == "ok"]
            if "primitives" not in skip else [])
    plan += [s for s in ("handshake", "throughput") if s not in skip]
    plan += [f"seed {n} clients" for n in clients] if "seed" not in skip else []
    done = 0

    def step(name: str) -> None:
        nonlocal done
        done += 1
        emit_progress(name, done, len(plan) + 1)

    emit_progress("waiting for the aggregator's lock", 0, len(plan) + 1)
    result: dict[str, Any] = {"role": "node", "node": args.name, "index": args.index,
                              "host": host_info(), "backends": backends}
    with tempfile.TemporaryDirectory() as tmp:  # a private copy: secret volumes are read-only
        mat = Material(Path(tmp))
        for f in material_dir.iterdir():
            if f.is_file() and not f.name.startswith("."):
                dest = mat.directory / f.name
                dest.touch(mode=0o600)
                dest.write_bytes(f.read_bytes())
        with control_lock(args.aggregator, ports.control, args.timeout):
            if "primitives" not in skip:
                result["primitives"] = {}
                for name, ok in backends.items():
                    if ok == "ok":
                        emit_progress(f"primitives {name}", done, len(plan) + 1)
                        result["primitives"][name] = bench_primitives(name, args.iterations)
                        step(f"primitives {name}")
                result["aead"] = bench_aead(args.throughput_mib / 2)
            if "handshake" not in skip:
                emit_progress("handshakes", done, len(plan) + 1)
                result["handshake"] = bench_handshake(args.aggregator, ports, mat,
                                                      args.handshakes)
                step("handshake")
            if "throughput" not in skip:
                emit_progress("throughput", done, len(plan) + 1)
                result["throughput"] = bench_throughput(
                    args.aggregator, ports, mat, int(args.throughput_mib * 2**20),
                    args.throughput_seconds)
                step("throughput")
        if "seed" not in skip and clients:
            emit_progress("seed-004 (distributed share)", done, len(plan) + 1)
            result["seed"] = seed_share(args, mat, ports, clients, step)
    control_finished(args.aggregator, ports.control, args.name)
    step("done")
    emit_result(result)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="this node's name (a Kubernetes node)")
    p.add_argument("--index", type=int, required=True, help="0-based index among the nodes")
    p.add_argument("--nodes", type=int, required=True, help="how many nodes take part")
    p.add_argument("--aggregator", required=True, help="the aggregator's address")
    p.add_argument("--ports", default=AggregatorPorts().to_arg(),
                   help="aggregator ports: handshake-pq,handshake-classical,sink,secure,control")
    p.add_argument("--material", required=True, help="directory with the benchmark's keys")
    p.add_argument("--iterations", type=int, default=500, help="samples per primitive")
    p.add_argument("--handshakes", type=int, default=100, help="handshakes per kind")
    p.add_argument("--throughput-mib", type=float, default=32.0, help="MiB per transfer")
    p.add_argument("--throughput-seconds", type=float, default=2.0,
                   help="repeat transfers until this much transfer time")
    p.add_argument("--clients", default="3,5,10,20", help="seed-004 client counts")
    p.add_argument("--repeats", type=int, default=5, help="seed-004 repetitions")
    p.add_argument("--skip", default="", help="comma-separated: primitives,handshake,"
                   "throughput,seed")
    p.add_argument("--cpus", default="", help="pin to these CPUs (e.g. 0 or 0,1)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait on peers")
    p.set_defaults(func=run)
