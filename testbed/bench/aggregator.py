"""``pqfed bench aggregator``: the other end of every node's measurements.

Serves hybrid-PQ and classical handshakes, a plaintext byte sink and (in front of that sink)
a PQC sidecar; coordinates the nodes (a lock that runs their per-node phases one at a time,
barriers for the distributed seed-004 rounds, whose latency it times on its own clock). Before
each distributed seed-004 round it runs the baselines itself, while the nodes wait: the same
per-client crypto sequentially and on a process pool (pqfed.pqc.pool.CryptoPool).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqfed.services import free_ports
from pqfed.testbed.bench.common import (
    AggregatorPorts,
    Material,
    emit_progress,
    emit_ready,
    emit_result,
    host_info,
    median,
)
from pqfed.testbed.bench.node import ProcSampler, scrape_metrics, start_sidecar, stop_process


@dataclass
class _Barrier:
    parties: int
    arrived: int = 0
    all_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    all_done: asyncio.Event = field(default_factory=asyncio.Event)
    t0: float = 0.0
    done: dict[str, float] = field(default_factory=dict)
    elapsed: float | None = None


class Control:
    """LOCK / BARRIER / FINISHED / PING, one request line per connection (common.py)."""

    def __init__(self, nodes: int, gated: bool) -> None:
        self.nodes = nodes
        self.gated = gated  # barriers open only when the aggregator says so (release())
        self.lock = asyncio.Lock()
        self.barriers: dict[str, _Barrier] = {}
        self.finished: set[str] = set()
        self.all_finished = asyncio.Event()

    def barrier(self, key: str) -> _Barrier:
        return self.barriers.setdefault(key, _Barrier(self.nodes))

    @staticmethod
    def release(b: _Barrier) -> None:
        b.t0 = time.perf_counter()
        b.released.set()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            parts = (await r.readline()).decode().split()
            if not parts:
                return
            op = parts[0]
            if op == "PING":
                w.write(b"PONG\n")
            elif op == "LOCK":
                async with self.lock:
                    w.write(b"GO\n")
                    await w.drain()
                    await r.read()  # held until the node closes the connection
                return
            elif op == "BARRIER" and len(parts) == 4:
                await self._barrier(r, w, parts[1], int(parts[2]), parts[3])
            elif op == "FINISHED" and len(parts) == 2:
                self.finished.add(parts[1])
                if len(self.finished) >= self.nodes:
                    self.all_finished.set()
                w.write(b"OK\n")
            else:
                w.write(b"ERR\n")
            await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            w.close()

    async def _barrier(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, key: str,
                       parties: int, node: str) -> None:
        b = self.barrier(key)
        b.arrived += 1
        if b.arrived >= b.parties:
            b.all_arrived.set()
            if not self.gated:
                self.release(b)
        await b.released.wait()
        w.write(b"GO\n")
        await w.drain()
        parts = (await r.readline()).decode().split()
        now = time.perf_counter()
        if parts[:1] == ["DONE"]:
            b.done[node] = float(parts[1])
            if len(b.done) >= b.parties:
                b.elapsed = now - b.t0
                b.all_done.set()
        w.write(b"OK\n")


async def _sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        (total,) = struct.unpack("!Q", await r.readexactly(8))
        w.write(b"R")
        await w.drain()
        got = 0
        while got < total:
            data = await r.read(min(1 << 18, total - got))
            if not data:
                break
            got += len(data)
        if got == total:
            w.write(b"K")
            await w.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        w.close()


class Baselines:
    """The aggregator doing every client's crypto itself, sequentially and on a process pool
    (long-lived and warmed up, as in the sidecar: start-up is not part of a round)."""

    def __init__(self, material: Material, workers: int) -> None:
        from pqfed.pqc.bench import peer_init, peer_task
        from pqfed.pqc.pool import CryptoPool, PoolMode

        self.task = peer_task
        self.workers = workers
        pems = material.peer_pems()
        self.sequential = CryptoPool(PoolMode.SEQUENTIAL, workers, peer_init, (pems,))
        self.parallel = CryptoPool(PoolMode.PROCESSES, workers, peer_init, (pems,))
        for pool in (self.sequential, self.parallel):
            pool.warm_up()
            pool.map(peer_task, range(workers * 2))

    def time(self, clients: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.sequential.map(self.task, range(clients))
        t1 = time.perf_counter()
        self.parallel.map(self.task, range(clients))
        return t1 - t0, time.perf_counter() - t1

    def close(self) -> None:
        self.sequential.close()
        self.parallel.close()


async def _seed_rounds(control: Control, baselines: Baselines, clients: list[int],
                       repeats: int, out: dict[str, Any]) -> None:
    """Interleaves the three designs under the same conditions: for every (clients, repeat)
    the nodes wait at a barrier while the aggregator times sequential and parallel, then it
    releases them for the distributed round and times that (release -> last report)."""
    seq: dict[str, list[float]] = {}
    par: dict[str, list[float]] = {}
    out.update({"workers": baselines.workers, "sequential": seq, "parallel": par})
    for n in clients:
        for r in range(repeats):
            b = control.barrier(f"seed-{n}-{r}")
            await b.all_arrived.wait()
            if r == 0:
                emit_progress(f"seed-004: {n} clients", clients.index(n), len(clients) + 1)
            s, p = await asyncio.to_thread(baselines.time, n)
            seq.setdefault(str(n), []).append(s)
            par.setdefault(str(n), []).append(p)
            control.release(b)
            await b.all_done.wait()
        out.setdefault("per_client_ms", {})[str(n)] = median(seq[str(n)]) / n * 1e3


async def _serve(args: argparse.Namespace, material: Material, ports: AggregatorPorts,
                 clients: list[int]) -> dict[str, Any]:
    from pqfed.pqc import server_channel

    served = {"pq": 0, "classical": 0, "failed": 0}

    def handshake_handler(kind: str) -> Any:
        cfg = material.handshake_config(kind, "aggregator")

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                ch = await server_channel(r, w, cfg)
                served[kind] += 1
                with contextlib.suppress(Exception):
                    await ch.close()
            except Exception:  # the node measures; failures show there
                served["failed"] += 1
                w.close()
        return on_conn

    baselines = None
    if clients:
        workers = args.workers or len(os.sched_getaffinity(0))
        baselines = await asyncio.to_thread(Baselines, material, workers)
    control = Control(args.nodes, gated=baselines is not None)
    host = args.listen
    servers = [
        await asyncio.start_server(handshake_handler("pq"), host, ports.handshake_pq),
        await asyncio.start_server(handshake_handler("classical"), host,
                                   ports.handshake_classical),
        await asyncio.start_server(_sink, host, ports.sink),
        await asyncio.start_server(control.handle, host, ports.control),
    ]
    (admin,) = free_ports(1)
    sidecar = start_sidecar([
        "--cert", str(material.path("pq", "aggregator.crt")),
        "--key", str(material.path("pq", "aggregator.key")),
        "--ca", str(material.path("pq", "ca.crt")),
        "--listen", f"{host}:{ports.secure}", "--upstream", f"127.0.0.1:{ports.sink}",
        "--admin", f"127.0.0.1:{admin}"])
    out: dict[str, Any] = {}
    seed: dict[str, Any] = {}
    try:
        from pqfed.testbed.bench.node import wait_ready

        await asyncio.to_thread(wait_ready, admin, sidecar)
        emit_ready({"ports": ports.to_arg()})
        emit_progress("waiting for the nodes", 0, len(clients) + 1)
        with ProcSampler(sidecar.pid, interval=0.5) as sampler:
            try:
                if baselines is not None:
                    await asyncio.wait_for(_seed_rounds(control, baselines, clients,
                                                        args.repeats, seed), args.timeout)
                await asyncio.wait_for(control.all_finished.wait(), args.timeout)
            except TimeoutError:
                out["error"] = (f"only {len(control.finished)} of {args.nodes} nodes finished "
                                f"within {args.timeout:.0f}s")
        out["sidecar"] = {**sampler.summary(), "metrics": scrape_metrics(admin)}
    finally:
        stop_process(sidecar)
        for s in servers:
            s.close()
        if baselines is not None:
            baselines.close()
    out["handshakes_served"] = served
    out["nodes_finished"] = sorted(control.finished)
    if seed:
        out["seed"] = seed
    dist: dict[str, list[float]] = {}
    per_node: dict[str, dict[str, list[float]]] = {}
    for key, b in control.barriers.items():
        _, n, _ = key.split("-")
        if b.elapsed is not None:
            dist.setdefault(n, []).append(b.elapsed)
        for node, secs in b.done.items():
            per_node.setdefault(n, {}).setdefault(node, []).append(secs)
    out["distributed"] = {"seconds": dist, "node_seconds": per_node}
    return out


def run(args: argparse.Namespace) -> int:
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    ports = AggregatorPorts.parse(args.ports)
    material = Material(Path(args.material))
    clients = [int(c) for c in args.clients.split(",")] if args.clients else []
    if "seed" in (args.skip or "").split(","):
        clients = []
    result: dict[str, Any] = {"role": "aggregator", "node": args.name, "host": host_info()}
    result.update(asyncio.run(_serve(args, material, ports, clients)))
    emit_progress("done", len(clients) + 1, len(clients) + 1)
    emit_result(result)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="aggregator", help="the node it runs on")
    p.add_argument("--nodes", type=int, required=True, help="how many nodes will report")
    p.add_argument("--listen", default="0.0.0.0", help="address to serve on")  # noqa: S104
    p.add_argument("--ports", default=AggregatorPorts().to_arg())
    p.add_argument("--material", required=True, help="directory with the benchmark's keys")
    p.add_argument("--clients", default="3,5,10,20", help="seed-004 client counts")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=0,
                   help="process-pool size for the parallel baseline (0: usable CPUs)")
    p.add_argument("--skip", default="")
    p.add_argument("--cpus", default="", help="pin to these CPUs")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds to wait for every node to finish")
    p.set_defaults(func=run)
