"""Pod networking without a CNI: a host bridge, one network namespace and veth pair per pod.

Layout (defaults): bridge ``pqfed0`` with 10.88.0.1/16 on the host side (the
apiserver binds that address, see testbed/cluster/up.sh); node N's pods get
10.88.N.2-254/16 on ``eth0`` in their namespace, default route via 10.88.0.1.
The bridge has no uplink and nothing here enables forwarding or NAT, so pods
reach each other, the host's bridge address and nothing else.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from pathlib import Path

from pqfed.testbed.nodeagent.config import NetShaping

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")


class NetworkError(RuntimeError):
    pass


def _run(args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise NetworkError(f"{' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def link_exists(name: str, netns: str | None = None) -> bool:
    args = ["ip", *(["-n", netns] if netns else []), "link", "show", "dev", name]
    return _run(args, check=False).returncode == 0


def ensure_bridge(name: str, address: str, prefix: int = 16) -> None:
    """Create the bridge with ``address/prefix`` and bring it up; idempotent and race-safe."""
    if not link_exists(name):
        created = _run(["ip", "link", "add", "name", name, "type", "bridge"], check=False)
        if created.returncode != 0 and not link_exists(name):
            raise NetworkError(f"cannot create bridge {name}: {created.stderr.strip()}")
        if created.returncode == 0:
            log.info("created bridge %s", name)
    addrs = _run(["ip", "-4", "-o", "addr", "show", "dev", name]).stdout
    if f" {address}/{prefix} " not in addrs:
        added = _run(["ip", "addr", "add", f"{address}/{prefix}", "dev", name], check=False)
        if added.returncode != 0 and "File exists" not in added.stderr:
            raise NetworkError(f"cannot add {address}/{prefix} to {name}: {added.stderr.strip()}")
    _run(["ip", "link", "set", "dev", name, "up"])


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def create_pod_network(
    netns: str, veth: str, ip: str, gateway: str, bridge: str, prefix: int = 16
) -> None:
    """A fresh namespace ``netns`` with lo and eth0=ip/prefix, wired to ``bridge`` via ``veth``."""
    delete_pod_network(netns, veth)
    _run(["ip", "netns", "add", netns])
    try:
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
        _run(["ip", "link", "set", "dev", veth, "master", bridge, "up"])
        _run(["ip", "-n", netns, "link", "set", "dev", "lo", "up"])
        _run(["ip", "-n", netns, "addr", "add", f"{ip}/{prefix}", "dev", "eth0"])
        _run(["ip", "-n", netns, "link", "set", "dev", "eth0", "up"])
        _run(["ip", "-n", netns, "route", "add", "default", "via", gateway])
    except NetworkError:
        delete_pod_network(netns, veth)
        raise


def delete_pod_network(netns: str, veth: str) -> None:
    """Remove the namespace (its eth0 and so the veth pair go with it); idempotent."""
    if netns_exists(netns):
        _run(["ip", "netns", "delete", netns], check=False)
    if link_exists(veth):
        _run(["ip", "link", "delete", "dev", veth], check=False)


_netem_supported: bool | None = None
_netem_lock = threading.Lock()


def _tbf_args(rate_mbit: float) -> list[str]:
    burst = max(32 * 1024, int(rate_mbit * 1e6 / 8 / 100))  # >= 10 ms at line rate
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "50ms"]


def _netem_args(s: NetShaping) -> list[str]:
    args = ["netem"]
    if s.delay_ms or s.jitter_ms:
        args += ["delay", f"{s.delay_ms:g}ms"]
        if s.jitter_ms:
            args += [f"{s.jitter_ms:g}ms"]
    if s.loss_pct:
        args += ["loss", f"{s.loss_pct:g}%"]
    if s.rate_mbit:
        args += ["rate", f"{s.rate_mbit:g}mbit"]
    return args


def apply_shaping(netns: str | None, dev: str, shaping: NetShaping) -> str:
    """Shape egress of ``dev`` (in ``netns`` if given) and return what was applied.

    Uses netem; on kernels without sch_netem only the rate is emulated (tbf)
    and the answer says so.
    """
    global _netem_supported  # noqa: PLW0603
    if shaping.empty:
        return "none"
    prefix = ["ip", "netns", "exec", netns] if netns else []
    base = [*prefix, "tc", "qdisc", "replace", "dev", dev, "root"]
    with _netem_lock:
        supported = _netem_supported
    if supported is not False:
        proc = _run([*base, *_netem_args(shaping)], check=False)
        if proc.returncode == 0:
            with _netem_lock:
                _netem_supported = True
            return f"netem {shaping.describe()}"
        if "unknown" not in proc.stderr.lower():
            raise NetworkError(f"tc netem on {dev}: {proc.stderr.strip()}")
        with _netem_lock:
            _netem_supported = False
        log.warning("kernel has no sch_netem: emulating only the rate (tbf); delay/loss ignored")
    if not shaping.rate_mbit:
        return "none (kernel lacks sch_netem for delay/loss)"
    _run([*base, *_tbf_args(shaping.rate_mbit)])
    return f"tbf rate {shaping.rate_mbit:g}mbit (kernel lacks sch_netem: no delay/loss)"


class Ipam:
    """Pod IPs ``<prefix>.<node>.2-254`` of one node; thread-safe."""

    def __init__(self, subnet_prefix: str, node_index: int) -> None:
        self.base = f"{subnet_prefix}.{node_index}"
        self._used: dict[str, str] = {}  # ip -> pod uid
        self._cursor = 2
        self._lock = threading.Lock()

    def reserve(self, uid: str, ip: str) -> None:
        with self._lock:
            self._used[ip] = uid

    def allocate(self, uid: str) -> str:
        with self._lock:
            for ip, owner in self._used.items():
                if owner == uid:
                    return ip
            # Next-fit: a just-freed address (and stale ARP entries) is not reused at once.
            for step in range(253):
                n = (self._cursor + step - 2) % 253 + 2
                ip = f"{self.base}.{n}"
                if ip not in self._used:
                    self._used[ip] = uid
                    self._cursor = n + 1
                    return ip
        raise NetworkError(f"no free pod IP left in {self.base}.0/24")

    def release(self, uid: str) -> None:
        with self._lock:
            for ip in [ip for ip, owner in self._used.items() if owner == uid]:
                del self._used[ip]
