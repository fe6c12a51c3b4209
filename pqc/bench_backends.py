"""`make bench-pqc`, step "backends": pyca against liboqs in one run.

Three levels, each measured alternately (backend A, backend B, A, B, ...) so that frequency
scaling and noisy neighbours hit both alike, repeated over several runs whose spread is
reported: the primitives, the full hybrid handshake in memory (against the classical
X25519 + Ed25519 handshake measured in the same rotation: the goal is <= 1.5x with liboqs),
and many handshakes at once on a thread pool and a process pool. The default backend
(`auto`, pqc/backends/__init__.py) is the one that wins here; `faster` records the verdict.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from pqfed.pqc.backends import (
    BACKEND_ENV,
    BACKENDS,
    Backend,
    available_backends,
    get_backend,
)
from pqfed.pqc.handshake import ClientHandshake, Group, HandshakeConfig, ServerHandshake
from pqfed.pqc.identity import Certificate, CertificateAuthority, Identity, Role
from pqfed.pqc.pool import CryptoPool, PoolMode, usable_cpus
from pqfed.pqc.record import FrameDecoder

CLASSICAL = "classical"


@contextlib.contextmanager
def default_backend(name: str) -> Iterator[Backend]:
    """Makes `name` the process default (certificate checks use the default backend)."""
    before = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = name
    get_backend.cache_clear()
    try:
        yield get_backend()
    finally:
        if before is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = before
        get_backend.cache_clear()


def _spread(per_run: list[float], cpu: list[float] | None = None) -> dict[str, float]:
    """Median over runs of the per-run mean wall time, with the runs' min and max (µs), and
    the median CPU time of the process per op (less sensitive to a busy shared host)."""
    out = {"median_us": statistics.median(per_run) * 1e6, "min_us": min(per_run) * 1e6,
           "max_us": max(per_run) * 1e6, "runs": len(per_run)}
    if cpu:
        out["cpu_median_us"] = statistics.median(cpu) * 1e6
    return out


def _alternate(ops: dict[str, Callable[[], object]], n: int, runs: int,
               prepare: dict[str, Callable[[], object]] | None = None) -> dict[str, Any]:
    """Each run: n rounds of every op in turn; records each op's mean per run (wall clock and
    process CPU time). `prepare[op]` runs untimed before each call of that op."""
    setup = prepare or {}
    for name, fn in ops.items():  # warm-up
        for _ in range(max(3, n // 10)):
            setup.get(name, _nothing)()
            fn()
    per_run: dict[str, list[float]] = {name: [] for name in ops}
    cpu_run: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(runs):
        total = dict.fromkeys(ops, 0.0)
        cpu = dict.fromkeys(ops, 0.0)
        for _ in range(n):
            for name, fn in ops.items():
                setup.get(name, _nothing)()
                c0 = time.process_time()
                t0 = time.perf_counter()
                fn()
                total[name] += time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
        for name in ops:
            per_run[name].append(total[name] / n)
            cpu_run[name].append(cpu[name] / n)
    return {name: _spread(v, cpu_run[name]) for name, v in per_run.items()}


def _nothing() -> None:
    return None


def _primitive_ops(b: Backend) -> dict[str, Callable[[], object]]:
    kem = b.kem_generate("ML-KEM-768")
    kem_pk = kem.public_bytes()
    ct, _ = b.kem_encapsulate("ML-KEM-768", kem_pk)
    sig = b.sig_generate("ML-DSA-65")
    msg = os.urandom(1024)
    signature, pk = sig.sign(msg), sig.public_bytes()
    return {
        "ML-KEM-768 keygen": lambda: b.kem_generate("ML-KEM-768"),
        "ML-KEM-768 encaps": lambda: b.kem_encapsulate("ML-KEM-768", kem_pk),
        "ML-KEM-768 decaps": lambda: kem.decapsulate(ct),
        "ML-DSA-65 keygen": lambda: b.sig_generate("ML-DSA-65"),
        "ML-DSA-65 sign (1 KiB)": lambda: sig.sign(msg),
        "ML-DSA-65 verify": lambda: b.sig_verify("ML-DSA-65", pk, msg, signature),
    }


def bench_primitives(backends: list[str], n: int, runs: int) -> dict[str, Any]:
    ops: dict[str, Callable[[], object]] = {}
    for name in backends:
        for op, fn in _primitive_ops(get_backend(name)).items():
            ops[f"{name}|{op}"] = fn
    measured = _alternate(ops, n, runs)
    out: dict[str, dict[str, Any]] = {}
    for key, value in measured.items():
        name, op = key.split("|")
        out.setdefault(op, {})[name] = value
    return out


def _handshake_configs(backend: str | None) -> tuple[HandshakeConfig, HandshakeConfig]:
    """Client and aggregator configs; `backend` None: the classical baseline."""
    alg = "Ed25519" if backend is None else "ML-DSA-65"
    owner = get_backend(backend or "pyca")
    ca_key = owner.sig_generate(alg)
    ca = CertificateAuthority.generate("bench", algorithm=alg) if backend is None else None
    if ca is None:
        # A CA whose key was made by this backend (ML-DSA-65), so both sides use it alone.
        ca = _ca_with_key(ca_key, alg)
    groups = (Group.X25519,) if backend is None else (Group.X25519_MLKEM768,)
    cfgs = []
    for node, role in (("client-0", Role.CLIENT), ("aggregator", Role.AGGREGATOR)):
        key = owner.sig_generate(alg)
        ident = Identity(ca.issue(node, role, key.public_bytes(), algorithm=alg), key)
        cfgs.append(HandshakeConfig(ident, ca.trust, groups=groups,
                                    peer_signature_algorithms=(alg,), backend=owner))
    return cfgs[0], cfgs[1]


def _ca_with_key(key: Any, alg: str) -> CertificateAuthority:
    from pqfed.pqc.identity import CERT_CONTEXT, key_id

    now = int(time.time())
    public = key.public_bytes()
    root = Certificate("bench", "ca", Role.CA, alg, public, now - 300, now + 365 * 86400, 1,
                       key_id(public))
    return CertificateAuthority(Identity(replace(root, signature=key.sign(root.tbs_bytes(),
                                                                          CERT_CONTEXT)), key))


def handshake_once(c_cfg: HandshakeConfig, s_cfg: HandshakeConfig) -> None:
    client, server = ClientHandshake(c_cfg), ServerHandshake(s_cfg)
    to_s, to_c = FrameDecoder(), FrameDecoder()
    f1 = b"".join(server.receive(f) for f in to_s.feed(client.start()))
    f2 = b"".join(client.receive(f) for f in to_c.feed(f1))
    for f in to_s.feed(f2):
        server.receive(f)
    if not (client.complete and server.complete):
        raise RuntimeError("benchmark handshake did not complete")


def bench_handshake(backends: list[str], n: int, runs: int) -> dict[str, Any]:
    """Full handshake, both ends in this process, each variant with its own default backend
    (the certificate checks go through the default)."""
    variants: dict[str, tuple[HandshakeConfig, HandshakeConfig]] = {}
    for name in [*backends, CLASSICAL]:
        with default_backend("pyca" if name == CLASSICAL else name):
            variants[name] = _handshake_configs(None if name == CLASSICAL else name)

    def select(name: str) -> Callable[[], object]:
        def switch() -> None:
            os.environ[BACKEND_ENV] = "pyca" if name == CLASSICAL else name
            get_backend.cache_clear()
            get_backend()
        return switch

    ops: dict[str, Callable[[], object]] = {
        name: functools.partial(handshake_once, c, s) for name, (c, s) in variants.items()}
    with default_backend("pyca"):
        res = _alternate(ops, n, runs, {name: select(name) for name in variants})
    out: dict[str, Any] = {"runs": res}
    base = res[CLASSICAL]["median_us"]
    out["ratio_to_classical"] = {name: res[name]["median_us"] / base for name in backends}
    base_cpu = res[CLASSICAL]["cpu_median_us"]
    out["ratio_to_classical_cpu"] = {name: res[name]["cpu_median_us"] / base_cpu
                                     for name in backends}
    return out


def _handshake_with(c_cfg: HandshakeConfig, s_cfg: HandshakeConfig, i: int) -> int:
    handshake_once(c_cfg, s_cfg)
    return i


_PEER: dict[str, Any] = {}


def _peer_init(backend: str) -> None:
    os.environ[BACKEND_ENV] = backend
    get_backend.cache_clear()
    _PEER["cfg"] = _handshake_configs(backend)


def _peer_handshake(i: int) -> int:
    handshake_once(*_PEER["cfg"])
    return i


def bench_parallel(backends: list[str], peers: int, runs: int) -> dict[str, Any]:
    """`peers` handshakes per batch on a pool (threads, processes), backends alternating.
    liboqs' ctypes calls release the GIL throughout; pyca holds it for ML-KEM."""
    workers = usable_cpus()
    out: dict[str, Any] = {"cpus": workers, "peers": peers}
    for mode in (PoolMode.THREADS, PoolMode.PROCESSES):
        pools: dict[str, CryptoPool] = {}
        thread_cfgs: dict[str, tuple[HandshakeConfig, HandshakeConfig]] = {}
        try:
            for name in backends:
                if mode is PoolMode.THREADS:
                    with default_backend(name):
                        thread_cfgs[name] = _handshake_configs(name)
                    pools[name] = CryptoPool(mode, workers)
                    pools[name].warm_up()
                else:
                    pools[name] = CryptoPool(mode, workers, _peer_init, (name,))
                    pools[name].warm_up()
                    pools[name].map(_peer_handshake, range(workers * 2))
            per_run: dict[str, list[float]] = {name: [] for name in backends}
            for _ in range(runs):
                for name, pool in pools.items():
                    with default_backend(name):
                        if mode is PoolMode.THREADS:
                            c, s = thread_cfgs[name]
                            t0 = time.perf_counter()
                            pool.map(functools.partial(_handshake_with, c, s), range(peers))
                        else:
                            t0 = time.perf_counter()
                            pool.map(_peer_handshake, range(peers))
                        per_run[name].append((time.perf_counter() - t0) / peers)
            out[mode.value] = {name: _spread(v) for name, v in per_run.items()}
        finally:
            for pool in pools.values():
                pool.close()
    return out


def bench_backends(quick: bool) -> dict[str, Any]:
    status = available_backends()
    present = [name for name in BACKENDS if status[name] == "ok"]
    res: dict[str, Any] = {"available": status, "backends": {}}
    for name in present:
        b = get_backend(name)
        res["backends"][name] = str(getattr(b, "description", "pyca/cryptography"))
    runs = 3 if quick else 7
    res["primitives"] = bench_primitives(present, 30 if quick else 300, runs)
    res["handshake"] = bench_handshake(present, 10 if quick else 100, runs)
    res["parallel"] = bench_parallel(present, 8 if quick else 64, runs)
    hs = res["handshake"]["runs"]
    res["faster"] = min(present, key=lambda name: hs[name]["median_us"])
    return res


def report(r: dict[str, Any]) -> str:
    names = list(r["backends"])
    head = " | ".join(f"{n} µs (min-max) [CPU µs]" for n in names)
    both = names == ["pyca", "liboqs"]
    lines = ["### PQC backends: " + ", ".join(f"{n} = {d}" for n, d in r["backends"].items()),
             "", f"| operation | {head} | "
             + ("pyca / liboqs (CPU time where shown, else wall) |" if both else ""),
             "|---|" + "---|" * (len(names) + both)]

    def cell(s: dict[str, float]) -> str:
        cpu = f" [{s['cpu_median_us']:.1f}]" if "cpu_median_us" in s else ""
        return f"{s['median_us']:.1f} ({s['min_us']:.1f}-{s['max_us']:.1f}){cpu}"

    def ratio(row: dict[str, dict[str, float]]) -> str:
        if names != ["pyca", "liboqs"]:
            return ""
        key = "cpu_median_us" if "cpu_median_us" in row["liboqs"] else "median_us"
        return f" {row['pyca'][key] / row['liboqs'][key]:.1f}x |"

    for op, row in r["primitives"].items():
        lines.append(f"| {op} | " + " | ".join(cell(row[n]) for n in names) + " |" + ratio(row))
    hs = r["handshake"]["runs"]
    lines.append("| full handshake, in memory | " + " | ".join(cell(hs[n]) for n in names)
                 + " |" + ratio(hs))
    for mode in ("threads", "processes"):
        row = r["parallel"][mode]
        lines.append(f"| {r['parallel']['peers']} handshakes on {r['parallel']['cpus']} "
                     f"{mode}, per handshake | " + " | ".join(cell(row[n]) for n in names)
                     + " |" + ratio(row))
    lines += ["", f"Classical handshake (X25519 + Ed25519): {cell(hs[CLASSICAL])} µs; "
              "hybrid / classical: " + ", ".join(
                  f"{n} {v:.2f}x" for n, v in r["handshake"]["ratio_to_classical"].items())
              + " (CPU time: " + ", ".join(
                  f"{n} {v:.2f}x" for n, v in r["handshake"]["ratio_to_classical_cpu"].items())
              + ")",
              f"Faster backend (full handshake): **{r['faster']}**"]
    return "\n".join(lines) + "\n"
