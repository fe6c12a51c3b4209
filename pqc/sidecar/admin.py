"""FastAPI endpoints of the sidecar: the admin API and the kubelet's probe listener.

* Admin API (`SidecarConfig.admin`, loopback only): liveness, readiness with its reasons,
  identity, Prometheus metrics. It has no authentication, so the config refuses any address
  other than loopback: only processes inside the pod reach it.
* Probe listener (`SidecarConfig.probes`, may bind the pod IP): `/healthz` and `/readyz` as
  status codes with a fixed body, for the kubelet's httpGet probes, which connect to the pod
  IP. It returns no data: no identity, no metrics, not even why it is not ready.

Both are plain ASGI applications served by uvicorn (a table of GET routes, nothing else): a
web framework would bring pydantic and its schema machinery into every pod's sidecar for
four fixed endpoints (~10 MiB of PSS per sidecar, docs/BENCHMARKS.md "Memory footprint").
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pqfed.pqc.backends import available_backends, backend_report
from pqfed.pqc.sidecar.config import Endpoint
from pqfed.pqc.sidecar.httpfilter import UPSTREAM_HTTP_IMPLEMENTATION
from pqfed.pqc.sidecar.proxy import Sidecar


def readiness_problems(sidecar: Sidecar) -> list[str]:
    """Why the sidecar cannot carry a channel now; empty when it can."""
    node = sidecar.protocol.identity
    problems = []
    if not sidecar.ready:
        problems.append("listeners not started")
    if time.time() >= node.not_after:
        problems.append("certificate expired")
    # Ready means able to carry a channel: the app behind an inbound sidecar must listen.
    upstream = sidecar.config.upstream
    if upstream is not None:
        try:
            socket.create_connection((upstream.host, upstream.port), timeout=0.5).close()
        except OSError as exc:
            problems.append(f"upstream {upstream} not accepting connections: {exc}")
    return problems


@dataclass(frozen=True)
class Reply:
    """One HTTP response of the admin or probe listener."""

    status: int
    body: bytes
    media_type: str

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Reply:
        return cls(status, json.dumps(data, separators=(",", ":")).encode(), "application/json")

    @classmethod
    def text(cls, text: str, status: int = 200) -> Reply:
        return cls(status, text.encode(), "text/plain; charset=utf-8")


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]


class GetRoutes:
    """An ASGI application answering GET on fixed paths (404 elsewhere, 405 for other
    methods). Handlers run in a worker thread: readiness opens a TCP connection upstream."""

    def __init__(self, routes: Mapping[str, Callable[[], Reply]]) -> None:
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        handler = self.routes.get(scope["path"])
        if handler is None:
            reply = Reply.json({"detail": "Not Found"}, 404)
        elif scope["method"] != "GET":
            reply = Reply.json({"detail": "Method Not Allowed"}, 405)
        else:
            reply = await asyncio.to_thread(handler)
        await send({"type": "http.response.start", "status": reply.status, "headers": [
            (b"content-type", reply.media_type.encode()),
            (b"content-length", str(len(reply.body)).encode())]})
        await send({"type": "http.response.body", "body": reply.body})


def build_admin_app(sidecar: Sidecar) -> GetRoutes:
    def healthz() -> Reply:
        return Reply.json({"status": "ok"})

    def readyz() -> Reply:
        problems = readiness_problems(sidecar)
        return Reply.json({"ready": not problems, "problems": problems},
                          503 if problems else 200)

    def identity() -> Reply:
        node = sidecar.protocol.identity
        return Reply.json({
            "protocol": sidecar.protocol.name.value,
            "federation": node.federation, "nodeId": node.node_id,
            "role": node.role.name.lower(), "signatureAlgorithm": node.signature_algorithm,
            "serial": node.serial, "notBefore": node.not_before, "notAfter": node.not_after,
            "fingerprint": node.fingerprint, "caFingerprint": node.ca_fingerprint,
            "groups": list(node.groups), "suites": list(node.suites),
            "backends": available_backends(), "backend": backend_report(),
            "ports": sidecar.bound,
        })

    def metrics() -> Reply:
        return Reply(200, generate_latest(sidecar.metrics.registry), CONTENT_TYPE_LATEST)

    return GetRoutes({"/healthz": healthz, "/readyz": readyz, "/identity": identity,
                      "/metrics": metrics})


def build_probe_app(sidecar: Sidecar) -> GetRoutes:
    """The probe listener: two status codes, no data."""

    def healthz() -> Reply:
        return Reply.text("ok\n")

    def readyz() -> Reply:
        if readiness_problems(sidecar):
            return Reply.text("not ready\n", 503)
        return Reply.text("ready\n")

    return GetRoutes({"/healthz": healthz, "/readyz": readyz})


def _server(app: GetRoutes, where: Endpoint) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=where.host, port=where.port,
                                         log_level="warning", lifespan="off",
                                         http=UPSTREAM_HTTP_IMPLEMENTATION))


async def serve(sidecar: Sidecar) -> None:
    """Runs the data plane, the admin API and the probe listener in one event loop until
    cancelled or signalled (either HTTP server stopping stops the other)."""
    await sidecar.start()
    servers = [_server(build(sidecar), where) for build, where in (
        (build_admin_app, sidecar.config.admin), (build_probe_app, sidecar.config.probes))
        if where is not None]
    try:
        if not servers:
            await asyncio.Event().wait()
            return
        tasks = [asyncio.ensure_future(s.serve()) for s in servers]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # uvicorn's signal handlers are per process: the last server started holds them.
            for s in servers:
                s.should_exit = True
            results = await asyncio.gather(*tasks, return_exceptions=True)
        # A listener that could not start (its HTTP implementation missing, its port taken)
        # must end the sidecar with an error, never a clean exit the kubelet takes as done.
        for result in results:
            if isinstance(result, BaseException):
                raise result
    finally:
        await sidecar.stop()
