"""Settings of one emulated node: identity, capacity, network and CPU emulation."""

from __future__ import annotations

import math
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pqfed.services import TESTBED_LABEL

# A Raspberry Pi 4 Model B (4 GB), as the production k3s cluster reports it.
PI4_LABELS = {
    "kubernetes.io/arch": "arm64",
    "kubernetes.io/os": "linux",
    "beta.kubernetes.io/arch": "arm64",
    "beta.kubernetes.io/os": "linux",
    "node.kubernetes.io/instance-type": "raspberrypi-4b",
    TESTBED_LABEL: "emulated",
}

_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9,
    "T": 1e12, "P": 1e15, "E": 1e18,
}
_QUANTITY = re.compile(
    r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|K|M|G|T|P|E)?$")


def runtime_paths() -> tuple[Path, ...]:
    """What a pod needs to run the project's commands: the agent's virtualenv, the Python it
    was made from and the source tree (an editable install points there). Nested paths are
    dropped: binding the outer one brings them along."""
    candidates = sorted({Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
                         Path(__file__).resolve().parents[2]}, key=lambda p: len(p.parts))
    kept: list[Path] = []
    for path in candidates:
        if path != Path("/") and not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
    return tuple(kept)


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity in base units: ``"500m"`` -> 0.5, ``"4Gi"`` -> 4294967296."""
    if isinstance(value, int | float):
        return float(value)
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2) or ""]


def parse_labels(text: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` -> dict; empty string -> {}."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"label {item!r}: expected key=value")
        labels[key.strip()] = val.strip()
    return labels


@dataclass(frozen=True)
class NetShaping:
    """tc settings applied to both directions of a pod's veth pair."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: float = 0.0

    @property
    def empty(self) -> bool:
        return not (self.delay_ms or self.jitter_ms or self.loss_pct or self.rate_mbit)

    def describe(self) -> str:
        if self.empty:
            return "none"
        parts = []
        if self.delay_ms or self.jitter_ms:
            parts.append(f"delay {self.delay_ms:g}ms ±{self.jitter_ms:g}ms")
        if self.loss_pct:
            parts.append(f"loss {self.loss_pct:g}%")
        if self.rate_mbit:
            parts.append(f"rate {self.rate_mbit:g}mbit")
        return ", ".join(parts)


NET_PRESETS: dict[str, NetShaping] = {
    "none": NetShaping(),
    # 2.4/5 GHz WiFi of a Pi 4 in a ward: noticeable latency and jitter, rare loss.
    "pi4-wifi": NetShaping(delay_ms=20, jitter_ms=5, loss_pct=0.1, rate_mbit=50),
    # Gigabit Ethernet of a Pi 4 (~900 Mbit/s in practice).
    "pi4-ethernet": NetShaping(delay_ms=0.3, rate_mbit=900),
}


def default_node_index(name: str) -> int:
    """Third octet of the node's pod IPs: trailing digits + 1 (``pi-0`` -> 1), else a hash."""
    match = re.search(r"(\d+)$", name)
    if match and int(match.group(1)) < 254:
        return int(match.group(1)) + 1
    return zlib.crc32(name.encode()) % 200 + 50


@dataclass
class AgentConfig:
    """Everything ``pqfed node-agent`` was asked to do."""

    name: str
    kubeconfig: Path
    state_dir: Path
    proxy_kubeconfig: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    cpu: str = "4"
    memory: str = "4Gi"
    pods: int = 20
    ephemeral_storage: str = "29Gi"
    cpu_limit_cores: float | None = None
    netns: bool = True
    bridge: str = "pqfed0"
    pod_subnet: str = "10.88.0.0/16"
    node_index: int | None = None
    shaping: NetShaping = field(default_factory=NetShaping)
    venv_bin: Path = field(default_factory=lambda: Path(sys.executable).parent)
    python: Path = field(default_factory=lambda: Path(sys.executable))
    # Bound into every pod's mount namespace after its volumes (see shim.py).
    runtime: tuple[Path, ...] = field(default_factory=runtime_paths)
    restart_backoff_s: float = 10.0
    max_backoff_s: float = 300.0
    heartbeat_s: float = 10.0
    lease_duration_s: int = 40
    shutdown_grace_s: float = 30.0
    keep_pods_on_exit: bool = False
    apiserver_pod_host: str | None = None  # how pods reach the apiserver; default: kubeconfig host

    @property
    def subnet_prefix(self) -> str:
        """``"10.88"`` for 10.88.0.0/16."""
        match = re.match(r"^(\d+)\.(\d+)\.0\.0/16$", self.pod_subnet)
        if not match:
            raise ValueError(f"pod subnet {self.pod_subnet!r}: must be A.B.0.0/16")
        return f"{match.group(1)}.{match.group(2)}"

    @property
    def bridge_ip(self) -> str:
        return f"{self.subnet_prefix}.0.1"

    @property
    def cpu_cores(self) -> float:
        return parse_quantity(self.cpu)

    @property
    def memory_bytes(self) -> int:
        return int(parse_quantity(self.memory))

    def node_labels(self) -> dict[str, str]:
        return {**PI4_LABELS, "kubernetes.io/hostname": self.name, **self.labels}

    def validate(self) -> None:
        if not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", self.name) or len(self.name) > 63:
            raise ValueError(f"node name {self.name!r} is not a valid DNS label")
        _ = self.subnet_prefix, self.cpu_cores, self.memory_bytes
        parse_quantity(self.ephemeral_storage)
        if self.node_index is not None and not 1 <= self.node_index <= 254:
            raise ValueError("--node-index must be within 1..254")
        if self.cpu_limit_cores is not None and not (
            self.cpu_limit_cores > 0 and math.isfinite(self.cpu_limit_cores)
        ):
            raise ValueError("--cpu-limit-cores must be > 0")
        if self.pods < 1:
            raise ValueError("--pods must be >= 1")
