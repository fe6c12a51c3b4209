"""TLS 1.3 vs pqfed1 over loopback TCP, in one run: handshake latency and bulk throughput.

    python -m pqfed.pqc.bench_tls --out results/bench-tls

Like for like: both mutually authenticated with ML-DSA-65 certificates, both with the
X25519+ML-KEM-768 hybrid group, both with AES-256-GCM and SHA-384; both driven from Python
asyncio over loopback TCP, each server in its own process (both started before the first
measurement), the client in this one. The two protocols alternate, handshake by handshake and
transfer by transfer, so load from other work on the host hits both alike. Each run's median and
p99 are kept; the table reports the median over runs and the spread (min-max over runs).

Handshake latency is the client's view: TCP connect to a channel ready for application data
(in both protocols the client is done after its second flight; neither waits for the
server's verdict on the client certificate). Parallel handshakes: `parallel` handshakes
started at once, handshakes per second until the last is done, against one at a time in the
same run (the speedup is what the cores give). Both ends run each handshake's steps on a pool
of threads as the sidecar does (`crypto_threads`). Throughput: 64 MiB from client to server
through the channel, timed from the first byte sent to the server's acknowledgement of the
last. Also step `protocols` of `pqfed bench-pqc`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import struct
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

from pqfed.pqc.backends import BACKEND_ENV, get_backend
from pqfed.pqc.channel import connect, server_channel
from pqfed.pqc.handshake import Group, HandshakeConfig, Suite
from pqfed.pqc.identity import Certificate, CertificateAuthority, Identity, Role, TrustAnchor
from pqfed.pqc.pki import NodeURI, Usage, X509CertificateAuthority, X509TrustAnchor
from pqfed.pqc.pki.profile import (
    certificate_pem,
    load_certificate_pem,
    load_private_key_pem,
    private_key_pem,
)
from pqfed.pqc.tls13 import TlsConfig, TlsContext, tls_connect, tls_server_channel

PROTOCOLS = ("pqfed1", "pqfed1-pyca", "tls13")
_HEADER = struct.Struct("!Q")
_ACK = b"ok"
# pqfed1 twice: with the default backend (liboqs where installed) and with pyca, i.e. the same
# OpenSSL 4 primitives the TLS 1.3 stack uses, so the protocols differ and not the libraries.
_PQFED1_BACKEND: dict[str, str | None] = {"pqfed1": None, "pqfed1-pyca": "pyca"}
HANDSHAKE_THREADS = 4  # the sidecar's default crypto_threads


class _Channel(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes: ...
    async def close(self) -> None: ...
    def abort(self) -> None: ...


async def _serve_one(ch: _Channel) -> None:
    """The client announces a length (0: handshake only), sends that many bytes, gets `ok`."""
    buf = b""
    while len(buf) < _HEADER.size:
        buf += await ch.recv()
    (total,) = _HEADER.unpack_from(buf)
    got = len(buf) - _HEADER.size
    while got < total:
        got += len(await ch.recv())
    await ch.send(_ACK)
    await ch.close()


def _pqfed1_config(pems: tuple[str, str, str], client: bool, backend: str | None
                   ) -> HandshakeConfig:
    ca_pem, crt, key = pems
    return HandshakeConfig(
        Identity.load(crt, key), TrustAnchor(Certificate.from_pem(ca_pem)),
        suites=(Suite.AES_256_GCM_SHA384,), groups=(Group.X25519_MLKEM768,),
        peer_signature_algorithms=("ML-DSA-65",),
        peer_roles=(Role.AGGREGATOR,) if client else (Role.CLIENT,),
        backend=get_backend(backend) if backend else None)


def _tls_context(pems: tuple[str, str, str], client: bool) -> TlsContext:
    ca_pem, crt, key = pems
    cfg = TlsConfig(load_certificate_pem(crt), load_private_key_pem(key.encode()),
                    X509TrustAnchor.from_pem(ca_pem),
                    peer_roles=(Role.AGGREGATOR,) if client else (Role.CLIENT,))
    return TlsContext(cfg, Usage.CLIENT if client else Usage.SERVER)


def _server(protocol: str, pems: tuple[str, str, str], port_queue: Any) -> None:
    """One protocol's server in its own process (the aggregator on another machine)."""
    if protocol.startswith("pqfed1"):
        backend = _PQFED1_BACKEND[protocol]
        if backend:  # the process-wide default too (certificate checks use it)
            os.environ[BACKEND_ENV] = backend
        cfg = _pqfed1_config(pems, client=False, backend=backend)
        pool = ThreadPoolExecutor(HANDSHAKE_THREADS, "pqfed-handshake")

        async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> _Channel:
            return await server_channel(r, w, cfg, pool)
    else:
        ctx = _tls_context(pems, client=False)
        pool = ThreadPoolExecutor(HANDSHAKE_THREADS, "pqfed-handshake")

        async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> _Channel:
            return await tls_server_channel(r, w, ctx, pool)

    async def serve() -> None:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):  # the client measures; failures show there
                await _serve_one(await accept(r, w))

        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port_queue.put(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    asyncio.run(serve())


def _identities() -> dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]]:
    """(server pems, client pems) per protocol: CA certificate, node certificate, node key."""
    ca = CertificateAuthority.generate("bench")
    agg = ca.new_identity("aggregator", Role.AGGREGATOR)
    cli = ca.new_identity("client-0", Role.CLIENT)
    root = ca.root.to_pem()
    xca = X509CertificateAuthority.generate("bench")
    xroot = certificate_pem(xca.certificate).decode()

    def x509_node(role: Role, node_id: str) -> tuple[str, str, str]:
        cert, key = xca.new_node(NodeURI("bench", role, node_id))
        return xroot, certificate_pem(cert).decode(), private_key_pem(key).decode()

    pq = ((root, agg.certificate.to_pem(), agg.private_key_pem()),
          (root, cli.certificate.to_pem(), cli.private_key_pem()))
    return {
        "pqfed1": pq, "pqfed1-pyca": pq,
        "tls13": (x509_node(Role.AGGREGATOR, "aggregator"), x509_node(Role.CLIENT, "client-0")),
    }


Connector = Callable[[int], Awaitable[_Channel]]


def _connectors(ids: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]],
                pool: Executor) -> dict[str, Connector]:
    ctx = _tls_context(ids["tls13"][1], client=True)

    def pq(protocol: str) -> Connector:
        cfg = _pqfed1_config(ids[protocol][1], client=True, backend=_PQFED1_BACKEND[protocol])

        async def connect_pq(port: int) -> _Channel:
            return await connect("127.0.0.1", port, cfg, pool)
        return connect_pq

    async def tls(port: int) -> _Channel:
        return await tls_connect("127.0.0.1", port, ctx, executor=pool)

    return {"pqfed1": pq("pqfed1"), "pqfed1-pyca": pq("pqfed1-pyca"), "tls13": tls}


async def _handshake(conn: Connector, port: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) to a ready channel."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    ch = await conn(port)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    await ch.send(_HEADER.pack(0))
    await ch.recv()  # the server's ack: the connection is fully done before the next one
    ch.abort()
    return elapsed, cpu


async def _rate(conn: Connector, port: int, k: int, at_once: bool) -> float:
    """k handshakes, all started at once or one after the other: handshakes per second
    until the last is done."""
    t0 = time.perf_counter()
    if at_once:
        await asyncio.gather(*(_handshake(conn, port) for _ in range(k)))
    else:
        for _ in range(k):
            await _handshake(conn, port)
    return k / (time.perf_counter() - t0)


async def _transfer(conn: Connector, port: int, total: int) -> float:
    ch = await conn(port)
    block = bytes(1 << 20)
    t0 = time.perf_counter()
    await ch.send(_HEADER.pack(total))
    sent = 0
    while sent < total:
        await ch.send(block[: min(len(block), total - sent)])
        sent += min(len(block), total - sent)
    if await ch.recv() != _ACK:
        raise RuntimeError("no acknowledgement from the benchmark server")
    elapsed = time.perf_counter() - t0
    ch.abort()
    return total / elapsed


def _rotation(i: int) -> tuple[str, ...]:
    """The protocols in turn, starting with a different one each round."""
    k = i % len(PROTOCOLS)
    return PROTOCOLS[k:] + PROTOCOLS[:k]


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _cpu(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


async def _measure(ports: dict[str, int], pids: dict[str, int], conns: dict[str, Connector],
                   n: int, runs: int, transfers: int, total: int,
                   parallel: int) -> dict[str, Any]:
    for proto in PROTOCOLS:  # warm-up
        for _ in range(5):
            await _handshake(conns[proto], ports[proto])
    per_run: dict[str, dict[str, list[float]]] = {
        p: {"median_ms": [], "p99_ms": [], "cpu_ms": []} for p in PROTOCOLS}
    pooled: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
    for _ in range(runs):
        run: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
        client_cpu = dict.fromkeys(PROTOCOLS, 0.0)
        server_cpu = {p: _cpu(pids[p]) for p in PROTOCOLS}
        for i in range(n):
            for proto in _rotation(i):
                wall, cpu = await _handshake(conns[proto], ports[proto])
                run[proto].append(wall * 1e3)
                client_cpu[proto] += cpu
        for proto in PROTOCOLS:
            # CPU per handshake, both ends: insensitive to other work queueing on the host
            # (the server's also covers its reply to the client's closing length header).
            server = _cpu(pids[proto]) - server_cpu[proto]
            per_run[proto]["cpu_ms"].append((client_cpu[proto] + server) / n * 1e3)
            per_run[proto]["median_ms"].append(statistics.median(run[proto]))
            per_run[proto]["p99_ms"].append(_pct(run[proto], 0.99))
            pooled[proto].extend(run[proto])
    rate_one: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
    rate_par: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
    for i in range(runs):
        for proto in _rotation(i):
            rate_one[proto].append(await _rate(conns[proto], ports[proto], parallel, False))
            rate_par[proto].append(await _rate(conns[proto], ports[proto], parallel, True))
    mibps: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
    cpu_per_mib: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
    for i in range(transfers):
        for proto in _rotation(i):
            c0, s0 = time.process_time(), _cpu(pids[proto])
            mibps[proto].append(await _transfer(conns[proto], ports[proto], total) / 2**20)
            cpu = time.process_time() - c0 + _cpu(pids[proto]) - s0
            cpu_per_mib[proto].append(cpu * 1e3 / (total / 2**20))
    out: dict[str, Any] = {}
    for proto in PROTOCOLS:
        out[proto] = {
            "handshake_median_ms": _spread(per_run[proto]["median_ms"]),
            "handshake_p99_ms": _spread(per_run[proto]["p99_ms"]),
            "handshake_cpu_ms": _spread(per_run[proto]["cpu_ms"]),
            "handshake_pooled": {"n": len(pooled[proto]),
                                 "median_ms": statistics.median(pooled[proto]),
                                 "p99_ms": _pct(pooled[proto], 0.99)},
            "parallel_per_s": _spread(rate_par[proto]),
            "sequential_per_s": _spread(rate_one[proto]),
            "parallel_speedup": _spread([p / o for p, o in zip(rate_par[proto],
                                                                rate_one[proto], strict=True)]),
            "throughput_MiBps": _spread(mibps[proto]),
            "transfer_cpu_ms_per_MiB": _spread(cpu_per_mib[proto]),
        }
    out["ratio_tls13_to"] = {base: {
        "handshake_median": (out["tls13"]["handshake_median_ms"]["median"]
                             / out[base]["handshake_median_ms"]["median"]),
        "handshake_cpu": (out["tls13"]["handshake_cpu_ms"]["median"]
                          / out[base]["handshake_cpu_ms"]["median"]),
        "throughput": (out["tls13"]["throughput_MiBps"]["median"]
                       / out[base]["throughput_MiBps"]["median"]),
        "parallel": (out["tls13"]["parallel_per_s"]["median"]
                     / out[base]["parallel_per_s"]["median"]),
    } for base in ("pqfed1", "pqfed1-pyca")}
    return out


def bench(n: int, runs: int, transfers: int, total: int, parallel: int = 16) -> dict[str, Any]:
    from OpenSSL import SSL

    from pqfed.pqc.backends import backend_report

    ids = _identities()
    ctx = get_context("spawn")
    procs, ports, pids = [], {}, {}
    try:
        for proto in PROTOCOLS:
            q = ctx.Queue()
            p = ctx.Process(target=_server, args=(proto, ids[proto][0], q), daemon=True)
            p.start()
            procs.append(p)
            ports[proto] = int(q.get(timeout=60))
            pids[proto] = int(p.pid or 0)
        with ThreadPoolExecutor(HANDSHAKE_THREADS, "pqfed-handshake") as pool:
            res = asyncio.run(_measure(ports, pids, _connectors(ids, pool), n, runs, transfers,
                                       total, parallel))
    finally:
        for p in procs:
            p.terminate()
            p.join(10)
    res["setup"] = {
        "handshakes_per_run": n, "runs": runs, "transfers": transfers, "bytes": total,
        "parallel": parallel, "cpus": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "pqfed1_backend": backend_report()["description"],
        "pqfed1-pyca_backend": "pyca/cryptography (the OpenSSL that runs TLS 1.3)",
        "tls13_openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
    }
    return res


def report(r: dict[str, Any]) -> str:
    s = r["setup"]

    def cell(d: dict[str, float], fmt: str = "{:.2f}") -> str:
        return f"{fmt.format(d['median'])} ({fmt.format(d['min'])}-{fmt.format(d['max'])})"

    lines = [
        f"{s['runs']} runs x {s['handshakes_per_run']} handshakes per protocol, alternating; "
        f"{s['transfers']} transfers of {s['bytes'] // 2**20} MiB per protocol, alternating; "
        f"{s['parallel']} handshakes at once vs one after the other, once per run, on {s['cpus']} "
        f"CPUs; load average at the end {' / '.join(f'{x:.1f}' for x in s['load_average'])}.",
        f"pqfed1 backend: {s['pqfed1_backend']}; pqfed1-pyca: pyca/cryptography; "
        f"TLS 1.3: {s['tls13_openssl']} (pyOpenSSL).",
        "",
        "| protocol | handshake median, ms | handshake p99, ms | pooled median / p99, ms "
        "| CPU per handshake (both ends), ms | parallel handshakes/s | speedup vs one at a time "
        "| throughput, MiB/s | CPU per MiB (both ends), ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for proto in PROTOCOLS:
        x = r[proto]
        pooled = x["handshake_pooled"]
        lines.append(f"| {proto} | {cell(x['handshake_median_ms'])} | "
                     f"{cell(x['handshake_p99_ms'])} | {pooled['median_ms']:.2f} / "
                     f"{pooled['p99_ms']:.2f} (n={pooled['n']}) | "
                     f"{cell(x['handshake_cpu_ms'])} | "
                     f"{cell(x['parallel_per_s'], '{:.0f}')} | "
                     f"{cell(x['parallel_speedup'])}x | "
                     f"{cell(x['throughput_MiBps'], '{:.0f}')} | "
                     f"{cell(x['transfer_cpu_ms_per_MiB'], '{:.1f}')} |")
    lines.append("")
    for base, ratio in r["ratio_tls13_to"].items():
        lines.append(f"TLS 1.3 / {base}: handshake median x{ratio['handshake_median']:.2f}, "
                     f"CPU x{ratio['handshake_cpu']:.2f}, parallel handshakes/s "
                     f"x{ratio['parallel']:.2f}, throughput x{ratio['throughput']:.2f}.")
    lines.append("Cells: median over runs (min-max over runs).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pqfed.pqc.bench_tls",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", default="results/bench-tls")
    parser.add_argument("--handshakes", type=int, default=100, help="per protocol and run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--transfers", type=int, default=5, help="per protocol")
    parser.add_argument("--mib", type=int, default=64, help="MiB per transfer")
    parser.add_argument("--parallel", type=int, default=16, help="handshakes started at once")
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.handshakes, args.runs, args.transfers, args.mib, args.parallel = 5, 2, 1, 4, 4
    res = bench(args.handshakes, args.runs, args.transfers, args.mib * 2**20, args.parallel)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    text = report(res)
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
