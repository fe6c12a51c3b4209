"""Shared pieces of ``pqfed bench``: statistics, host facts, log markers, the aggregator's
control protocol (lock / barrier / finished) and the benchmark's key material."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# --- statistics ------------------------------------------------------------------------------

CDF_POINTS = 100


def stats(samples: list[float]) -> dict[str, Any]:
    """Latency summary in microseconds (samples in seconds), with a down-sampled CDF."""
    s = sorted(samples)
    n = len(s)
    if n == 0:
        return {"n": 0}

    def q(p: float) -> float:
        return s[min(n - 1, int(p * n))] * 1e6

    if n <= CDF_POINTS:
        cdf = [x * 1e6 for x in s]
    else:
        cdf = [s[round(i * (n - 1) / (CDF_POINTS - 1))] * 1e6 for i in range(CDF_POINTS)]
    return {
        "n": n,
        "mean_us": statistics.fmean(s) * 1e6,
        "p50_us": q(0.50),
        "p90_us": q(0.90),
        "p99_us": q(0.99),
        "max_us": s[-1] * 1e6,
        "stdev_us": statistics.pstdev(s) * 1e6,
        "cdf_us": [round(x, 2) for x in cdf],
    }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def shares(clients: int, nodes: int) -> list[int]:
    """Clients per node when `clients` are spread round-robin over `nodes`."""
    return [clients // nodes + (1 if i < clients % nodes else 0) for i in range(nodes)]


# --- host facts ------------------------------------------------------------------------------

def usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return list(range(os.cpu_count() or 1))


def _cgroup_v1_cpu_dir(lines: list[str]) -> tuple[Path, str] | None:
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            for mount in (f"/sys/fs/cgroup/{controllers}", "/sys/fs/cgroup/cpu",
                          "/sys/fs/cgroup/cpu,cpuacct"):
                if Path(mount).is_dir():
                    return Path(mount), path
    return None


def cpu_quota_cores() -> float | None:
    """The tightest CFS quota (in cores) over this process's cgroup and its ancestors, or None.

    The emulated nodes' ``--cpu-limit-cores`` and a pod's ``resources.limits.cpu`` show here;
    CPU affinity does not (an emulated node still sees all host CPUs)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    best: float | None = None
    v2 = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), None)
    if v2 is not None and Path("/sys/fs/cgroup/cgroup.controllers").exists():
        d = Path("/sys/fs/cgroup") / v2.lstrip("/")
        root = Path("/sys/fs/cgroup")
        while True:
            with contextlib.suppress(OSError, ValueError):
                quota, period = (d / "cpu.max").read_text().split()
                if quota != "max":
                    cores = int(quota) / int(period)
                    best = cores if best is None else min(best, cores)
            if d == root:
                break
            d = d.parent
        return best
    found = _cgroup_v1_cpu_dir(lines)
    if found is None:
        return None
    mount, rel = found
    d = mount / rel.lstrip("/")
    while True:
        with contextlib.suppress(OSError, ValueError):
            quota_us = int((d / "cpu.cfs_quota_us").read_text())
            period_us = int((d / "cpu.cfs_period_us").read_text())
            if quota_us > 0:
                cores = quota_us / period_us
                best = cores if best is None else min(best, cores)
        if d == mount:
            break
        d = d.parent
    return best


def emulated_node_quota(node: str) -> float | None:
    """The CPU quota (cores) the emulated node agent set on ``pqfed/<node>``, read on the
    host: inside a pod /sys is the network namespace's sysfs, without the cgroup mounts."""
    for quota_file, period_file in (
            (f"/sys/fs/cgroup/pqfed/{node}/cpu.max", None),
            (f"/sys/fs/cgroup/cpu/pqfed/{node}/cpu.cfs_quota_us",
             f"/sys/fs/cgroup/cpu/pqfed/{node}/cpu.cfs_period_us"),
            (f"/sys/fs/cgroup/cpu,cpuacct/pqfed/{node}/cpu.cfs_quota_us",
             f"/sys/fs/cgroup/cpu,cpuacct/pqfed/{node}/cpu.cfs_period_us")):
        with contextlib.suppress(OSError, ValueError):
            if period_file is None:
                quota, period = Path(quota_file).read_text().split()
                return None if quota == "max" else int(quota) / int(period)
            quota_us = int(Path(quota_file).read_text())
            return None if quota_us <= 0 else quota_us / int(Path(period_file).read_text())
    return None


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    if "model name" in fields:
        return fields["model name"]
    if "model" in fields and not fields["model"].isdigit():  # Raspberry Pi: "Raspberry Pi 4..."
        return fields["model"]
    part = fields.get("cpu part")
    names = {"0xd08": "ARM Cortex-A72", "0xd03": "ARM Cortex-A53", "0xd0b": "ARM Cortex-A76"}
    return names.get(part or "", f"ARM part {part}" if part else platform.processor() or "?")


def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": sys.version.split()[0]}
    for dist in ("pqfed", "cryptography", "liboqs-python", "kubernetes", "flwr", "torch",
                 "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    with contextlib.suppress(Exception):
        from cryptography.hazmat.backends.openssl.backend import backend

        out["openssl"] = backend.openssl_version_text()
    return out


def host_info() -> dict[str, Any]:
    from pqfed.pqc.handshake import SUITE_AEAD, cpu_has_aes, default_suites

    mem = None
    with contextlib.suppress(Exception):
        import psutil

        mem = psutil.virtual_memory().total / 2**20
    cpus = usable_cpus()
    return {
        "hostname": socket.gethostname(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(cpus),
        "affinity": cpus,
        "cpu_quota_cores": cpu_quota_cores(),
        "mem_total_mib": mem,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "aes_instructions": cpu_has_aes(),
        "preferred_aead": SUITE_AEAD[default_suites()[0]],
        "versions": versions(),
    }


def effective_cores(host: dict[str, Any]) -> float:
    quota = host.get("cpu_quota_cores")
    cpus = float(host.get("usable_cpus") or 1)
    return min(cpus, quota) if quota else cpus


# --- log markers (results travel through stdout / pod logs) ----------------------------------

PROGRESS = "PQFED_BENCH_PROGRESS"
READY = "PQFED_BENCH_READY"
RESULT_BEGIN = "PQFED_BENCH_RESULT_BEGIN"
RESULT_END = "PQFED_BENCH_RESULT_END"


def emit_progress(step: str, done: int, total: int) -> None:
    print(f"{PROGRESS} {json.dumps({'step': step, 'done': done, 'total': total})}", flush=True)


def emit_ready(info: dict[str, Any]) -> None:
    print(f"{READY} {json.dumps(info)}", flush=True)


def emit_result(data: dict[str, Any]) -> None:
    """Pretty JSON between two marker lines: short lines survive every log pipeline (CRI
    splits lines longer than 16 KiB)."""
    print(RESULT_BEGIN, flush=True)
    print(json.dumps(data, indent=1), flush=True)
    print(RESULT_END, flush=True)


@dataclass
class LogState:
    progress: dict[str, Any] | None = None
    ready: dict[str, Any] | None = None
    result: dict[str, Any] | None = None


def parse_log(text: str) -> LogState:
    st = LogState()
    for line in text.splitlines():
        if line.startswith(PROGRESS + " "):
            with contextlib.suppress(ValueError):
                st.progress = json.loads(line[len(PROGRESS) + 1:])
        elif line.startswith(READY + " "):
            with contextlib.suppress(ValueError):
                st.ready = json.loads(line[len(READY) + 1:])
    end = text.rfind(RESULT_END)
    begin = text.rfind(RESULT_BEGIN, 0, end if end >= 0 else None)
    if begin >= 0 and end > begin:
        with contextlib.suppress(ValueError):
            st.result = json.loads(text[begin + len(RESULT_BEGIN):end])
    return st


# --- ports of the aggregator -----------------------------------------------------------------

@dataclass(frozen=True)
class AggregatorPorts:
    handshake_pq: int = 7441
    handshake_classical: int = 7442
    sink: int = 7443  # plaintext byte sink (also the aggregator sidecar's upstream)
    secure: int = 7444  # the aggregator's PQC sidecar
    control: int = 7445  # lock / barrier / finished

    def to_arg(self) -> str:
        return ",".join(str(v) for v in asdict(self).values())

    @classmethod
    def parse(cls, text: str) -> AggregatorPorts:
        values = [int(v) for v in text.split(",")]
        if len(values) != 5:
            raise ValueError(f"--ports {text!r}: expected 5 comma-separated ports")
        return cls(*values)


# --- the aggregator's control protocol (one line per request) --------------------------------
#   LOCK            -> GO once this node holds the lock; held until the connection closes
#   BARRIER key k n -> GO when k parties arrived; then DONE <seconds> -> OK
#   FINISHED n      -> OK
#   PING            -> PONG

def _connect(host: str, port: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + 60
    while True:
        try:
            s = socket.create_connection((host, port), timeout=10)
            s.settimeout(timeout)
            return s
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _request(s: socket.socket, line: str) -> str:
    s.sendall(line.encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            raise ConnectionError(f"aggregator closed the control connection after {line!r}")
        buf += chunk
    return buf.decode().strip()


@contextlib.contextmanager
def control_lock(host: str, port: int, timeout: float) -> Iterator[None]:
    """Serializes the per-node phase across nodes (they share the aggregator, and in the
    emulation the host's CPUs). Released when the connection closes, also on a crash."""
    with _connect(host, port, timeout) as s:
        if _request(s, "LOCK") != "GO":
            raise ConnectionError("control: LOCK refused")
        yield


class Barrier:
    def __init__(self, host: str, port: int, key: str, parties: int, node: str,
                 timeout: float) -> None:
        self._s = _connect(host, port, timeout)
        if _request(self._s, f"BARRIER {key} {parties} {node}") != "GO":
            raise ConnectionError(f"control: barrier {key} refused")

    def done(self, seconds: float) -> None:
        try:
            _request(self._s, f"DONE {seconds:.9f}")
        finally:
            self._s.close()


def control_finished(host: str, port: int, node: str, timeout: float = 60) -> None:
    with _connect(host, port, timeout) as s:
        _request(s, f"FINISHED {node}")


# --- key material ----------------------------------------------------------------------------

KINDS = {"pq": "ML-DSA-65", "classical": "Ed25519"}
MATERIAL_FILES = tuple(f"{k}-{name}" for k in KINDS
                       for name in ("ca.crt", "aggregator.crt", "aggregator.key", "client.crt",
                                    "client.key"))


def make_material() -> dict[str, str]:
    """A throw-away CA per kind (ML-DSA-65 and the classical Ed25519 baseline), each with an
    aggregator and one client identity: file name -> PEM text (a directory or a Secret)."""
    from pqfed.pqc.identity import CertificateAuthority, Role

    files: dict[str, str] = {}
    for kind, alg in KINDS.items():
        ca = CertificateAuthority.generate(f"pqfed-bench-{kind}", algorithm=alg,
                                           validity_s=7 * 86400)
        agg = ca.new_identity("aggregator", Role.AGGREGATOR, algorithm=alg, validity_s=86400)
        cli = ca.new_identity("bench-client", Role.CLIENT, algorithm=alg, validity_s=86400)
        files[f"{kind}-ca.crt"] = ca.root.to_pem()
        files[f"{kind}-aggregator.crt"] = agg.certificate.to_pem()
        files[f"{kind}-aggregator.key"] = agg.private_key_pem()
        files[f"{kind}-client.crt"] = cli.certificate.to_pem()
        files[f"{kind}-client.key"] = cli.private_key_pem()
    return files


def write_material(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = directory / name
        if name.endswith(".key"):
            path.touch(mode=0o600)
        path.write_text(text)


@dataclass(frozen=True)
class Material:
    directory: Path

    def text(self, kind: str, name: str) -> str:
        return (self.directory / f"{kind}-{name}").read_text()

    def path(self, kind: str, name: str) -> Path:
        return self.directory / f"{kind}-{name}"

    def peer_pems(self) -> tuple[str, str, str, str, str]:
        """What pqfed.pqc.bench.peer_init takes: CA, aggregator and client PEMs (ML-DSA-65)."""
        return (self.text("pq", "ca.crt"), self.text("pq", "aggregator.crt"),
                self.text("pq", "aggregator.key"), self.text("pq", "client.crt"),
                self.text("pq", "client.key"))

    def handshake_config(self, kind: str, role: str) -> Any:
        from pqfed.pqc.handshake import Group, HandshakeConfig, KeySharePool
        from pqfed.pqc.identity import Certificate, Identity, TrustAnchor

        trust = TrustAnchor(Certificate.from_pem(self.text(kind, "ca.crt")))
        ident = Identity.load(self.text(kind, f"{role}.crt"), self.text(kind, f"{role}.key"))
        group = Group.X25519 if kind == "classical" else Group.X25519_MLKEM768
        return HandshakeConfig(
            ident, trust, groups=(group,), peer_signature_algorithms=(KINDS[kind],),
            key_shares=KeySharePool() if role == "client" else None)
