"""Shared state of one node agent that pod workers use, and small process helpers."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqfed.testbed.nodeagent.cgroups import Cgroups
from pqfed.testbed.nodeagent.config import AgentConfig
from pqfed.testbed.nodeagent.kube import ApiError, Kube, Obj
from pqfed.testbed.nodeagent.network import Ipam
from pqfed.testbed.nodeagent.volumes import TokenCache

log = logging.getLogger(__name__)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def pid_alive(pid: int, start_time: int | None) -> bool:
    current = proc_start_time(pid)
    return current is not None and (start_time is None or current == start_time)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class AgentContext:
    """What every pod worker of a node agent shares."""

    config: AgentConfig
    kube: Kube
    cgroups: Cgroups
    ipam: Ipam | None
    tokens: TokenCache
    node_alloc: dict[str, str]
    api_host: str  # how pods reach the apiserver
    api_port: int
    host_ip: str  # the node's InternalIP: pods' hostIP, and podIP of hostNetwork pods
    render_hosts: Callable[[Obj, str], str]
    on_worker_done: Callable[[str], None]
    shim: Path = field(default_factory=lambda: Path(__file__).with_name("shim.py"))
    mount_namespaces: bool = True
    _events_lock: threading.Lock = field(default_factory=threading.Lock)
    _recent_events: dict[tuple[str, str, str], float] = field(default_factory=dict)

    @property
    def pods_dir(self) -> Path:
        return self.config.state_dir / "pods"

    def event(self, pod: Obj, reason: str, message: str, *, warning: bool = False,
              container: str | None = None) -> None:
        """Best-effort core/v1 Event about ``pod`` (deduplicated for a minute)."""
        import time

        meta = pod["metadata"]
        key = (meta["uid"], reason, message)
        with self._events_lock:
            last = self._recent_events.get(key, 0.0)
            if time.monotonic() - last < 60:
                return
            self._recent_events[key] = time.monotonic()
            if len(self._recent_events) > 2000:
                self._recent_events.clear()
        ts = now_rfc3339()
        involved: Obj = {"kind": "Pod", "apiVersion": "v1", "namespace": meta["namespace"],
                         "name": meta["name"], "uid": meta["uid"]}
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        body: Obj = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1000],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "kubelet", "host": self.config.name},
            "reportingComponent": "kubelet",
            "reportingInstance": self.config.name,
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "count": 1,
        }
        with contextlib.suppress(ApiError, OSError):
            self.kube.create(f"/api/v1/namespaces/{meta['namespace']}/events", body)
