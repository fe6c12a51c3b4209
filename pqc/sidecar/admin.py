"""FastAPI endpoints of the sidecar: the admin API and the kubelet's probe listener.

* Admin API (`SidecarConfig.admin`, loopback only): liveness, readiness with its reasons,
  identity, Prometheus metrics. It has no authentication, so the config refuses any address
  other than loopback: only processes inside the pod reach it.
* Probe listener (`SidecarConfig.probes`, may bind the pod IP): `/healthz` and `/readyz` as
  status codes with a fixed body, for the kubelet's httpGet probes, which connect to the pod
  IP. It returns no data: no identity, no metrics, not even why it is not ready.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from fastapi import FastAPI, Response
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


def build_admin_app(sidecar: Sidecar) -> FastAPI:
    app = FastAPI(title="pqfed sidecar", version="1", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(response: Response) -> dict[str, Any]:
        problems = readiness_problems(sidecar)
        if problems:
            response.status_code = 503
        return {"ready": not problems, "problems": problems}

    @app.get("/identity")
    def identity() -> dict[str, Any]:
        node = sidecar.protocol.identity
        return {
            "protocol": sidecar.protocol.name.value,
            "federation": node.federation, "nodeId": node.node_id,
            "role": node.role.name.lower(), "signatureAlgorithm": node.signature_algorithm,
            "serial": node.serial, "notBefore": node.not_before, "notAfter": node.not_after,
            "fingerprint": node.fingerprint, "caFingerprint": node.ca_fingerprint,
            "groups": list(node.groups), "suites": list(node.suites),
            "backends": available_backends(), "backend": backend_report(),
            "ports": sidecar.bound,
        }

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(sidecar.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return app


def build_probe_app(sidecar: Sidecar) -> FastAPI:
    """The probe listener: two status codes, no data (no OpenAPI document either)."""
    app = FastAPI(title="pqfed sidecar probes", docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", media_type="text/plain")

    @app.get("/readyz")
    def readyz() -> Response:
        if readiness_problems(sidecar):
            return Response("not ready\n", status_code=503, media_type="text/plain")
        return Response("ready\n", media_type="text/plain")

    return app


def _server(app: FastAPI, where: Endpoint) -> Any:
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
