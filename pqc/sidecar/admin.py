"""FastAPI admin endpoints of the sidecar: liveness, readiness, identity, Prometheus metrics."""

from __future__ import annotations

import socket
import time
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pqfed.pqc.backends import available_backends, backend_report
from pqfed.pqc.sidecar.proxy import Sidecar


def build_admin_app(sidecar: Sidecar) -> FastAPI:
    app = FastAPI(title="pqfed sidecar", version="1", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(response: Response) -> dict[str, Any]:
        cert = sidecar.identity.certificate
        problems = []
        if not sidecar.ready:
            problems.append("listeners not started")
        if time.time() >= cert.not_after:
            problems.append("certificate expired")
        # Ready means able to carry a channel: the app behind an inbound sidecar must listen.
        upstream = sidecar.config.upstream
        if upstream is not None:
            try:
                socket.create_connection((upstream.host, upstream.port), timeout=0.5).close()
            except OSError as exc:
                problems.append(f"upstream {upstream} not accepting connections: {exc}")
        if problems:
            response.status_code = 503
        return {"ready": not problems, "problems": problems}

    @app.get("/identity")
    def identity() -> dict[str, Any]:
        cert = sidecar.identity.certificate
        return {
            "federation": cert.federation, "nodeId": cert.node_id,
            "role": cert.role.name.lower(), "signatureAlgorithm": cert.sig_algorithm,
            "serial": cert.serial, "notBefore": cert.not_before, "notAfter": cert.not_after,
            "fingerprint": cert.fingerprint, "caFingerprint": sidecar.trust.root.fingerprint,
            "groups": [g.name for g in sidecar.config.groups],
            "suites": [s.name for s in sidecar.config.suites],
            "backends": available_backends(), "backend": backend_report(),
            "ports": sidecar.bound,
        }

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(sidecar.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return app


async def serve(sidecar: Sidecar) -> None:
    """Runs data plane and admin API in one event loop until cancelled."""
    import asyncio

    import uvicorn

    await sidecar.start()
    admin = sidecar.config.admin
    if admin is None:
        await asyncio.Event().wait()
        return
    server = uvicorn.Server(uvicorn.Config(build_admin_app(sidecar), host=admin.host,
                                           port=admin.port, log_level="warning",
                                           lifespan="off"))
    try:
        await server.serve()
    finally:
        await sidecar.stop()
