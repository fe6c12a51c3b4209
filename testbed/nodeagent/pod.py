"""One pod on an emulated node: sandbox, containers as processes, probes, status, deletion.

Each pod has a worker thread. Its directory ``<state>/pods/<ns>_<name>_<uid>/``
holds ``sandbox.json`` (network namespace, veth, IP), per container
``<c>.json`` (shim pid + start time, restart count: what a restarted agent
adopts), ``<c>.pgid`` (for down.sh), ``<c>.exit`` (written by the shim),
``<c>.log`` (stdout+stderr of the current run; the run before is
``<c>.previous.log``), ``hosts`` (bind-mounted on /etc/hosts) and
``volumes/``. The directory is recorded in the pod annotation
``pqfed.io/log-dir``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqfed.testbed.nodeagent import network
from pqfed.testbed.nodeagent.cgroups import Limits
from pqfed.testbed.nodeagent.config import parse_quantity
from pqfed.testbed.nodeagent.kube import ApiError, Obj
from pqfed.testbed.nodeagent.podspec import (
    ConfigError,
    RefResolver,
    container_argv,
    container_env,
    pod_path,
)
from pqfed.testbed.nodeagent.probes import Prober, run_handler
from pqfed.testbed.nodeagent.runtime import (
    LOG_DIR_ANNOTATION,
    NET_ANNOTATION,
    AgentContext,
    now_rfc3339,
    pid_alive,
    proc_start_time,
    read_json,
    write_json,
)
from pqfed.testbed.nodeagent.volumes import VolumeManager

log = logging.getLogger(__name__)

TICK_S = 0.5
BACKOFF_RESET_S = 600.0
NO_COMMAND = (
    "the pqfed node agent runs containers as local processes and ignores `image`: "
    "set `command` and/or `args`"
)


def pod_dir_name(pod: Obj) -> str:
    meta = pod["metadata"]
    return f"{meta['namespace']}_{meta['name']}_{meta['uid']}"


def uid_of_dir(name: str) -> str:
    return name.rsplit("_", 1)[-1]


@dataclass
class Sandbox:
    ip: str
    netns: str | None = None
    veth: str | None = None
    shaping: str = "none"

    @property
    def netns_path(self) -> str | None:
        return str(network.NETNS_DIR / self.netns) if self.netns else None


@dataclass
class Container:
    """Runtime record of one (init) container."""

    spec: Obj
    init: bool = False
    sidecar: bool = False
    restart_count: int = 0
    ever_started: bool = False
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None  # the shim: session and process-group leader
    pid_start: int | None = None
    main_pid: int | None = None  # the container's process (pid file written by the shim)
    started_at: str | None = None
    started_mono: float = 0.0
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    next_start: float = 0.0
    failures: int = 0  # consecutive, for the back-off
    done: bool = False  # terminated and not going to be restarted
    probes: dict[str, Prober] = field(default_factory=dict)
    kill_reason: str | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def alive(self) -> bool:
        if self.pid is None:
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        return pid_alive(self.pid, self.pid_start)

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def terminated(self) -> bool:
        return "terminated" in self.state

    @property
    def exit_code(self) -> int | None:
        term = self.state.get("terminated")
        return None if term is None else int(term.get("exitCode", 0))

    @property
    def ready(self) -> bool:
        if not self.running:
            return False
        startup = self.probes.get("startup")
        if startup is not None and startup.result is not True:
            return False
        readiness = self.probes.get("readiness")
        return readiness is None or readiness.result is True


class PodWorker:
    """Drives one pod from Pending to a terminal phase or deletion, in its own thread."""

    def __init__(self, ctx: AgentContext, pod: Obj) -> None:
        meta = pod["metadata"]
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name=f"pod-{meta['namespace']}/{meta['name']}")
        self.ctx = ctx
        self.uid: str = meta["uid"]
        self.pod = pod
        self.dir = ctx.pods_dir / pod_dir_name(pod)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.removed = False  # the pod object is gone from the API
        self.shutdown_grace: float | None = None  # the agent is stopping
        self.sandbox: Sandbox | None = None
        self.sandbox_error: str | None = None
        self.next_sandbox_try = 0.0
        self.volumes = VolumeManager(self.dir, ctx.kube, ctx.tokens, ctx.node_alloc)
        self.volume_error: str | None = None
        self.containers: dict[str, Container] = {}
        for spec in pod["spec"].get("initContainers") or []:
            sidecar = spec.get("restartPolicy") == "Always"
            self.containers[spec["name"]] = Container(spec, init=True, sidecar=sidecar)
        for spec in pod["spec"]["containers"]:
            self.containers[spec["name"]] = Container(spec)
        self.start_time: str | None = None
        self.phase = "Pending"
        self.terminal = False
        self.final_reason: str | None = None
        self.final_message: str | None = None
        self.cond_times: dict[str, tuple[str, str]] = {}
        self.last_status: str | None = None
        self.last_status_error: str | None = None
        self.hosts_lock = threading.Lock()
        api_phase = (pod.get("status") or {}).get("phase")
        if api_phase in ("Succeeded", "Failed"):
            # Already final (possibly reported by an earlier agent run): never run it again.
            self.terminal = True
            self.phase = str(api_phase)

    # -- interface for the agent -------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def update(self, pod: Obj) -> None:
        with self.lock:
            self.pod = pod
        self.wake.set()

    def mark_removed(self) -> None:
        self.removed = True
        self.wake.set()

    def stop_for_shutdown(self, grace: float) -> None:
        self.shutdown_grace = grace
        self.wake.set()

    # -- paths -----------------------------------------------------------------
    @property
    def hosts_file(self) -> Path:
        return self.dir / "hosts"

    def _cfile(self, c: Container, suffix: str) -> Path:
        return self.dir / f"{c.name}{suffix}"

    @property
    def cgroup_rel(self) -> Path:
        return Path(f"pod-{self.uid}")

    def _hostname(self, pod: Obj) -> str:
        return str(pod["spec"].get("hostname") or pod["metadata"]["name"])[:63].rstrip("-.")

    # -- main loop -----------------------------------------------------------------
    def run(self) -> None:
        try:
            self._adopt()
            while True:
                self.wake.clear()
                with self.lock:
                    pod = self.pod
                try:
                    if self._sync(pod):
                        break
                except Exception:
                    log.exception("pod %s: sync failed", self.ref)
                # Finished pods only wait for their deletion (update() wakes us up).
                self.wake.wait(5.0 if self.terminal else TICK_S)
        finally:
            self.ctx.on_worker_done(self.uid)

    def _sync(self, pod: Obj) -> bool:
        """One reconciliation; True when the worker is finished."""
        if self.shutdown_grace is not None:
            self._shutdown(pod, self.shutdown_grace)
            return True
        if self.removed:
            self._terminate_all(pod, min(self._grace(pod), 2.0), "the pod object was deleted")
            self._teardown(remove_dir=True)
            return True
        if pod["metadata"].get("deletionTimestamp"):
            self._delete_pod(pod)
            return True
        if self.terminal:
            return False
        if not self._ensure_sandbox(pod):
            self._push_status(pod)
            return False
        self._ensure_volumes(pod)
        now = time.monotonic()
        for c in self.containers.values():
            self._poll(pod, c)
        if self._run_init_containers(pod, now):
            for c in self.containers.values():
                if not c.init:
                    self._maybe_start(pod, c, now)
        self._probe(pod)
        self._update_phase(pod)
        self._push_status(pod)
        return False

    # -- adoption -----------------------------------------------------------------
    def _adopt(self) -> None:
        """Pick up the sandbox and processes an earlier agent run left for this pod."""
        data = read_json(self.dir / "sandbox.json")
        if not isinstance(data, dict):
            return
        self.sandbox = Sandbox(ip=data["ip"], netns=data.get("netns"), veth=data.get("veth"),
                               shaping=data.get("shaping", "none"))
        if self.ctx.ipam is not None and self.sandbox.netns and not data.get("tornDown"):
            self.ctx.ipam.reserve(self.uid, self.sandbox.ip)
        self.start_time = data.get("startTime")
        for c in self.containers.values():
            rec = read_json(self._cfile(c, ".json"))
            if not isinstance(rec, dict):
                continue
            c.restart_count = int(rec.get("restartCount", 0))
            c.ever_started = True
            c.pid, c.pid_start = rec.get("pid"), rec.get("pidStart")
            c.started_at = rec.get("startedAt")
            c.last_state = rec.get("lastState") or {}
            c.env = rec.get("env") or {}
            c.started_mono = time.monotonic()
            if rec.get("done"):
                c.done = True
                c.state = rec.get("state") or {}
            elif c.pid is not None:
                # A live one is "running"; a dead one is polled into "terminated".
                info = read_json(self._cfile(c, ".pid"))
                if isinstance(info, dict):
                    c.main_pid = int(info["pid"])
                    c.started_at = c.started_at or info.get("startedAt")
                c.state = {"running": {"startedAt": c.started_at or now_rfc3339()}}
                self._init_probes(c)
            if c.pid is not None:
                log.info("pod %s: adopted container %s (pid %d)", self.ref, c.name, c.pid)

    # -- sandbox ------------------------------------------------------------------
    @property
    def ref(self) -> str:
        meta = self.pod["metadata"]
        return f"{meta['namespace']}/{meta['name']}"

    def _ensure_sandbox(self, pod: Obj) -> bool:
        if self.sandbox is not None:
            return True
        if time.monotonic() < self.next_sandbox_try:
            return False
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        host_network = bool(pod["spec"].get("hostNetwork"))
        cfg = self.ctx.config
        try:
            if host_network or self.ctx.ipam is None:
                sandbox = Sandbox(ip=self.ctx.host_ip)
            else:
                ip = self.ctx.ipam.allocate(self.uid)
                netns = f"pqfed-{cfg.name}-{self.uid[:8]}"
                veth = "vpq" + self.uid.replace("-", "")[:11]
                (self.dir / "netns").write_text(netns)
                network.create_pod_network(netns, veth, ip, cfg.bridge_ip, cfg.bridge)
                sandbox = Sandbox(ip=ip, netns=netns, veth=veth)
                if not cfg.shaping.empty:
                    outside = network.apply_shaping(None, veth, cfg.shaping)
                    network.apply_shaping(netns, "eth0", cfg.shaping)
                    sandbox.shaping = outside
            self.ctx.cgroups.ensure(self.cgroup_rel, self._pod_limits(pod))
        except (network.NetworkError, OSError) as exc:
            if self.ctx.ipam is not None:
                self.ctx.ipam.release(self.uid)
            self.sandbox_error = str(exc)
            self.next_sandbox_try = time.monotonic() + 5
            self.ctx.event(pod, "FailedCreatePodSandBox", str(exc), warning=True)
            log.warning("pod %s: sandbox: %s", self.ref, exc)
            return False
        self.sandbox = sandbox
        self.sandbox_error = None
        self.start_time = self.start_time or now_rfc3339()
        write_json(self.dir / "sandbox.json", {
            "ip": sandbox.ip, "netns": sandbox.netns, "veth": sandbox.veth,
            "shaping": sandbox.shaping, "startTime": self.start_time,
        })
        self._write_hosts(pod)
        log.info("pod %s: sandbox ready, ip %s%s", self.ref, sandbox.ip,
                 f", {sandbox.shaping}" if sandbox.shaping != "none" else "")
        return True

    def _pod_limits(self, pod: Obj) -> Limits:
        cpus: list[float | None] = []
        mems: list[int | None] = []
        for spec in pod["spec"]["containers"]:
            limits = (spec.get("resources") or {}).get("limits") or {}
            cpus.append(parse_quantity(limits["cpu"]) if "cpu" in limits else None)
            mems.append(int(parse_quantity(limits["memory"])) if "memory" in limits else None)
        cpu = None if None in cpus or not cpus else sum(x for x in cpus if x is not None)
        mem = None if None in mems or not mems else sum(x for x in mems if x is not None)
        return Limits(cpu_cores=cpu, memory_bytes=mem)

    def write_hosts(self) -> None:
        """Re-render /etc/hosts of the pod (called when Services' endpoints change)."""
        with self.lock:
            pod = self.pod
        if self.sandbox is not None and not self.terminal:
            self._write_hosts(pod)

    def _write_hosts(self, pod: Obj) -> None:
        assert self.sandbox is not None
        content = self.ctx.render_hosts(pod, self.sandbox.ip)
        with self.hosts_lock:
            try:
                if self.hosts_file.exists() and self.hosts_file.read_text() == content:
                    return
                # In place (same inode): the file is bind-mounted in running containers.
                with open(self.hosts_file, "w") as fh:
                    fh.write(content)
            except OSError as exc:
                log.warning("pod %s: hosts file: %s", self.ref, exc)

    def _ensure_volumes(self, pod: Obj) -> None:
        if not self.volumes.due():
            return
        try:
            self.volumes.sync(pod)
            self.volume_error = None
        except (ConfigError, OSError) as exc:
            if self.volume_error != str(exc):
                self.ctx.event(pod, "FailedMount", str(exc), warning=True)
            self.volume_error = str(exc)
            self.volumes.last_sync = time.monotonic() - self.volumes.RESYNC_S + 3  # retry in 3 s

    # -- containers -----------------------------------------------------------------
    def _restart_policy(self, pod: Obj, c: Container) -> str:
        if c.sidecar:
            return "Always"
        policy = str(pod["spec"].get("restartPolicy") or "Always")
        if c.init:
            return "Never" if policy == "Never" else "OnFailure"
        return policy

    def _run_init_containers(self, pod: Obj, now: float) -> bool:
        """Start init containers in order; True once all have completed (sidecars: started)."""
        for c in self.containers.values():
            if not c.init:
                continue
            if c.sidecar:
                self._maybe_start(pod, c, now)
                if not c.running:
                    return False
                continue
            if c.done and c.exit_code == 0:
                continue
            if c.done:  # failed and not restarted: the pod fails
                return False
            self._maybe_start(pod, c, now)
            return False
        return True

    def _maybe_start(self, pod: Obj, c: Container, now: float) -> None:
        if c.done or c.alive or c.pid is not None or now < c.next_start:
            return
        if self.volume_error:
            c.state = {"waiting": {"reason": "ContainerCreating", "message": self.volume_error}}
            return
        self._start(pod, c)

    def _base_env(self, pod: Obj) -> dict[str, str]:
        cfg = self.ctx.config
        host, port = self.ctx.api_host, self.ctx.api_port
        return {
            "PATH": f"{cfg.venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "HOSTNAME": self._hostname(pod),
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": str(port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
            f"KUBERNETES_PORT_{port}_TCP_PORT": str(port),
            f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
        }

    def _pod_with_ips(self, pod: Obj) -> Obj:
        """The pod as the downward API sees it: with our podIP/hostIP even before the patch."""
        assert self.sandbox is not None
        status = dict(pod.get("status") or {})
        status.update(podIP=self.sandbox.ip, podIPs=[{"ip": self.sandbox.ip}],
                      hostIP=self.ctx.host_ip, hostIPs=[{"ip": self.ctx.host_ip}])
        return {**pod, "status": status}

    def _start(self, pod: Obj, c: Container) -> None:
        assert self.sandbox is not None
        full = self._pod_with_ips(pod)
        try:
            refs = RefResolver(self.ctx.kube, pod["metadata"]["namespace"])
            env = container_env(full, c.spec, self._base_env(pod), refs, self.ctx.node_alloc)
            argv = container_argv(c.spec, env)
            mounts = self.volumes.mounts(c.spec, env) if self.ctx.mount_namespaces else []
        except ConfigError as exc:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            c.next_start = time.monotonic() + 5
            self.ctx.event(pod, "Failed", f"Error: {exc}", warning=True, container=c.name)
            return
        if not argv:
            self._record_exit(pod, c, {"exitCode": 128, "reason": "NoCommand",
                                       "message": NO_COMMAND, "startedAt": now_rfc3339(),
                                       "finishedAt": now_rfc3339()})
            self.ctx.event(pod, "Failed", NO_COMMAND, warning=True, container=c.name)
            return
        if self.ctx.mount_namespaces:
            mounts.append({"source": str(self.hosts_file), "target": "/etc/hosts",
                           "readonly": False})
        limits = (c.spec.get("resources") or {}).get("limits") or {}
        cg_rel = self.cgroup_rel / c.name
        cgroups = self.ctx.cgroups.ensure(cg_rel, Limits(
            cpu_cores=parse_quantity(limits["cpu"]) if "cpu" in limits else None,
            memory_bytes=int(parse_quantity(limits["memory"])) if "memory" in limits else None,
        ))
        for suffix in (".exit", ".pid"):
            self._cfile(c, suffix).unlink(missing_ok=True)
        log_file = self._cfile(c, ".log")
        if log_file.exists() and (c.restart_count or c.last_state):
            log_file.replace(self._cfile(c, ".previous.log"))
        spec_file = self._cfile(c, ".spec.json")
        fd = os.open(spec_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({
                "argv": argv,
                "env": env,
                "cwd": c.spec.get("workingDir") or "/",
                "netns": self.sandbox.netns_path,
                "hostname": self._hostname(pod) if self.ctx.mount_namespaces else None,
                "mount_namespace": self.ctx.mount_namespaces,
                "mounts": mounts,
                "runtime": [str(p) for p in self.ctx.config.runtime],
                "cgroups": [str(p) for p in cgroups],
                "exit_file": str(self._cfile(c, ".exit")),
                "pid_file": str(self._cfile(c, ".pid")),
            }, fh)
        with open(log_file, "ab") as out:
            out.write(f"==== {now_rfc3339()} pqfed node-agent: starting {argv!r}\n".encode())
            out.flush()
            try:
                proc = subprocess.Popen(
                    [str(self.ctx.config.python), "-I", "-S", str(self.ctx.shim), str(spec_file)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, cwd="/", env={"PATH": env.get("PATH", "")},
                )
            except OSError as exc:
                self._record_exit(pod, c, {"exitCode": 128, "reason": "StartError",
                                           "message": str(exc), "finishedAt": now_rfc3339()})
                return
        c.proc, c.pid, c.main_pid = proc, proc.pid, None
        if c.ever_started:
            c.restart_count += 1
        c.ever_started = True
        c.pid_start = proc_start_time(proc.pid)
        c.env = env
        c.started_at = None
        c.started_mono = time.monotonic()
        c.kill_reason = None
        c.state = {"waiting": {"reason": "ContainerCreating"}}
        (self._cfile(c, ".pgid")).write_text(str(proc.pid))
        self._save(c)
        log.info("pod %s: started container %s (pid %d): %s", self.ref, c.name, proc.pid, argv)

    def _save(self, c: Container) -> None:
        write_json(self._cfile(c, ".json"), {
            "pid": c.pid, "pidStart": c.pid_start, "startedAt": c.started_at,
            "restartCount": c.restart_count, "lastState": c.last_state, "done": c.done,
            "state": c.state if c.done else None, "env": {},
        })

    def _init_probes(self, c: Container) -> None:
        c.probes = {}
        for kind in ("startup", "readiness", "liveness"):
            spec = c.spec.get(f"{kind}Probe")
            if spec:
                c.probes[kind] = Prober(kind, spec)

    def _poll(self, pod: Obj, c: Container) -> None:
        if c.pid is None:
            return
        if c.main_pid is None:
            info = read_json(self._cfile(c, ".pid"))
            if isinstance(info, dict):
                c.main_pid = int(info["pid"])
                c.started_at = str(info.get("startedAt") or now_rfc3339())
                if not self.terminal:
                    c.state = {"running": {"startedAt": c.started_at}}
                    self._init_probes(c)
                    self._save(c)
                    self.ctx.event(pod, "Started", f"Started container {c.name}",
                                   container=c.name)
        elif c.running and c.started_at is None:
            c.started_at = c.state["running"].get("startedAt")
        if c.alive:
            return
        result = read_json(self._cfile(c, ".exit"))
        if not isinstance(result, dict):
            code = c.proc.returncode if c.proc is not None else None
            result = {"exitCode": 137 if code is None or code < 0 else code,
                      "finishedAt": now_rfc3339()}
            if code is not None and code < 0:
                result["signal"] = -code
        # Nothing of the container outlives its main process.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(c.pid, signal.SIGKILL)
        self.ctx.cgroups.kill(self.cgroup_rel / c.name)
        if self.ctx.cgroups.oom_killed(self.cgroup_rel / c.name):
            result["reason"] = "OOMKilled"
        self._record_exit(pod, c, result)

    def _record_exit(self, pod: Obj, c: Container, result: Obj) -> None:
        code = int(result.get("exitCode", 0))
        term: Obj = {
            "exitCode": code,
            "reason": result.get("reason") or ("Completed" if code == 0 else "Error"),
            "startedAt": c.started_at or result.get("startedAt") or now_rfc3339(),
            "finishedAt": result.get("finishedAt") or now_rfc3339(),
        }
        if result.get("signal"):
            term["signal"] = int(result["signal"])
        message = result.get("message") or c.kill_reason
        if message:
            term["message"] = str(message)[:1000]
        if c.pid:
            term["containerID"] = f"pqfed://{c.pid}"
        ran_for = time.monotonic() - c.started_mono if c.started_mono else 0.0
        c.proc, c.pid, c.pid_start, c.main_pid = None, None, None, None
        c.probes = {}
        self._cfile(c, ".pgid").unlink(missing_ok=True)
        policy = self._restart_policy(pod, c)
        restart = not self.terminal and (
            policy == "Always" or (policy == "OnFailure" and code != 0))
        log.info("pod %s: container %s exited %d (%s)%s", self.ref, c.name, code,
                 term["reason"], ", restarting" if restart else "")
        if not restart:
            c.state = {"terminated": term}
            c.done = True
            self._save(c)
            return
        c.last_state = {"terminated": term}
        c.failures = 1 if ran_for >= BACKOFF_RESET_S else c.failures + 1
        cfg = self.ctx.config
        # Like the kubelet: the first restart is immediate, then 10 s, 20 s, ... up to 5 min.
        delay = 0.0 if c.failures == 1 else min(
            cfg.restart_backoff_s * 2 ** (c.failures - 2), cfg.max_backoff_s)
        c.next_start = time.monotonic() + delay
        if delay == 0:
            c.state = {"waiting": {"reason": "ContainerCreating"}}
            self._save(c)
            return
        c.state = {"waiting": {
            "reason": "CrashLoopBackOff",
            "message": f"back-off {delay:g}s restarting failed container={c.name} "
                       f"pod={pod['metadata']['name']}_{pod['metadata']['namespace']}",
        }}
        self._save(c)
        self.ctx.event(pod, "BackOff", f"Back-off restarting failed container {c.name}",
                       warning=True, container=c.name)

    # -- probes -----------------------------------------------------------------------
    def _probe(self, pod: Obj) -> None:
        assert self.sandbox is not None
        now = time.monotonic()
        for c in self.containers.values():
            if not c.running or c.pid is None:
                continue
            order = ["startup"]
            if "startup" not in c.probes or c.probes["startup"].result is True:
                order += ["readiness", "liveness"]
            if c.probes and not c.env:  # adopted: env is not persisted (secrets)
                with contextlib.suppress(ConfigError, ApiError, OSError):
                    refs = RefResolver(self.ctx.kube, pod["metadata"]["namespace"])
                    c.env = container_env(self._pod_with_ips(pod), c.spec, self._base_env(pod),
                                          refs, self.ctx.node_alloc)
            for kind in order:
                prober = c.probes.get(kind)
                if prober is None or not prober.due(now):
                    continue
                if kind == "startup" and prober.result is True:
                    continue
                before = prober.result
                result = prober.run(host=self.sandbox.ip, container=c.spec,
                                    pid=c.main_pid or c.pid, env=c.env)
                if result is False and before is not False:
                    self.ctx.event(pod, "Unhealthy", f"{kind.capitalize()} probe failed: "
                                   f"{prober.message}", warning=True, container=c.name)
                if result is False and kind in ("liveness", "startup"):
                    c.kill_reason = f"Container {c.name} failed {kind} probe, will be restarted"
                    self.ctx.event(pod, "Killing", c.kill_reason, container=c.name)
                    self._terminate(pod, [c], self._grace(pod))
                    break

    # -- termination ---------------------------------------------------------------------
    def _grace(self, pod: Obj) -> float:
        meta_grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if meta_grace is not None:
            return float(meta_grace)
        spec_grace = pod["spec"].get("terminationGracePeriodSeconds")
        return float(30 if spec_grace is None else spec_grace)

    def _terminate(self, pod: Obj, containers: list[Container], grace: float) -> None:
        """preStop, SIGTERM, wait up to ``grace`` s, SIGKILL; then record the exits."""
        deadline = time.monotonic() + grace
        live = [c for c in containers if c.pid is not None and c.alive]
        for c in live:
            pre_stop = (c.spec.get("lifecycle") or {}).get("preStop")
            if pre_stop and self.sandbox is not None and grace >= 1:
                run_handler(pre_stop, host=self.sandbox.ip, container=c.spec,
                            pid=c.main_pid or c.pid, env=c.env,
                            timeout=max(0.5, deadline - time.monotonic()))
        for c in live:
            if c.pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.pid, signal.SIGTERM)
        while any(c.alive for c in live) and time.monotonic() < deadline:
            time.sleep(0.05)
        for c in live:
            if c.alive and c.pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.pid, signal.SIGKILL)
            self.ctx.cgroups.kill(self.cgroup_rel / c.name)
        kill_deadline = time.monotonic() + 5
        while any(c.alive for c in live) and time.monotonic() < kill_deadline:
            time.sleep(0.05)
        for c in containers:
            if c.pid is not None:
                self._poll(pod, c)

    def _terminate_all(self, pod: Obj, grace: float, why: str) -> None:
        live = [c for c in self.containers.values() if c.pid is not None]
        if live:
            log.info("pod %s: stopping %d container(s), grace %gs: %s", self.ref, len(live),
                     grace, why)
        self.terminal = True  # no restarts from here on
        self._terminate(pod, [c for c in live if not c.sidecar], grace)
        self._terminate(pod, [c for c in live if c.sidecar], min(grace, 2.0))
        for c in self.containers.values():
            if not c.done and c.pid is None and "terminated" in c.last_state:
                c.state, c.last_state, c.done = c.last_state, {}, True  # no restart after back-off

    def _teardown(self, remove_dir: bool = False) -> None:
        """Release the sandbox: network namespace, IP, cgroups (and volumes)."""
        for c in self.containers.values():
            if c.pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.pid, signal.SIGKILL)
        self.ctx.cgroups.kill(self.cgroup_rel)
        self.ctx.cgroups.remove(self.cgroup_rel)
        if self.sandbox is not None and self.sandbox.netns and self.sandbox.veth:
            network.delete_pod_network(self.sandbox.netns, self.sandbox.veth)
        (self.dir / "netns").unlink(missing_ok=True)
        if self.ctx.ipam is not None:
            self.ctx.ipam.release(self.uid)
        self.volumes.remove()  # no secret stays on disk once nothing runs
        sandbox_file = self.dir / "sandbox.json"
        data = read_json(sandbox_file)
        if isinstance(data, dict) and not data.get("tornDown"):
            data["tornDown"] = True
            write_json(sandbox_file, data)
        if remove_dir and self.dir.is_dir():
            # Logs stay (for `pqfed logs` after the fact); runtime files go.
            for entry in self.dir.iterdir():
                if entry.name.endswith(".log"):
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def _delete_pod(self, pod: Obj) -> None:
        """Graceful deletion: stop everything, then remove the object (grace 0) like the kubelet."""
        self._terminate_all(pod, self._grace(pod), "the pod is being deleted")
        self._teardown(remove_dir=True)
        meta = pod["metadata"]
        try:
            self.ctx.kube.delete(pod_path(meta["namespace"], meta["name"]), {
                "gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]},
            })
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("pod %s: final delete: %s", self.ref, exc)
        log.info("pod %s: deleted", self.ref)

    def _shutdown(self, pod: Obj, grace: float) -> None:
        """The node goes away: stop the pod and report it Failed, like graceful node shutdown."""
        if self.ctx.config.keep_pods_on_exit:
            return
        was_terminal = self.terminal
        self._terminate_all(pod, min(self._grace(pod), grace), "the node agent is stopping")
        self._teardown(remove_dir=False)
        if not was_terminal and self.sandbox is not None:
            self.phase = "Failed"
            self.final_reason = "Terminated"
            self.final_message = "Pod was terminated in response to imminent node shutdown."
            self._push_status(pod)

    # -- status ---------------------------------------------------------------------
    def _update_phase(self, pod: Obj) -> None:
        if self.terminal:
            return
        regular = [c for c in self.containers.values() if not c.init]
        inits = [c for c in self.containers.values() if c.init and not c.sidecar]
        failed_init = any(c.done and c.exit_code != 0 for c in inits)
        if failed_init:
            phase = "Failed"
        elif all(c.done for c in regular):
            phase = "Succeeded" if all(c.exit_code == 0 for c in regular) else "Failed"
        elif any(c.running or c.terminated or c.restart_count for c in regular):
            phase = "Running"
        else:
            phase = "Pending"
        self.phase = phase
        if phase in ("Succeeded", "Failed"):
            self.terminal = True
            log.info("pod %s: %s", self.ref, phase)
            sidecars = [c for c in self.containers.values() if c.sidecar and c.pid is not None]
            self._terminate(pod, sidecars, 2.0)
            self._teardown()

    def _condition(self, kind: str, ok: bool, reason: str = "", message: str = "") -> Obj:
        status = "True" if ok else "False"
        prev = self.cond_times.get(kind)
        if prev is None or prev[0] != status:
            self.cond_times[kind] = (status, now_rfc3339())
        cond: Obj = {"type": kind, "status": status,
                     "lastTransitionTime": self.cond_times[kind][1], "lastProbeTime": None}
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        return cond

    def _container_status(self, c: Container) -> Obj:
        state = c.state
        if "waiting" in state and not state["waiting"].get("message"):
            state = {"waiting": {"reason": state["waiting"].get("reason", "ContainerCreating")}}
        status: Obj = {
            "name": c.name,
            "image": c.spec.get("image") or "",
            "imageID": "",
            "ready": c.ready,
            "started": c.running,
            "restartCount": c.restart_count,
            "state": state,
            "lastState": c.last_state,
        }
        if c.pid is not None:
            status["containerID"] = f"pqfed://{c.pid}"
        elif "terminated" in state and state["terminated"].get("containerID"):
            status["containerID"] = state["terminated"]["containerID"]
        return status

    def _status(self, pod: Obj) -> Obj:
        inits = [c for c in self.containers.values() if c.init]
        regular = [c for c in self.containers.values() if not c.init]
        init_done = all((c.done and c.exit_code == 0) or (c.sidecar and c.running)
                        for c in inits)
        unready = [c.name for c in regular if not c.ready]
        gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
        existing = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
        gates_ok = all(existing.get(g, {}).get("status") == "True" for g in gates)
        if self.terminal:
            ready_reason, ready_msg = "PodCompleted", ""
        elif unready:
            ready_reason = "ContainersNotReady"
            ready_msg = f"containers with unready status: [{' '.join(unready)}]"
        else:
            ready_reason, ready_msg = "", ""
        containers_ready = not unready and not self.terminal
        ours = [
            self._condition("PodReadyToStartContainers", self.sandbox is not None and not
                            (self.terminal and self.phase != "Running")),
            self._condition("Initialized", init_done or self.terminal,
                            "" if init_done else "ContainersNotInitialized"),
            self._condition("ContainersReady", containers_ready, ready_reason, ready_msg),
            self._condition("Ready", containers_ready and gates_ok,
                            ready_reason or ("" if gates_ok else "ReadinessGatesNotReady"),
                            ready_msg),
        ]
        managed = {c["type"] for c in ours}
        conditions = [c for t, c in existing.items() if t not in managed] + ours
        status: Obj = {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": self.ctx.host_ip,
            "hostIPs": [{"ip": self.ctx.host_ip}],
            "startTime": self.start_time or now_rfc3339(),
            "containerStatuses": [self._container_status(c) for c in regular],
            "reason": self.final_reason,
            "message": self.final_message or self.sandbox_error,
        }
        if inits:
            status["initContainerStatuses"] = [self._container_status(c) for c in inits]
        if self.sandbox is not None:
            status["podIP"] = self.sandbox.ip
            status["podIPs"] = [{"ip": self.sandbox.ip}]
        return status

    def _push_status(self, pod: Obj) -> None:
        status = self._status(pod)
        body: Obj = {"status": status}
        annotations = pod["metadata"].get("annotations") or {}
        wanted = {LOG_DIR_ANNOTATION: str(self.dir)}
        if self.sandbox is not None and self.sandbox.shaping != "none":
            wanted[NET_ANNOTATION] = self.sandbox.shaping
        if any(annotations.get(k) != v for k, v in wanted.items()):
            body["metadata"] = {"annotations": wanted}
        text = json.dumps(body, sort_keys=True)
        if text == self.last_status:
            return
        meta = pod["metadata"]
        try:
            updated = self.ctx.kube.patch(pod_path(meta["namespace"], meta["name"], "status"),
                                          body)
        except (ApiError, OSError) as exc:
            if isinstance(exc, ApiError) and exc.status == 404:
                self.mark_removed()
            elif str(exc) != self.last_status_error:
                log.warning("pod %s: status update: %s", self.ref, exc)
            self.last_status_error = str(exc)
            return
        self.last_status_error = None
        self.last_status = text
        with self.lock:
            if self.pod["metadata"].get("resourceVersion") == meta.get("resourceVersion"):
                self.pod = updated


def sweep_pod_dir(directory: Path, cgroups_kill: Any = None) -> None:
    """Clean up after a pod this node no longer has: processes, network, secrets (logs stay)."""
    for pgid_file in directory.glob("*.pgid"):
        rec = read_json(pgid_file.with_suffix(".json"))
        text = pgid_file.read_text().strip()
        pid = int(text) if text.isdigit() else 0
        start = rec.get("pidStart") if isinstance(rec, dict) else None
        if pid and pid_alive(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    if cgroups_kill is not None:
        cgroups_kill(Path(f"pod-{uid_of_dir(directory.name)}"))
    sandbox = read_json(directory / "sandbox.json")
    if isinstance(sandbox, dict) and sandbox.get("netns") and sandbox.get("veth"):
        network.delete_pod_network(str(sandbox["netns"]), str(sandbox["veth"]))
    for entry in directory.iterdir():
        if not entry.name.endswith(".log"):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
