"""One pod on an emulated node: sandbox, containers as processes, probes, status, deletion.

Each pod has a worker thread. Its directory ``<state>/pods/<ns>_<name>_<uid>/``
holds ``sandbox.json`` (network namespace, veth, IP), per container
``<c>.json`` (shim pid + start time, restart count: what a restarted agent
adopts), ``<c>.pgid`` (for down.sh), ``<c>.exit`` (written by the shim),
``<c>.log`` (stdout+stderr of the current run; the run before is
``<c>.previous.log``), ``hosts`` (bind-mounted on /etc/hosts) and
``volumes/``. The directory is recorded in the pod annotation
``pqfed.io/log-dir``.

What to do (start, kill, restart after a back-off, finish, stop) and what to report (phase,
conditions, container statuses) is decided in podstatus.py from a snapshot; this module only
observes and applies. It stays one module past ~500 lines because it is the I/O of one
pod's lifecycle around one mutable record (sandbox, processes, probes' I/O, termination,
status patches) that the worker thread owns.
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

from pqfed.services import LOG_DIR_ANNOTATION, NET_ANNOTATION
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
from pqfed.testbed.nodeagent.podstatus import (
    OWNED,
    Action,
    Backoff,
    ContainerSnapshot,
    ContainerState,
    Decision,
    FinishPod,
    KillContainer,
    MarkTerminated,
    Phase,
    PodSnapshot,
    RestartContainer,
    Role,
    Running,
    StartContainer,
    StopPod,
    Terminated,
    Waiting,
    decide,
    decide_exit,
    grace_period,
    probe_order,
    restart_policy,
    state_from_api,
)
from pqfed.testbed.nodeagent.probes import Prober, run_handler
from pqfed.testbed.nodeagent.runtime import (
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
    """Runtime record of one (init) container: its process and what the decisions need."""

    spec: Obj
    role: Role = "regular"
    restart_count: int = 0
    ever_started: bool = False
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None  # the shim: session and process-group leader
    pid_start: int | None = None
    main_pid: int | None = None  # the container's process (pid file written by the shim)
    started_at: str | None = None
    started_mono: float = 0.0
    state: ContainerState = field(default_factory=Waiting)
    last_state: Terminated | None = None
    env: dict[str, str] = field(default_factory=dict)
    next_start: float = 0.0
    failures: int = 0  # consecutive, for the back-off
    probes: dict[str, Prober] = field(default_factory=dict)
    kill_reason: str | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def sidecar(self) -> bool:
        return self.role == "sidecar"

    @property
    def done(self) -> bool:
        """Terminated and not going to be restarted."""
        return isinstance(self.state, Terminated)

    @property
    def alive(self) -> bool:
        if self.pid is None:
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        return pid_alive(self.pid, self.pid_start)

    @property
    def running(self) -> bool:
        return isinstance(self.state, Running)

    def probe_result(self, kind: str) -> bool | None:
        """True also when the container has no such probe."""
        prober = self.probes.get(kind)
        return True if prober is None else prober.result

    def snapshot(self) -> ContainerSnapshot:
        return ContainerSnapshot(
            name=self.name, role=self.role, image=str(self.spec.get("image") or ""),
            state=self.state, last_state=self.last_state, restart_count=self.restart_count,
            has_process=self.pid is not None,
            container_id=f"pqfed://{self.pid}" if self.pid is not None else "",
            not_before=self.next_start, startup=self.probe_result("startup"),
            readiness=self.probe_result("readiness"), liveness=self.probe_result("liveness"))


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
            role: Role = "sidecar" if spec.get("restartPolicy") == "Always" else "init"
            self.containers[spec["name"]] = Container(spec, role=role)
        for spec in pod["spec"]["containers"]:
            self.containers[spec["name"]] = Container(spec)
        self.backoff = Backoff(initial_s=ctx.config.restart_backoff_s,
                               max_s=ctx.config.max_backoff_s)
        self.start_time: str | None = None
        self.phase: Phase = "Pending"
        self.terminal = False
        self.final_reason: str | None = None
        self.final_message: str | None = None
        # The node's conditions as last reported: their transition times survive a stale
        # copy of the pod (the API's copy serves after an agent restart).
        self.reported_conditions: dict[str, Obj] = {}
        self.last_status: str | None = None
        self.last_status_error: str | None = None
        self.hosts_lock = threading.Lock()
        api_phase = (pod.get("status") or {}).get("phase")
        if api_phase in ("Succeeded", "Failed"):
            # Already final (possibly reported by an earlier agent run): never run it again.
            self.terminal = True
            self.phase = "Succeeded" if api_phase == "Succeeded" else "Failed"

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

    def _snapshot(self, pod: Obj) -> PodSnapshot:
        meta, spec = pod["metadata"], pod["spec"]
        return PodSnapshot(
            containers=tuple(c.snapshot() for c in self.containers.values()),
            restart_policy=restart_policy(spec.get("restartPolicy")),
            ref=f"{meta['name']}_{meta['namespace']}",
            grace_s=grace_period(pod),
            readiness_gates=tuple(str(g["conditionType"])
                                  for g in spec.get("readinessGates") or []),
            conditions=self._conditions(pod),
            sandbox_ready=self.sandbox is not None,
            volume_error=self.volume_error or "",
            terminal=self.terminal,
            phase=self.phase,
            deletion_requested=bool(meta.get("deletionTimestamp")),
            removed=self.removed,
            shutdown_grace_s=self.shutdown_grace,
            now=time.monotonic(),
            wall=now_rfc3339(),
        )

    def _conditions(self, pod: Obj) -> tuple[Obj, ...]:
        api = {str(c.get("type")): c for c in (pod.get("status") or {}).get("conditions") or []}
        return tuple({**api, **self.reported_conditions}.values())

    def _sync(self, pod: Obj) -> bool:
        """One reconciliation; True when the worker is finished."""
        stop = decide(self._snapshot(pod)).stop
        if stop is not None:
            self._stop(pod, stop)
            return True
        if self.terminal:
            return False
        if self._ensure_sandbox(pod):
            self._ensure_volumes(pod)
            for c in self.containers.values():
                self._poll(pod, c)
            self._probe(pod)
        decision = decide(self._snapshot(pod))
        if decision.actions:
            for action in decision.actions:
                self._apply(pod, action)
            # Report the state the actions left (what they lead to next is decided next tick).
            decision = decide(self._snapshot(pod))
        self.phase = decision.phase
        self._push_status(pod, decision)
        return False

    def _apply(self, pod: Obj, action: Action) -> None:
        if isinstance(action, StartContainer):
            self._start(pod, self.containers[action.name])
        elif isinstance(action, KillContainer):
            c = self.containers[action.name]
            c.kill_reason = action.reason
            self.ctx.event(pod, "Killing", action.reason, container=c.name)
            self._terminate(pod, [c], grace_period(pod))
        elif isinstance(action, FinishPod):
            self.phase = action.phase
            self.terminal = True
            log.info("pod %s: %s", self.ref, action.phase)
            sidecars = [c for c in self.containers.values() if c.sidecar and c.pid is not None]
            self._terminate(pod, sidecars, 2.0)
            self._teardown()

    def _stop(self, pod: Obj, stop: StopPod) -> None:
        if stop.mode == "forget":
            self._terminate_all(pod, stop.grace_s, stop.why)
            self._teardown(remove_dir=True)
        elif stop.mode == "delete":
            self._delete_pod(pod, stop)
        else:
            self._shutdown(pod, stop)

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
            last = state_from_api(rec.get("lastState"))
            c.last_state = last if isinstance(last, Terminated) else None
            c.env = rec.get("env") or {}
            c.started_mono = time.monotonic()
            final = state_from_api(rec.get("state")) if rec.get("done") else None
            if isinstance(final, Terminated):
                c.state = final
            elif c.pid is not None:
                # A live one is "running"; a dead one is polled into "terminated".
                info = read_json(self._cfile(c, ".pid"))
                if isinstance(info, dict):
                    c.main_pid = int(info["pid"])
                    c.started_at = c.started_at or info.get("startedAt")
                c.state = Running(c.started_at or now_rfc3339())
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
            c.state = Waiting("CreateContainerConfigError", str(exc))
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
        if log_file.exists() and (c.restart_count or c.last_state is not None):
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
        c.state = Waiting("ContainerCreating")
        (self._cfile(c, ".pgid")).write_text(str(proc.pid))
        self._save(c)
        log.info("pod %s: started container %s (pid %d): %s", self.ref, c.name, proc.pid, argv)

    def _save(self, c: Container) -> None:
        write_json(self._cfile(c, ".json"), {
            "pid": c.pid, "pidStart": c.pid_start, "startedAt": c.started_at,
            "restartCount": c.restart_count,
            "lastState": c.last_state.to_api() if c.last_state is not None else {},
            "done": c.done, "state": c.state.to_api() if c.done else None, "env": {},
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
                    c.state = Running(c.started_at)
                    self._init_probes(c)
                    self._save(c)
                    self.ctx.event(pod, "Started", f"Started container {c.name}",
                                   container=c.name)
        elif isinstance(c.state, Running) and c.started_at is None:
            c.started_at = c.state.started_at
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
        message = result.get("message") or c.kill_reason
        exit_ = Terminated(
            exit_code=code,
            reason=str(result.get("reason") or ("Completed" if code == 0 else "Error")),
            started_at=c.started_at or result.get("startedAt") or now_rfc3339(),
            finished_at=result.get("finishedAt") or now_rfc3339(),
            message=str(message)[:1000] if message else "",
            signal=int(result["signal"]) if result.get("signal") else None,
            container_id=f"pqfed://{c.pid}" if c.pid else "",
        )
        ran_for = time.monotonic() - c.started_mono if c.started_mono else 0.0
        snapshot = c.snapshot()
        c.proc, c.pid, c.pid_start, c.main_pid = None, None, None, None
        c.probes = {}
        self._cfile(c, ".pgid").unlink(missing_ok=True)
        meta = pod["metadata"]
        decision = decide_exit(
            snapshot, exit_, pod_policy=restart_policy(pod["spec"].get("restartPolicy")),
            terminal=self.terminal, failures=c.failures, ran_for_s=ran_for,
            backoff=self.backoff, ref=f"{meta['name']}_{meta['namespace']}")
        log.info("pod %s: container %s exited %d (%s)%s", self.ref, c.name, code, exit_.reason,
                 ", restarting" if isinstance(decision, RestartContainer) else "")
        self._apply_exit(pod, c, decision)

    def _apply_exit(self, pod: Obj, c: Container,
                    decision: RestartContainer | MarkTerminated) -> None:
        if isinstance(decision, MarkTerminated):
            c.state = decision.exit
            self._save(c)
            return
        c.last_state = decision.exit
        c.failures = decision.failures
        c.next_start = time.monotonic() + decision.delay_s
        c.state = decision.state
        self._save(c)
        if decision.delay_s > 0:
            self.ctx.event(pod, "BackOff", f"Back-off restarting failed container {c.name}",
                           warning=True, container=c.name)

    # -- probes -----------------------------------------------------------------------
    def _probe(self, pod: Obj) -> None:
        """Run the probes that are due; a failing liveness or startup probe's kill is decided
        with the rest (podstatus.decide)."""
        assert self.sandbox is not None
        now = time.monotonic()
        for c in self.containers.values():
            if not c.running or c.pid is None:
                continue
            if c.probes and not c.env:  # adopted: env is not persisted (secrets)
                with contextlib.suppress(ConfigError, ApiError, OSError):
                    refs = RefResolver(self.ctx.kube, pod["metadata"]["namespace"])
                    c.env = container_env(self._pod_with_ips(pod), c.spec, self._base_env(pod),
                                          refs, self.ctx.node_alloc)
            for kind in probe_order("startup" in c.probes, c.probe_result("startup")):
                prober = c.probes.get(kind)
                if prober is None or not prober.due(now):
                    continue
                before = prober.result
                result = prober.run(host=self.sandbox.ip, container=c.spec,
                                    pid=c.main_pid or c.pid, env=c.env)
                if result is False and before is not False:
                    self.ctx.event(pod, "Unhealthy", f"{kind.capitalize()} probe failed: "
                                   f"{prober.message}", warning=True, container=c.name)

    # -- termination ---------------------------------------------------------------------
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
            if not c.done and c.pid is None and c.last_state is not None:
                c.state, c.last_state = c.last_state, None  # no restart after back-off

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

    def _delete_pod(self, pod: Obj, stop: StopPod) -> None:
        """Graceful deletion: stop everything, then remove the object (grace 0) like the kubelet."""
        self._terminate_all(pod, stop.grace_s, stop.why)
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

    def _shutdown(self, pod: Obj, stop: StopPod) -> None:
        """The node goes away: stop the pod and report it Failed, like graceful node shutdown."""
        if self.ctx.config.keep_pods_on_exit:
            return
        was_terminal = self.terminal
        self._terminate_all(pod, stop.grace_s, stop.why)
        self._teardown(remove_dir=False)
        if not was_terminal and self.sandbox is not None:
            self.phase = "Failed"
            self.final_reason = "Terminated"
            self.final_message = "Pod was terminated in response to imminent node shutdown."
            self._push_status(pod, decide(self._snapshot(pod)))

    # -- status ---------------------------------------------------------------------
    def _status(self, decision: Decision) -> Obj:
        status: Obj = {
            "phase": decision.phase,
            "conditions": decision.conditions,
            "hostIP": self.ctx.host_ip,
            "hostIPs": [{"ip": self.ctx.host_ip}],
            "startTime": self.start_time or now_rfc3339(),
            "containerStatuses": decision.container_statuses,
            "reason": self.final_reason,
            "message": self.final_message or self.sandbox_error,
        }
        if decision.init_container_statuses:
            status["initContainerStatuses"] = decision.init_container_statuses
        if self.sandbox is not None:
            status["podIP"] = self.sandbox.ip
            status["podIPs"] = [{"ip": self.sandbox.ip}]
        return status

    def _push_status(self, pod: Obj, decision: Decision) -> None:
        status = self._status(decision)
        self.reported_conditions = {c["type"]: c for c in decision.conditions
                                    if c["type"] in OWNED}
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
