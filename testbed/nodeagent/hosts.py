"""Service name resolution without DNS or kube-proxy: a per-pod /etc/hosts.

The agent watches EndpointSlices (kept by the real controller-manager from
pod IPs and readiness) and maps ``<svc>`` (same namespace only),
``<svc>.<ns>``, ``<svc>.<ns>.svc`` and ``<svc>.<ns>.svc.cluster.local`` to ONE
ready endpoint IP of each Service (chosen per pod, so clients spread over the
backends). Headless-service pod records ``<hostname>.<svc>...`` are written
too. There is no ClusterIP and no port translation: the Service port must
equal its targetPort. ``kubernetes.default...`` maps to the apiserver host.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable

from pqfed.testbed.nodeagent.kube import ApiError, Kube, Obj

log = logging.getLogger(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"
DOMAIN = "cluster.local"


def _names(svc: str, ns: str, same_ns: bool) -> list[str]:
    names = [f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.{DOMAIN}"]
    return [svc, *names] if same_ns else names


class ServiceHosts:
    """Ready endpoints of every Service, from a watch on EndpointSlices."""

    def __init__(self, kube: Kube | None, api_host: str, on_change: Callable[[], None]) -> None:
        self.kube = kube
        self.api_host = api_host
        self.on_change = on_change
        self._slices: dict[tuple[str, str], Obj] = {}
        self._lock = threading.Lock()
        self._services: dict[tuple[str, str], list[str]] = {}
        self._hostnames: dict[tuple[str, str], dict[str, str]] = {}
        self._chosen: dict[tuple[str, str, str], str] = {}  # (pod uid, ns, svc) -> ip
        self.stopped = threading.Event()
        self.error: str | None = None

    # -- model -------------------------------------------------------------------
    def _recompute(self) -> bool:
        services: dict[tuple[str, str], set[str]] = {}
        hostnames: dict[tuple[str, str], dict[str, str]] = {}
        for (ns, _), sl in self._slices.items():
            svc = (sl.get("metadata", {}).get("labels") or {}).get(SERVICE_LABEL)
            if not svc or sl.get("addressType") != "IPv4":
                continue
            ips = services.setdefault((ns, svc), set())
            for ep in sl.get("endpoints") or []:
                cond = ep.get("conditions") or {}
                if cond.get("ready") is False or cond.get("terminating") is True:
                    continue
                addresses = ep.get("addresses") or []
                ips.update(addresses)
                if ep.get("hostname") and addresses:
                    hostnames.setdefault((ns, svc), {})[ep["hostname"]] = addresses[0]
        new = {k: sorted(v) for k, v in services.items() if v}
        changed = new != self._services or hostnames != self._hostnames
        self._services, self._hostnames = new, hostnames
        return changed

    def render(self, pod: Obj, pod_ip: str) -> str:
        """/etc/hosts for ``pod`` (IP ``pod_ip``)."""
        meta, spec = pod["metadata"], pod["spec"]
        ns, uid = meta["namespace"], meta["uid"]
        hostname = str(spec.get("hostname") or meta["name"])[:63]
        lines = [
            "# Kubernetes-managed hosts file (pqfed node-agent: Services -> one ready endpoint).",
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
        ]
        own = [hostname]
        if spec.get("subdomain"):
            own.insert(0, f"{hostname}.{spec['subdomain']}.{ns}.svc.{DOMAIN}")
        lines.append(f"{pod_ip}\t{' '.join(own)}")
        api_names = _names("kubernetes", "default", ns == "default")
        lines.append(f"{self.api_host}\t{' '.join(api_names)}")
        for alias in spec.get("hostAliases") or []:
            lines.append(f"{alias['ip']}\t{' '.join(alias.get('hostnames') or [])}")
        with self._lock:
            services = dict(self._services)
            hostnames = dict(self._hostnames)
        for (svc_ns, svc), ips in sorted(services.items()):
            ip = self._choose(uid, svc_ns, svc, ips)
            lines.append(f"{ip}\t{' '.join(_names(svc, svc_ns, svc_ns == ns))}")
        for (svc_ns, svc), hosts in sorted(hostnames.items()):
            for host, ip in sorted(hosts.items()):
                names = [f"{host}.{n}" for n in _names(svc, svc_ns, svc_ns == ns)]
                lines.append(f"{ip}\t{' '.join(names)}")
        return "\n".join(lines) + "\n"

    def _choose(self, uid: str, ns: str, svc: str, ips: list[str]) -> str:
        """A pod keeps its endpoint while it stays ready; new choices spread by pod uid."""
        key = (uid, ns, svc)
        with self._lock:
            ip = self._chosen.get(key)
            if ip not in ips:
                ip = ips[zlib.crc32(f"{uid}/{ns}/{svc}".encode()) % len(ips)]
                if len(self._chosen) > 20000:
                    self._chosen.clear()
                self._chosen[key] = ip
            return ip

    # -- watch ---------------------------------------------------------------------
    def run(self) -> None:
        """List+watch EndpointSlices until ``stopped`` is set (run it in a thread)."""
        path = "/apis/discovery.k8s.io/v1/endpointslices"
        while not self.stopped.is_set():
            if self.kube is None:
                return
            try:
                listing = self.kube.get(path)
                with self._lock:
                    self._slices = {
                        (s["metadata"]["namespace"], s["metadata"]["name"]): s
                        for s in listing.get("items") or []
                    }
                    changed = self._recompute()
                if changed:
                    self.on_change()
                self.error = None
                rv = listing["metadata"]["resourceVersion"]
                for kind, obj in self.kube.watch(path, rv, timeout_seconds=240):
                    if self.stopped.is_set():
                        return
                    if kind == "BOOKMARK":
                        continue
                    key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
                    with self._lock:
                        if kind == "DELETED":
                            self._slices.pop(key, None)
                        else:
                            self._slices[key] = obj
                        changed = self._recompute()
                    if changed:
                        self.on_change()
            except ApiError as exc:
                if exc.status == 403 and self.error is None:
                    log.warning("cannot watch EndpointSlices (%s): Service names will not "
                                "resolve in pods; pass --proxy-kubeconfig (up.sh writes "
                                "kube-proxy.kubeconfig)", exc)
                elif exc.status != 410:
                    log.warning("EndpointSlice watch: %s", exc)
                self.error = str(exc)
                self.stopped.wait(5 if exc.status == 403 else 1)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("EndpointSlice watch: %s", exc)
                self.error = str(exc)
                self.stopped.wait(1)
