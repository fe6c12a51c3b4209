"""The operator's Prometheus metrics and its /healthz + /metrics HTTP endpoint.

One port (the chart's `metrics.port`) serves both: the Deployment's probes hit /healthz, the
metrics Service (and the optional ServiceMonitor) scrapes /metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pqfed.operator.reconcile import TERMINAL

PHASES: Final = ("Pending", "Running", *sorted(TERMINAL))


class OperatorMetrics:
    """Counters and gauges of one operator process, on their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "pqfed_operator_reconciles", "Reconcile passes by handler and outcome",
            ["handler", "outcome"], registry=self.registry)
        self.jobs = Gauge("pqfed_operator_jobs", "FederationJobs seen by this operator, by phase",
                          ["phase"], registry=self.registry)
        self.rounds = Counter("pqfed_operator_rounds_recorded",
                              "Completed FL rounds copied into FederationJob status",
                              registry=self.registry)
        self.checkpoints = Counter("pqfed_operator_checkpoints_saved",
                                   "Aggregator checkpoints stored in ConfigMaps",
                                   registry=self.registry)
        self.recreated = Counter("pqfed_operator_pods_recreated",
                                 "Pods of running jobs recreated after they were lost",
                                 ["role"], registry=self.registry)
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()  # handlers run in kopf's thread pool
        for phase in PHASES:
            self.jobs.labels(phase).set(0)

    def job_phase(self, uid: str, phase: str | None) -> None:
        """Records the phase of one job (None: the job is gone)."""
        with self._lock:
            if phase is None:
                self._phases.pop(uid, None)
            else:
                self._phases[uid] = phase
            for p in PHASES:
                self.jobs.labels(p).set(sum(1 for v in self._phases.values() if v == p))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve_http(port: int, metrics: OperatorMetrics, healthy: Callable[[], bool],
                     host: str = "0.0.0.0") -> Any:  # noqa: S104  (probes come from the node)
    """Starts /healthz and /metrics on the running event loop; returns the aiohttp runner
    (call `await runner.cleanup()` to stop)."""
    from aiohttp import web

    async def healthz(_request: web.Request) -> web.Response:
        ok = healthy()
        return web.json_response({"status": "ok" if ok else "starting"},
                                 status=200 if ok else 503)

    async def scrape(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
