"""`make bench-pqc`: PQC latency, handshake, throughput, parallelism and sidecar memory.

Every figure is a ratio measured within one run (ours vs baseline), so results from machines
of different speed are comparable. Results: JSON + Markdown + PNG under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from pqfed.pqc.backends import get_backend
from pqfed.pqc.bench_backends import bench_backends, handshake_once
from pqfed.pqc.bench_backends import report as backends_report
from pqfed.pqc.bench_tls import bench as bench_protocols
from pqfed.pqc.bench_tls import report as protocols_report
from pqfed.pqc.handshake import Group, HandshakeConfig
from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.pqc.pool import CryptoPool, PoolMode, usable_cpus

try:
    from pqfed.pqc.pool import KeySharePool
except ImportError:  # a tree from before the pool left the handshake: `make bench-regress`
    # runs this driver against such a base (testbed/regress.py --harness)
    from pqfed.pqc.handshake import KeySharePool  # type: ignore[attr-defined,no-redef]
from pqfed.pqc.signing import sign_update, verify_update


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "mean_us": statistics.fmean(s) * 1e6,
        "p50_us": s[len(s) // 2] * 1e6,
        "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6,
        "n": len(s),
    }


def _time_pair(ours: Callable[[], object], raw: Callable[[], object], n: int) -> tuple[
        list[float], list[float]]:
    """Interleaves the two so that frequency scaling and noise hit both alike."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        raw()
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return a, b


def bench_primitives(n: int) -> dict[str, Any]:
    backend = get_backend("pyca")
    kem = backend.kem_generate("ML-KEM-768")
    raw_kem = mlkem.MLKEM768PrivateKey.generate()
    raw_pub = raw_kem.public_key()
    ct, _ = backend.kem_encapsulate("ML-KEM-768", kem.public_bytes())
    _, raw_ct = raw_pub.encapsulate()
    sig = backend.sig_generate("ML-DSA-65")
    raw_sig = mldsa.MLDSA65PrivateKey.generate()
    msg = os.urandom(64)
    signature, raw_signature = sig.sign(msg), raw_sig.sign(msg)
    pk_bytes, raw_pk = sig.public_bytes(), raw_sig.public_key()
    kem_pk = kem.public_bytes()
    ops: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "ML-KEM-768 keygen": (lambda: backend.kem_generate("ML-KEM-768").public_bytes(),
                              lambda: mlkem.MLKEM768PrivateKey.generate().public_key()
                              .public_bytes_raw()),
        # Raw side uses an already parsed key: our bytes-in API caches parsed peer keys, so
        # this compares like with like (both skip parsing after first use).
        "ML-KEM-768 encaps": (lambda: backend.kem_encapsulate("ML-KEM-768", kem_pk),
                              raw_pub.encapsulate),
        "ML-KEM-768 decaps": (lambda: kem.decapsulate(ct), lambda: raw_kem.decapsulate(raw_ct)),
        "ML-DSA-65 keygen": (lambda: backend.sig_generate("ML-DSA-65").public_bytes(),
                             lambda: mldsa.MLDSA65PrivateKey.generate().public_key()
                             .public_bytes_raw()),
        "ML-DSA-65 sign": (lambda: sig.sign(msg), lambda: raw_sig.sign(msg)),
        "ML-DSA-65 verify": (lambda: backend.sig_verify("ML-DSA-65", pk_bytes, msg, signature),
                             lambda: raw_pk.verify(raw_signature, msg)),
    }
    out: dict[str, Any] = {}
    for name, (ours, raw) in ops.items():
        _time_pair(ours, raw, max(5, n // 10))  # warm-up
        a, b = _time_pair(ours, raw, n)
        sa, sb = _stats(a), _stats(b)
        out[name] = {"ours": sa, "raw": sb, "overhead": sa["mean_us"] / sb["mean_us"] - 1,
                     "overhead_p50": sa["p50_us"] / sb["p50_us"] - 1}
    return out


def _identities(sig_alg: str) -> tuple[CertificateAuthority, Identity, Identity]:
    ca = CertificateAuthority.generate("bench", algorithm=sig_alg)
    return (ca, ca.new_identity("aggregator", Role.AGGREGATOR, algorithm=sig_alg),
            ca.new_identity("client-0", Role.CLIENT, algorithm=sig_alg))


def _configs(classical: bool) -> tuple[HandshakeConfig, HandshakeConfig]:
    alg = "Ed25519" if classical else "ML-DSA-65"
    ca, agg, cli = _identities(alg)
    groups = (Group.X25519,) if classical else (Group.X25519_MLKEM768,)
    accept = ("Ed25519",) if classical else ("ML-DSA-65",)
    return (HandshakeConfig(cli, ca.trust, groups=groups, peer_signature_algorithms=accept,
                            key_shares=KeySharePool()),
            HandshakeConfig(agg, ca.trust, groups=groups, peer_signature_algorithms=accept))


def _handshake_server(pems: tuple[str, str, str], classical: bool, parallel: bool,
                      port_queue: Any) -> None:
    """A handshake server in its own process (the aggregator's side on another machine)."""
    from pqfed.pqc.channel import server_channel
    from pqfed.pqc.identity import Certificate, TrustAnchor

    ca_pem, crt, key = pems
    trust = TrustAnchor(Certificate.from_pem(ca_pem))
    groups = (Group.X25519,) if classical else (Group.X25519_MLKEM768,)
    accept = ("Ed25519",) if classical else ("ML-DSA-65",)
    cfg = HandshakeConfig(Identity.load(crt, key), trust, groups=groups,
                          peer_signature_algorithms=accept, parallel_auth=parallel)

    async def serve() -> None:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                ch = await server_channel(r, w, cfg)
                await ch.close()
            except Exception:  # noqa: S110  (the client measures; failures show there)
                pass

        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port_queue.put(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    asyncio.run(serve())


async def _client_handshakes(port: int, c_cfg: HandshakeConfig, n: int) -> list[float]:
    from pqfed.pqc.channel import connect

    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        ch = await connect("127.0.0.1", port, c_cfg)
        out.append(time.perf_counter() - t0)
        ch.abort()
    return out


def _socket_handshakes(c_cfg: HandshakeConfig, s_cfg: HandshakeConfig, n: int,
                       classical: bool) -> list[float]:
    ctx = get_context("spawn")
    q = ctx.Queue()
    ident = s_cfg.identity
    pems = (s_cfg.trust.root.to_pem(), ident.certificate.to_pem(), ident.private_key_pem())
    proc = ctx.Process(target=_handshake_server, args=(pems, classical, s_cfg.parallel_auth, q),
                       daemon=True)
    proc.start()
    try:
        port = int(q.get(timeout=60))
        asyncio.run(_client_handshakes(port, c_cfg, 5))  # warm-up
        return asyncio.run(_client_handshakes(port, c_cfg, n))
    finally:
        proc.terminate()
        proc.join(10)


def bench_handshake(n: int) -> dict[str, Any]:
    """PQ vs classical, each with sequential and parallel authentication (its best counts)."""
    variants: dict[str, tuple[HandshakeConfig, HandshakeConfig]] = {}
    for kind, classical in (("pq", False), ("classical", True)):
        c, s = _configs(classical)
        for mode, par in (("sequential", False), ("parallel", True)):
            variants[f"{kind}-{mode}"] = (replace(c, parallel_auth=par),
                                          replace(s, parallel_auth=par))
    for c, s in variants.values():
        for _ in range(5):
            handshake_once(c, s)
    mem: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(n):
        for name, (c, s) in variants.items():
            t0 = time.perf_counter()
            handshake_once(c, s)
            mem[name].append(time.perf_counter() - t0)
    sock = {name: _socket_handshakes(c, s, n, name.startswith("classical"))
            for name, (c, s) in variants.items()}
    res: dict[str, Any] = {name: {"in_memory": _stats(mem[name]), "loopback": _stats(sock[name])}
                           for name in variants}
    for where in ("in_memory", "loopback"):
        best = {kind: min((res[f"{kind}-{m}"][where]["mean_us"], m)
                          for m in ("sequential", "parallel"))
                for kind in ("pq", "classical")}
        res[f"ratio_{where}"] = best["pq"][0] / best["classical"][0]
        res[f"best_{where}"] = {k: v[1] for k, v in best.items()}
        res[f"ratio_{where}_sequential"] = (res["pq-sequential"][where]["mean_us"]
                                            / res["classical-sequential"][where]["mean_us"])
        best_p50 = {kind: min(res[f"{kind}-{m}"][where]["p50_us"]
                              for m in ("sequential", "parallel"))
                    for kind in ("pq", "classical")}
        res[f"ratio_{where}_p50"] = best_p50["pq"] / best_p50["classical"]
    return res


# --- parallelism: one "peer task" is the aggregator-side crypto of one client in a round ----

_WORKER: dict[str, Any] = {}


def peer_init(pems: tuple[str, str, str, str, str]) -> None:
    """A crypto worker's set-up for `peer_task`: the CA, aggregator and client PEMs."""
    from pqfed.pqc.identity import Certificate, TrustAnchor

    ca_pem, agg_crt, agg_key, cli_crt, cli_key = pems
    trust = TrustAnchor(Certificate.from_pem(ca_pem))
    agg, cli = Identity.load(agg_crt, agg_key), Identity.load(cli_crt, cli_key)
    _WORKER["cfg"] = (HandshakeConfig(cli, trust), HandshakeConfig(agg, trust))
    _WORKER["cli"] = cli
    _WORKER["trust"] = trust
    _WORKER["payload"] = os.urandom(256 * 1024)


def peer_task(i: int) -> int:
    """Full hybrid handshake + the client's signed update + the aggregator's verification."""
    c_cfg, s_cfg = _WORKER["cfg"]
    handshake_once(c_cfg, s_cfg)
    payload = _WORKER["payload"]
    signed = sign_update(_WORKER["cli"], "bench", i, payload)
    verify_update(signed, payload, _WORKER["trust"], job="bench", round_number=i)
    return i


def bench_parallel(peer_counts: list[int], repeats: int) -> dict[str, Any]:
    ca, agg, cli = _identities("ML-DSA-65")
    pems = (ca.root.to_pem(), agg.certificate.to_pem(), agg.private_key_pem(),
            cli.certificate.to_pem(), cli.private_key_pem())
    workers = usable_cpus()
    res: dict[str, Any] = {"cpus": workers, "peers": {}}
    pools = {mode: CryptoPool(mode, workers, peer_init, (pems,))
             for mode in (PoolMode.SEQUENTIAL, PoolMode.THREADS, PoolMode.PROCESSES)}
    try:
        for pool in pools.values():
            pool.warm_up()
            pool.map(peer_task, range(workers * 2))
        for peers in peer_counts:
            times: dict[str, list[float]] = {m.value: [] for m in pools}
            for _ in range(repeats):
                for mode, pool in pools.items():
                    t0 = time.perf_counter()
                    pool.map(peer_task, range(peers))
                    times[mode.value].append(time.perf_counter() - t0)
            best = {m: min(v) for m, v in times.items()}
            res["peers"][str(peers)] = {
                "seconds": best,
                "speedup_threads": best["sequential"] / best["threads"],
                "speedup_processes": best["sequential"] / best["processes"],
                "latency_reduction_processes": 1 - best["processes"] / best["sequential"],
            }
    finally:
        for pool in pools.values():
            pool.close()
    return res


# --- throughput: sidecar pair vs plaintext relay pair, each end its own process -------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _plain_relay(listen: int, target: int) -> None:
    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1 << 16):
            w.write(data)
            await w.drain()
        w.close()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", target)
        except OSError:  # a readiness probe before the next hop listens: nothing to relay
            w.close()
            return
        await asyncio.gather(pump(r, uw), pump(ur, w), return_exceptions=True)

    srv = await asyncio.start_server(on_conn, "127.0.0.1", listen)
    async with srv:
        await srv.serve_forever()


def _run_plain_relay(listen: int, target: int) -> None:
    asyncio.run(_plain_relay(listen, target))


async def _sink_and_source(entry: int, sink_port: int, total: int) -> float:
    done = asyncio.get_running_loop().create_future()

    got = 0

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # Readiness probes also open (empty) connections through the relays: count bytes
        # across connections and finish only when every byte arrived.
        nonlocal got
        while data := await r.read(1 << 18):
            got += len(data)
            if got >= total and not done.done():
                done.set_result(time.perf_counter())
        w.close()

    srv = await asyncio.start_server(sink, "127.0.0.1", sink_port)
    for _ in range(100):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", entry)
            break
        except OSError:
            await asyncio.sleep(0.1)
    block = os.urandom(1 << 16)
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        w.write(block)
        sent += len(block)
        await w.drain()
    end = await asyncio.wait_for(done, 120)
    w.close()
    await asyncio.sleep(0.3)  # let the EOF travel through the relays so the sink task ends
    srv.close()
    return float(total / (end - t0))


def _wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open")


def _wait_live(admin_port: int, timeout: float = 30) -> None:
    """Wait for the sidecar's /healthz: its listeners are up. (/readyz also needs the upstream,
    and the sink starts only with the measurement.)"""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise TimeoutError(f"sidecar admin port {admin_port} never answered /healthz")


def _sidecar_pair(d: Path, variant: str) -> tuple[int, int, list[subprocess.Popen[bytes]]]:
    """A client and an aggregator sidecar (`pqfed sidecar`, each its own process) of
    `variant` (a protocol, or `tls13-asyncio`: TLS 1.3 with `--data-path asyncio`); returns
    the client's plaintext entry port, the sink port the aggregator forwards to, and the
    processes."""
    protocol, _, data_path = variant.partition("-")
    d.mkdir()
    if protocol == "tls13":
        from pqfed.pqc.pki import NodeURI, X509CertificateAuthority
        from pqfed.pqc.pki.profile import certificate_pem, write_private_key

        xca = X509CertificateAuthority.generate("bench")
        (d / "ca.crt").write_bytes(certificate_pem(xca.certificate))
        for name, role, node_id in (("agg", Role.AGGREGATOR, "aggregator"),
                                    ("cli", Role.CLIENT, "client-0")):
            cert, key = xca.new_node(NodeURI("bench", role, node_id))
            (d / f"{name}.crt").write_bytes(certificate_pem(cert))
            write_private_key(d / f"{name}.key", key)
    else:
        ca, agg, cli = _identities("ML-DSA-65")
        (d / "ca.crt").write_text(ca.root.to_pem())
        agg.save(d / "agg.crt", d / "agg.key")
        cli.save(d / "cli.crt", d / "cli.key")
    sink, secure, entry = _free_port(), _free_port(), _free_port()
    admin_s, admin_c = _free_port(), _free_port()
    base = [sys.executable, "-m", "pqfed.cli", "sidecar", "--ca", str(d / "ca.crt"),
            "--log-level", "warning"]
    if protocol != "pqfed1":  # the default; trees from before --protocol have only it
        base += ["--protocol", protocol]
    if data_path:
        base += ["--data-path", data_path]
    procs = [
        subprocess.Popen([*base, "--cert", str(d / "agg.crt"), "--key", str(d / "agg.key"),
                          "--listen", f"127.0.0.1:{secure}", "--upstream",
                          f"127.0.0.1:{sink}", "--admin", f"127.0.0.1:{admin_s}"]),
        subprocess.Popen([*base, "--cert", str(d / "cli.crt"), "--key", str(d / "cli.key"),
                          "--route", f"127.0.0.1:{entry}=127.0.0.1:{secure}@aggregator",
                          "--admin", f"127.0.0.1:{admin_c}"]),
    ]
    try:
        _wait_live(admin_s)
        _wait_live(admin_c)
    except TimeoutError:
        for proc in procs:
            proc.terminate()
        raise
    return entry, sink, procs


THROUGHPUT_VARIANTS = ("direct", "plaintext", "pqfed1", "tls13-asyncio", "tls13")
# tls13-asyncio: TLS 1.3 with its data path on the event loop (`--data-path asyncio`, the
# path before pump threads), for the comparison in one run.
SIDECAR_VARIANTS = ("pqfed1", "tls13-asyncio", "tls13")


def sidecar_variants() -> tuple[str, ...]:
    """The sidecar variants this tree has (`make bench-regress` runs this driver against
    older trees, whose sidecar has only pqfed1, or TLS 1.3 on the event loop only)."""
    from importlib.util import find_spec

    if find_spec("pqfed.pqc.sidecar.protocols") is None:
        return SIDECAR_VARIANTS[:1]
    if find_spec("pqfed.pqc.sidecar.pump") is None:
        return ("pqfed1", "tls13")
    return SIDECAR_VARIANTS


def _cpu_s(proc: Any) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _spread(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "runs": samples}


def bench_throughput(total: int, runs: int = 5) -> dict[str, Any]:
    """A plaintext relay pair (the baseline: two asyncio relays, the sidecar's data path
    without crypto) vs a sidecar pair per protocol, all started once and measured in turns,
    each run starting with the next variant; ratios are taken within a run. Direct TCP
    (source straight to sink) is measured in the same turns as the ceiling."""
    res: dict[str, Any] = {"bytes": total, "runs": runs}
    load_start = os.getloadavg()[0]
    ctx = get_context("spawn")
    entries: dict[str, tuple[int, int]] = {}
    relays: list[Any] = []
    sidecars: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # plaintext relay pair: source -> relayA -> relayB -> sink
            sink, a, b = _free_port(), _free_port(), _free_port()
            relays = [ctx.Process(target=_run_plain_relay, args=(b, sink), daemon=True),
                      ctx.Process(target=_run_plain_relay, args=(a, b), daemon=True)]
            for p in relays:
                p.start()
            _wait_port(a)
            _wait_port(b)
            entries["plaintext"] = (a, sink)
            direct = _free_port()
            entries["direct"] = (direct, direct)
            # sidecar pairs: source -> client sidecar -> channel -> aggregator sidecar -> sink
            pids: dict[str, tuple[int, int]] = {
                "plaintext": (int(relays[0].pid or 0), int(relays[1].pid or 0))}
            for variant in sidecar_variants():
                entry, sink, procs = _sidecar_pair(Path(tmp) / variant, variant)
                sidecars += procs
                entries[variant] = (entry, sink)
                pids[variant] = (procs[0].pid, procs[1].pid)
            import psutil

            variants = ("direct", "plaintext", *sidecar_variants())
            middle = {v: [psutil.Process(pid) for pid in pids.get(v, ())] for v in variants}
            samples: dict[str, list[float]] = {v: [] for v in variants}
            cpu: dict[str, list[float]] = {v: [] for v in variants}
            ratios: dict[str, list[float]] = {v: [] for v in sidecar_variants()}
            of_direct: dict[str, list[float]] = {v: [] for v in variants[1:]}
            for run in range(runs):
                k = run % len(variants)
                order = variants[k:] + variants[:k]
                got = {}
                for v in order:
                    before = sum(_cpu_s(p) for p in middle[v])
                    got[v] = asyncio.run(_sink_and_source(*entries[v], total))
                    cpu[v].append((sum(_cpu_s(p) for p in middle[v]) - before)
                                  / (total / 2**20) * 1e3)
                for v, bps in got.items():
                    samples[v].append(bps)
                for v, per_run in ratios.items():
                    per_run.append(got[v] / got["plaintext"])
                for v, per_run in of_direct.items():
                    per_run.append(got[v] / got["direct"])

            res["sidecar_rss_mib"] = {
                v: {"aggregator": procs[0].memory_info().rss / 2**20,
                    "client": procs[1].memory_info().rss / 2**20}
                for v, procs in middle.items() if procs}
        finally:
            for proc in sidecars:
                proc.terminate()
                proc.wait(10)
            for p in relays:
                p.terminate()
    # The host's 1-minute load average, start and end: the wall-clock rates depend on it.
    res["load"] = f"{load_start:.1f}, {os.getloadavg()[0]:.1f} ({usable_cpus()} CPUs)"
    res["Bps"] = {v: _spread(x) for v, x in samples.items()}
    # CPU of the two middle processes (relays or sidecars) per MiB carried: steadier than
    # wall-clock rates on a shared host.
    res["cpu_ms_per_mib"] = {v: _spread(x) for v, x in cpu.items()}
    res["ratio"] = {v: _spread(x) for v, x in ratios.items()}
    res["ratio_of_direct"] = {v: _spread(x) for v, x in of_direct.items()}
    # The figures earlier reports had (pqfed1 as "secure").
    res["plaintext_Bps"] = res["Bps"]["plaintext"]["median"]
    res["secure_Bps"] = res["Bps"]["pqfed1"]["median"]
    return res


def throughput_report(t: dict[str, Any]) -> str:
    names = {"direct": "direct TCP, no relay (ceiling)",
             "plaintext": "plaintext relay pair (baseline)",
             "pqfed1": "sidecar pair, pqfed1 (X25519+ML-KEM-768, AES-256-GCM)",
             "tls13-asyncio": "sidecar pair, TLS 1.3, data path on the event loop",
             "tls13": "sidecar pair, TLS 1.3 (X25519MLKEM768, AES-256-GCM), pump threads"}
    lines = [f"{t['runs']} runs of {t['bytes'] >> 20} MiB each, variants in turn; cells: "
             "median (min-max)", "", "| channel | MB/s | / plaintext relays, same run | "
             "/ direct TCP, same run | CPU of the two relays or sidecars, ms per MiB |",
             "|---|---|---|---|---|"]

    def pct(r: dict[str, Any] | None) -> str:
        if r is None:
            return "—"
        return f"{r['median'] * 100:.0f}% ({r['min'] * 100:.0f}-{r['max'] * 100:.0f}%)"

    for v in (v for v in THROUGHPUT_VARIANTS if v in t["Bps"]):
        b = t["Bps"][v]
        c = t["cpu_ms_per_mib"][v]
        cost = (f"{c['median']:.1f} ({c['min']:.1f}-{c['max']:.1f})" if v != "direct"
                else "—")
        lines.append(f"| {names[v]} | {b['median'] / 1e6:.0f} ({b['min'] / 1e6:.0f}-"
                     f"{b['max'] / 1e6:.0f}) | {pct(t['ratio'].get(v))} | "
                     f"{pct(t['ratio_of_direct'].get(v))} | {cost} |")
    rss = t["sidecar_rss_mib"]
    if "load" in t:
        lines += ["", f"Load average (1 min) at the start and the end: {t['load']}"]
    lines += ["", "RSS (MiB): " + "; ".join(
        f"{p}: {v['aggregator']:.0f} + {v['client']:.0f}" for p, v in rss.items())]
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    par = results["parallel"]["peers"]
    peers = [int(p) for p in par]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("sequential", "threads", "processes"):
        ax.plot(peers, [par[str(p)]["seconds"][mode] * 1e3 for p in peers], marker="o",
                label=mode)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("peers per round")
    ax.set_ylabel("aggregator crypto time per round (ms)")
    ax.set_title(f"Handshake + signed update per peer ({results['parallel']['cpus']} CPUs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "parallel.png", dpi=120)
    files.append("parallel.png")
    plt.close(fig)
    prim = results["primitives"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(prim)
    ax.barh(names, [prim[n]["ours"]["mean_us"] for n in names], label="pqfed API")
    ax.barh(names, [prim[n]["raw"]["mean_us"] for n in names], label="raw pyca", alpha=0.6)
    ax.set_xlabel("mean latency (µs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "primitives.png", dpi=120)
    files.append("primitives.png")
    plt.close(fig)
    return files


def _report(r: dict[str, Any]) -> str:
    lines = ["| operation | pqfed mean µs | raw mean µs | p50 µs | p99 µs | API overhead |",
             "|---|---|---|---|---|---|"]
    for name, v in r["primitives"].items():
        lines.append(f"| {name} | {v['ours']['mean_us']:.1f} | {v['raw']['mean_us']:.1f} | "
                     f"{v['ours']['p50_us']:.1f} | {v['ours']['p99_us']:.1f} | "
                     f"{v['overhead'] * 100:+.1f}% |")
    h = r["handshake"]
    lines += ["", "| handshake (mean ms) | in memory, both ends | loopback TCP |",
              "|---|---|---|"]
    for name in ("pq-sequential", "pq-parallel", "classical-sequential", "classical-parallel"):
        lines.append(f"| {name} | {h[name]['in_memory']['mean_us'] / 1e3:.2f} | "
                     f"{h[name]['loopback']['mean_us'] / 1e3:.2f} |")
    lines.append(f"| **PQ / classical (best of each)** | {h['ratio_in_memory']:.2f}x | "
                 f"{h['ratio_loopback']:.2f}x |")
    lines.append(f"| PQ / classical (both sequential) | {h['ratio_in_memory_sequential']:.2f}x "
                 f"| {h['ratio_loopback_sequential']:.2f}x |")
    lines.append(f"| PQ / classical, medians (best of each) | {h['ratio_in_memory_p50']:.2f}x "
                 f"| {h['ratio_loopback_p50']:.2f}x |")
    lines += ["", throughput_report(r["throughput"]),
              f"| peers | sequential ms | threads ms | processes ms | speedup threads | "
              f"speedup processes ({r['parallel']['cpus']} CPUs) |", "|---|---|---|---|---|---|"]
    for peers, v in r["parallel"]["peers"].items():
        s = v["seconds"]
        lines.append(f"| {peers} | {s['sequential'] * 1e3:.1f} | {s['threads'] * 1e3:.1f} | "
                     f"{s['processes'] * 1e3:.1f} | {v['speedup_threads']:.2f}x | "
                     f"{v['speedup_processes']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = bool(args.quick)
    results: dict[str, Any] = {"host": {"cpus": usable_cpus(), "python": sys.version.split()[0]},
                               "quick": quick}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("primitives", lambda: bench_primitives(50 if quick else 1000)),
        ("handshake", lambda: bench_handshake(10 if quick else 200)),
        ("parallel", lambda: bench_parallel([1, 4] if quick else [1, 4, 16, 64],
                                            1 if quick else 5)),
        ("throughput", lambda: bench_throughput((8 if quick else 128) << 20,
                                                3 if quick else 5)),
        ("backends", lambda: bench_backends(quick)),
        ("protocols", lambda: bench_protocols(5, 2, 1, 4 << 20, 4) if quick
         else bench_protocols(100, 5, 5, 64 << 20, 16)),
    ]
    only = [x for x in (getattr(args, "only", "") or "").split(",") if x]
    if only:
        unknown = sorted(set(only) - {name for name, _ in steps})
        if unknown:
            raise ValueError(f"--only: unknown step(s) {', '.join(unknown)}; choose from "
                             + ", ".join(name for name, _ in steps))
        steps = [(name, fn) for name, fn in steps if name in only]
    from rich.progress import Progress

    with Progress() as progress:
        task = progress.add_task("bench-pqc", total=len(steps))
        for name, fn in steps:
            progress.update(task, description=f"bench-pqc: {name}")
            results[name] = fn()
            progress.advance(task)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    full = all(k in results for k in ("primitives", "handshake", "parallel", "throughput"))
    results["plots"] = _plot(results, out) if full else []
    report = _report(results) if full else ""
    if "throughput" in results and not full:
        report += throughput_report(results["throughput"])
    if "backends" in results:
        report += "\n" + backends_report(results["backends"])
    if "protocols" in results:
        report += "\n" + protocols_report(results["protocols"])
    (out / "report.md").write_text(report)
    print(report)
    return 0
