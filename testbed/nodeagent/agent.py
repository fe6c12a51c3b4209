"""The node agent: registers an emulated Raspberry Pi Node and runs its pods as processes."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import platform
import signal
import threading
import time
import uuid
from pathlib import Path

from pqfed.testbed.nodeagent import network
from pqfed.testbed.nodeagent.cgroups import Cgroups, Limits
from pqfed.testbed.nodeagent.config import AgentConfig, default_node_index
from pqfed.testbed.nodeagent.hosts import ServiceHosts
from pqfed.testbed.nodeagent.kube import ApiError, Kube, KubeConfig, Obj
from pqfed.testbed.nodeagent.pod import PodWorker, sweep_pod_dir, uid_of_dir
from pqfed.testbed.nodeagent.runtime import AgentContext, now_micro, now_rfc3339
from pqfed.testbed.nodeagent.volumes import TokenCache

log = logging.getLogger(__name__)

AGENT_VERSION = "v1.37.2-pqfed"
LEASE_NS = "kube-node-lease"


def agent_pid(state_dir: Path) -> int | None:
    """pid of the live node agent that owns ``state_dir``, if any."""
    try:
        pid = int((state_dir / "agent.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"node-agent" in cmdline else None


class NodeAgent:
    def __init__(self, config: AgentConfig) -> None:
        config.validate()
        self.config = config
        self.stop = threading.Event()
        self.workers: dict[str, PodWorker] = {}
        self.workers_lock = threading.Lock()
        self.node_uid: str | None = None
        self.ready = True
        self.boot_id = str(uuid.uuid4())
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        secrets = config.state_dir / "kube"
        self.kube = Kube(KubeConfig.load(config.kubeconfig, secrets),
                         user_agent=f"pqfed-node-agent/{config.name}")
        proxy_kc = config.proxy_kubeconfig
        self.proxy_kube = (Kube(KubeConfig.load(proxy_kc, secrets),
                                user_agent=f"pqfed-node-agent/{config.name}")
                           if proxy_kc is not None else self.kube)
        self.cgroups = Cgroups(config.name)
        self.ipam: network.Ipam | None = None
        self.api_host = config.apiserver_pod_host or self.kube.config.host
        self.host_ip = config.bridge_ip if config.netns else (
            self.api_host if self.api_host not in ("127.0.0.1", "localhost") else config.bridge_ip)
        self.hosts = ServiceHosts(self.proxy_kube, self.api_host, self._hosts_changed)
        cpu, mem = config.cpu, config.memory
        self.capacity = {"cpu": cpu, "memory": mem, "pods": str(config.pods),
                         "ephemeral-storage": config.ephemeral_storage}
        self.ctx: AgentContext | None = None
        self._transitions: dict[str, tuple[bool, str]] = {}
        self._signalled = False

    # -- lifecycle -------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.config
        other = agent_pid(cfg.state_dir)
        if other is not None and other != os.getpid():
            log.error("another node agent (pid %d) already uses %s", other, cfg.state_dir)
            return 1
        (cfg.state_dir / "agent.pid").write_text(f"{os.getpid()}\n")
        try:
            return self._run()
        finally:
            with contextlib.suppress(OSError):
                if agent_pid(cfg.state_dir) == os.getpid():
                    (cfg.state_dir / "agent.pid").unlink()

    def _run(self) -> int:
        cfg = self.config
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: stacks to the log
        mount_ns = os.geteuid() == 0
        if not mount_ns:
            log.warning("not root: no mount namespaces, volumes are not mounted at mountPath")
        if cfg.netns:
            network.ensure_bridge(cfg.bridge, cfg.bridge_ip)
        index = self._register()
        if cfg.netns:
            self.ipam = network.Ipam(cfg.subnet_prefix, index)
        self.cgroups.ensure(None, Limits(cpu_cores=cfg.cpu_limit_cores))
        self.ctx = AgentContext(
            config=cfg, kube=self.kube, cgroups=self.cgroups, ipam=self.ipam,
            tokens=TokenCache(self.kube), node_alloc=dict(self.capacity),
            api_host=self.api_host, api_port=self.kube.config.port, host_ip=self.host_ip,
            render_hosts=self.hosts.render, on_worker_done=self._worker_done,
            mount_namespaces=mount_ns,
        )
        (cfg.state_dir / "pods").mkdir(exist_ok=True)
        threads = [
            threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True),
            threading.Thread(target=self._watch_pods, name="pod-watch", daemon=True),
            threading.Thread(target=self.hosts.run, name="endpoints-watch", daemon=True),
        ]
        for t in threads:
            t.start()
        log.info("node %s ready (pod IPs %s.%d.0/24, api for pods %s:%d, cpu limit %s, net %s)",
                 cfg.name, cfg.subnet_prefix, index, self.api_host, self.kube.config.port,
                 cfg.cpu_limit_cores or "none", cfg.shaping.describe())
        # Not stop.wait(): a handler calling Event.set() while this thread holds the
        # Event's lock would deadlock. The handler only sets a flag.
        while not self._signalled:
            time.sleep(0.2)
        self.stop.set()
        log.info("stopping: node %s goes NotReady", cfg.name)
        self._shutdown()
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signalled = True

    def _shutdown(self) -> None:
        self.hosts.stopped.set()
        self.ready = False
        self._post_status()
        with self.workers_lock:
            workers = list(self.workers.values())
        if not self.config.keep_pods_on_exit:
            for w in workers:
                w.stop_for_shutdown(self.config.shutdown_grace_s)
            deadline = time.monotonic() + self.config.shutdown_grace_s + 10
            for w in workers:
                w.join(max(0.1, deadline - time.monotonic()))
            self.cgroups.remove()
        self._post_status()

    # -- node registration --------------------------------------------------------------
    def _pick_index(self) -> int:
        """The node's third pod-IP octet: kept from its Node's podCIDR, else derived, unique."""
        cfg = self.config
        prefix = cfg.subnet_prefix
        taken: dict[int, str] = {}
        try:
            # Nodes may read only their own Node object: list with the kube-proxy identity.
            nodes = self.proxy_kube.get("/api/v1/nodes").get("items") or []
        except ApiError as exc:
            log.warning("cannot list nodes (%s): not checking pod CIDR conflicts", exc)
            nodes = []
        for node in nodes:
            cidr = str((node.get("spec") or {}).get("podCIDR") or "")
            parts = cidr.split(".")
            if cidr.startswith(prefix + ".") and len(parts) == 4:
                taken[int(parts[2])] = node["metadata"]["name"]
        mine = [i for i, n in taken.items() if n == cfg.name]
        if mine:
            return mine[0]
        want = cfg.node_index or default_node_index(cfg.name)
        for step in range(254):
            index = (want - 1 + step) % 254 + 1
            if index not in taken:
                if index != want:
                    log.warning("pod CIDR %s.%d.0/24 is taken by node %s; using %s.%d.0/24",
                                prefix, want, taken.get(want), prefix, index)
                return index
        raise RuntimeError(f"no free /24 left in {cfg.pod_subnet}")

    def _node_status(self) -> Obj:
        cfg = self.config
        ts = now_rfc3339()
        ready = self.ready

        def cond(kind: str, ok: bool, reason: str, message: str) -> Obj:
            return {"type": kind, "status": "True" if ok else "False", "reason": reason,
                    "message": message, "lastHeartbeatTime": ts,
                    "lastTransitionTime": self._transition(kind, ok, ts)}

        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [
                cond("MemoryPressure", False, "KubeletHasSufficientMemory",
                     "kubelet has sufficient memory available"),
                cond("DiskPressure", False, "KubeletHasNoDiskPressure",
                     "kubelet has no disk pressure"),
                cond("PIDPressure", False, "KubeletHasSufficientPID",
                     "kubelet has sufficient PID available"),
                cond("Ready", ready, "KubeletReady" if ready else "KubeletNotReady",
                     "pqfed node agent is posting ready status" if ready
                     else "pqfed node agent stopped"),
            ],
            "addresses": [{"type": "InternalIP", "address": self.host_ip},
                          {"type": "Hostname", "address": cfg.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, cfg.name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, cfg.name)),
                "bootID": self.boot_id,
                "kernelVersion": platform.release(),
                "osImage": "Debian GNU/Linux 12 (bookworm) (pqfed emulated Raspberry Pi OS)",
                "containerRuntimeVersion": "pqfed-process://0.1.0",
                "kubeletVersion": AGENT_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "arm64",
            },
        }

    def _transition(self, kind: str, ok: bool, ts: str) -> str:
        prev = self._transitions.get(kind)
        if prev is None or prev[0] != ok:
            self._transitions[kind] = (ok, ts)
        return self._transitions[kind][1]

    def _register(self) -> int:
        cfg = self.config
        deadline = time.monotonic() + 60
        while True:
            try:
                index = self._pick_index()
                cidr = f"{cfg.subnet_prefix}.{index}.0/24"
                body: Obj = {
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": cfg.name, "labels": cfg.node_labels(),
                                 "annotations": {"pqfed.io/state-dir": str(cfg.state_dir)}},
                    "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
                    "status": self._node_status(),
                }
                try:
                    node = self.kube.create("/api/v1/nodes", body)
                    log.info("registered node %s", cfg.name)
                except ApiError as exc:
                    if exc.status != 409:
                        raise
                    patch: Obj = {"metadata": {"labels": cfg.node_labels(),
                                               "annotations": body["metadata"]["annotations"]}}
                    current = self.kube.get(f"/api/v1/nodes/{cfg.name}")
                    if not (current.get("spec") or {}).get("podCIDR"):
                        patch["spec"] = body["spec"]
                    node = self.kube.patch(f"/api/v1/nodes/{cfg.name}", patch)
                    log.info("node %s already registered; updated", cfg.name)
                self.node_uid = node["metadata"]["uid"]
                self._post_status()
                self._renew_lease()
                return index
            except (ApiError, OSError) as exc:
                if time.monotonic() > deadline or self._signalled:
                    raise
                log.warning("registering node %s: %s; retrying", cfg.name, exc)
                time.sleep(2)

    def _post_status(self) -> None:
        try:
            self.kube.patch(f"/api/v1/nodes/{self.config.name}/status",
                            {"status": self._node_status()}, strategic=True)
        except (ApiError, OSError) as exc:
            log.warning("node status: %s", exc)

    def _renew_lease(self) -> None:
        cfg = self.config
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NS}/leases/{cfg.name}"
        spec = {"holderIdentity": cfg.name, "leaseDurationSeconds": cfg.lease_duration_s,
                "renewTime": now_micro()}
        try:
            self.kube.patch(path, {"spec": spec})
        except ApiError as exc:
            if exc.status != 404:
                raise
            meta: Obj = {"name": cfg.name, "namespace": LEASE_NS}
            if self.node_uid:
                meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node",
                                            "name": cfg.name, "uid": self.node_uid}]
            self.kube.create(f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NS}/leases",
                             {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                              "metadata": meta, "spec": spec})

    def _heartbeat(self) -> None:
        while not self.stop.wait(self.config.heartbeat_s):
            try:
                self._renew_lease()
            except (ApiError, OSError) as exc:
                log.warning("lease renewal: %s", exc)
            if not self.stop.is_set():
                self._post_status()

    # -- pods -------------------------------------------------------------------------
    def _worker_done(self, uid: str) -> None:
        with self.workers_lock:
            self.workers.pop(uid, None)

    def _hosts_changed(self) -> None:
        with self.workers_lock:
            workers = list(self.workers.values())
        for w in workers:
            w.write_hosts()

    def _handle(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if self.stop.is_set():
            return
        with self.workers_lock:
            worker = self.workers.get(uid)
            if worker is None:
                assert self.ctx is not None
                worker = PodWorker(self.ctx, pod)
                self.workers[uid] = worker
                worker.start()
                return
        worker.update(pod)

    def _cleanup_orphans(self, live_uids: set[str]) -> None:
        """Processes and namespaces of pods this node ran before but no longer has."""
        pods_dir = self.config.state_dir / "pods"
        for directory in sorted(pods_dir.iterdir()) if pods_dir.is_dir() else []:
            uid = uid_of_dir(directory.name)
            if uid in live_uids or not directory.is_dir():
                continue
            if not any(p.suffix in (".json", ".pgid") or p.name == "netns"
                       for p in directory.iterdir()):
                continue
            log.info("cleaning up pod %s (no longer on this node)", directory.name)
            sweep_pod_dir(directory, self.cgroups.kill)
            self.cgroups.remove(Path(f"pod-{uid}"))

    def _watch_pods(self) -> None:
        path = "/api/v1/pods"
        selector = f"spec.nodeName={self.config.name}"
        first = True
        while not self.stop.is_set():
            try:
                listing = self.kube.get(path, fieldSelector=selector)
                items = listing.get("items") or []
                live = {p["metadata"]["uid"] for p in items}
                if first:
                    self._cleanup_orphans(live)
                    first = False
                for pod in items:
                    self._handle(pod)
                with self.workers_lock:
                    gone = [w for uid, w in self.workers.items() if uid not in live]
                for w in gone:
                    w.mark_removed()
                rv = listing["metadata"]["resourceVersion"]
                for kind, obj in self.kube.watch(path, rv, timeout_seconds=240,
                                                 fieldSelector=selector):
                    if self.stop.is_set():
                        return
                    if kind == "BOOKMARK":
                        continue
                    if kind == "DELETED":
                        with self.workers_lock:
                            worker = self.workers.get(obj["metadata"]["uid"])
                        if worker is not None:
                            worker.mark_removed()
                    else:
                        self._handle(obj)
            except (ApiError, OSError, ValueError, KeyError) as exc:
                if not isinstance(exc, ApiError) or exc.status != 410:
                    log.warning("pod watch: %s", exc)
                self.stop.wait(1)


def stop_agent(state_dir: Path, kubeconfig: Path | None, name: str, timeout: float = 90) -> int:
    """``--stop``: SIGTERM the agent of ``state_dir`` and wait; else mark the Node NotReady."""
    pid = agent_pid(state_dir)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while agent_pid(state_dir) == pid and time.monotonic() < deadline:
            time.sleep(0.2)
        if agent_pid(state_dir) == pid:
            log.error("node agent %d did not stop within %gs", pid, timeout)
            return 1
        log.info("node agent %s (pid %d) stopped", name, pid)
        return 0
    if kubeconfig is None:
        log.info("no node agent runs for %s", state_dir)
        return 0
    kube = Kube(KubeConfig.load(kubeconfig, state_dir / "kube"))
    ts = now_rfc3339()
    try:
        kube.patch(f"/api/v1/nodes/{name}/status", {"status": {"conditions": [{
            "type": "Ready", "status": "False", "reason": "KubeletNotReady",
            "message": "pqfed node agent stopped", "lastHeartbeatTime": ts,
            "lastTransitionTime": ts}]}}, strategic=True)
    except ApiError as exc:
        if exc.status != 404:
            raise
    log.info("no node agent was running; node %s marked NotReady", name)
    return 0
