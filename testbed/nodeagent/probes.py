"""readinessProbe / livenessProbe / startupProbe and lifecycle handlers.

httpGet and tcpSocket connect from the host to the pod IP over the bridge
(what the kubelet does); exec runs the command inside the container's
namespaces with ``nsenter --target <pid> --mount --net --uts``. gRPC probes
are approximated by a TCP connect.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pqfed.testbed.nodeagent.kube import Obj


def resolve_port(port: Any, container: Obj) -> int:
    if isinstance(port, int):
        return port
    if str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"no container port named {port!r}")


def run_handler(
    handler: Obj,
    *,
    host: str,
    container: Obj,
    pid: int | None,
    env: Mapping[str, str],
    timeout: float,
) -> tuple[bool, str]:
    """Run an httpGet/tcpSocket/exec/grpc handler; (success, message)."""
    try:
        if "httpGet" in handler:
            h = handler["httpGet"]
            port = resolve_port(h.get("port", 80), container)
            target = h.get("host") or host
            conn: http.client.HTTPConnection
            if str(h.get("scheme", "HTTP")).upper() == "HTTPS":
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                conn = http.client.HTTPSConnection(target, port, timeout=timeout, context=ctx)
            else:
                conn = http.client.HTTPConnection(target, port, timeout=timeout)
            headers = {"User-Agent": "kube-probe/pqfed", "Accept": "*/*"}
            headers.update({x["name"]: x["value"] for x in h.get("httpHeaders") or []})
            try:
                conn.request("GET", h.get("path") or "/", headers=headers)
                status = conn.getresponse().status
            finally:
                conn.close()
            ok = 200 <= status < 400
            return ok, f"HTTP probe {target}:{port}{h.get('path') or '/'}: status {status}"
        if "tcpSocket" in handler or "grpc" in handler:
            t = handler.get("tcpSocket") or handler["grpc"]
            port = resolve_port(t.get("port"), container)
            target = t.get("host") or host
            with socket.create_connection((target, port), timeout=timeout):
                return True, f"TCP {target}:{port} open"
        if "exec" in handler:
            command = [str(c) for c in handler["exec"].get("command") or []]
            if not command:
                return False, "exec probe without command"
            prefix = ["nsenter", "--target", str(pid), "--mount", "--net", "--uts", "--"] \
                if pid else []
            proc = subprocess.run(
                [*prefix, *command], env=dict(env), capture_output=True, timeout=timeout,
                check=False, cwd="/",
            )
            out = (proc.stdout + proc.stderr).decode(errors="replace").strip()[-300:]
            return proc.returncode == 0, f"exec {command[0]}: exit {proc.returncode} {out}"
        if "sleep" in handler:
            time.sleep(min(float(handler["sleep"].get("seconds", 0)), timeout))
            return True, "slept"
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g}s"
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return False, str(exc) or type(exc).__name__
    return False, f"unsupported handler {sorted(handler)}"


@dataclass
class Prober:
    """One probe of one container: schedule, thresholds, current result."""

    kind: str  # readiness | liveness | startup
    spec: Obj
    started: float = field(default_factory=time.monotonic)
    next_run: float = 0.0
    successes: int = 0
    failures: int = 0
    result: bool | None = None  # None: not decided yet
    message: str = ""

    def __post_init__(self) -> None:
        self.next_run = self.started + float(self.spec.get("initialDelaySeconds") or 0)

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds") or 10)

    def due(self, now: float) -> bool:
        return now >= self.next_run

    def record(self, ok: bool, message: str, now: float) -> bool | None:
        """Count one outcome; returns the (possibly changed) result."""
        self.next_run = now + self.period
        self.message = message
        if ok:
            self.successes += 1
            self.failures = 0
            if self.successes >= int(self.spec.get("successThreshold") or 1):
                self.result = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= int(self.spec.get("failureThreshold") or 3):
                self.result = False
        return self.result

    def run(
        self, *, host: str, container: Obj, pid: int | None, env: Mapping[str, str]
    ) -> bool | None:
        ok, message = run_handler(
            self.spec, host=host, container=container, pid=pid, env=env,
            timeout=float(self.spec.get("timeoutSeconds") or 1),
        )
        return self.record(ok, message, time.monotonic())
