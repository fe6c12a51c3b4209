"""The node agent's pod decisions, as pure functions: a snapshot of one pod in, a `Decision` out.

Everything that affects a pod's phase, conditions, container statuses and which container to
start, kill or restart lives here; no process, file, clock, network or API call does (the
worker in pod.py observes, calls `decide`/`decide_exit` and applies the actions). The rules
follow the kubelet's (pkg/kubelet/kubelet_pods.go `getPhase`, pkg/kubelet/status/generate.go,
the kuberuntime back-off), in this emulation's terms:

- restartPolicy: a regular init container restarts on failure unless the pod's policy is
  Never; a native sidecar (init container with `restartPolicy: Always`) always restarts;
  regular containers follow the pod's Always / OnFailure / Never.
- Start order: init containers one after another, each sidecar started before the next init
  container; regular containers once every regular init container has succeeded.
- CrashLoopBackOff: the first restart is immediate, then 10 s doubling up to 300 s (the
  agent's `--restart-backoff`/max); a run of 10 minutes resets the count.
- Readiness: a running container is ready once its startup and readiness probes (if any)
  succeeded; the pod is ready when every regular container and every native sidecar is
  and its readiness gates' conditions are True. A failing liveness or startup probe kills
  the container (then its restart policy applies).
- Phase: Pending until the pod initialised and every container has run; Running while one
  runs or restarts; Succeeded / Failed once every regular container is terminated for good;
  Failed at once when an init container fails under `restartPolicy: Never`; native
  sidecars do not keep a finished pod Running (the kubelet stops them). A terminal phase
  is final.

It is past our ~500-line habit because about half of it is the typed snapshot, states and
actions; the rules fit in one file, as h11 keeps its whole state machine in one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

Obj = dict[str, Any]
Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
RestartPolicy = Literal["Always", "OnFailure", "Never"]
Role = Literal["init", "sidecar", "regular"]
ProbeKind = Literal["startup", "readiness", "liveness"]

TERMINAL_PHASES: Final = frozenset({"Succeeded", "Failed"})
DEFAULT_GRACE_S: Final = 30.0
# The kubelet's condition reasons (pkg/kubelet/status/generate.go).
POD_COMPLETED: Final = "PodCompleted"
POD_FAILED: Final = "PodFailed"
CONTAINERS_NOT_READY: Final = "ContainersNotReady"
CONTAINERS_NOT_INITIALIZED: Final = "ContainersNotInitialized"
READINESS_GATES_NOT_READY: Final = "ReadinessGatesNotReady"
# The conditions the node writes (a pod on the node is scheduled, as the kubelet reports);
# any other (readiness gates' conditions from controllers) is passed through unchanged.
OWNED: Final = ("PodScheduled", "PodReadyToStartContainers", "Initialized", "ContainersReady",
                "Ready")


# -- container states (the API's ContainerState, typed) ---------------------------------------
@dataclass(frozen=True)
class Waiting:
    reason: str = "ContainerCreating"
    message: str = ""

    def to_api(self) -> Obj:
        body: Obj = {"reason": self.reason}
        if self.message:
            body["message"] = self.message
        return {"waiting": body}


@dataclass(frozen=True)
class Running:
    started_at: str

    def to_api(self) -> Obj:
        return {"running": {"startedAt": self.started_at}}


@dataclass(frozen=True)
class Terminated:
    exit_code: int
    reason: str
    started_at: str
    finished_at: str
    message: str = ""
    signal: int | None = None
    container_id: str = ""

    def to_api(self) -> Obj:
        body: Obj = {"exitCode": self.exit_code, "reason": self.reason,
                     "startedAt": self.started_at, "finishedAt": self.finished_at}
        if self.signal:
            body["signal"] = self.signal
        if self.message:
            body["message"] = self.message
        if self.container_id:
            body["containerID"] = self.container_id
        return {"terminated": body}


ContainerState = Waiting | Running | Terminated


def state_from_api(obj: Mapping[str, Any] | None) -> ContainerState | None:
    """The typed state of an API-shaped ``{"waiting"|"running"|"terminated": {...}}``."""
    if not obj:
        return None
    if "running" in obj:
        return Running(str(obj["running"].get("startedAt") or ""))
    if "terminated" in obj:
        t = obj["terminated"]
        code = int(t.get("exitCode", 0))
        return Terminated(
            exit_code=code, reason=str(t.get("reason") or ("Completed" if code == 0 else "Error")),
            started_at=str(t.get("startedAt") or ""), finished_at=str(t.get("finishedAt") or ""),
            message=str(t.get("message") or ""),
            signal=int(t["signal"]) if t.get("signal") else None,
            container_id=str(t.get("containerID") or ""))
    if "waiting" in obj:
        w = obj["waiting"]
        return Waiting(str(w.get("reason") or "ContainerCreating"), str(w.get("message") or ""))
    return None


# -- inputs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backoff:
    """CrashLoopBackOff: no wait before the first restart, then `initial_s` doubling to
    `max_s`; a run of at least `reset_after_s` starts the count again."""

    initial_s: float = 10.0
    max_s: float = 300.0
    reset_after_s: float = 600.0

    def failures_after_exit(self, failures: int, ran_for_s: float) -> int:
        """Consecutive failures counting this exit."""
        return 1 if ran_for_s >= self.reset_after_s else failures + 1

    def delay_s(self, failures: int) -> float:
        if failures <= 1:
            return 0.0
        return float(min(self.initial_s * 2 ** (failures - 2), self.max_s))


@dataclass(frozen=True)
class ContainerSnapshot:
    """One (init) container as the worker sees it now."""

    name: str
    role: Role = "regular"
    image: str = ""
    state: ContainerState = Waiting()
    last_state: Terminated | None = None
    restart_count: int = 0
    has_process: bool = False  # the current run's process exists (it may not report yet)
    container_id: str = ""  # of the current run's process
    not_before: float = 0.0  # monotonic seconds: back-off, or a retry after a config error
    # Probe results: True (succeeded, or no such probe), False (failed), None (undecided).
    startup: bool | None = True
    readiness: bool | None = True
    liveness: bool | None = True

    @property
    def done(self) -> bool:
        """Terminated and not going to be restarted."""
        return isinstance(self.state, Terminated)

    @property
    def running(self) -> bool:
        return isinstance(self.state, Running)

    @property
    def started(self) -> bool:
        """Running and past its startup probe (the API's `started`)."""
        return self.running and self.startup is True

    @property
    def ready(self) -> bool:
        if self.role == "init":
            return isinstance(self.state, Terminated) and self.state.exit_code == 0
        return self.started and self.readiness is True

    @property
    def has_run(self) -> bool:
        """Has started at least once (running now, or terminated now or before)."""
        return self.running or self.done or self.last_state is not None


@dataclass(frozen=True)
class PodSnapshot:
    """One pod: spec essentials, its containers (init containers first, in spec order), the
    worker's flags and the clocks. `now` is monotonic; `wall` (RFC 3339) stamps transitions."""

    containers: tuple[ContainerSnapshot, ...]
    restart_policy: RestartPolicy = "Always"
    ref: str = ""  # "<name>_<namespace>", for messages
    grace_s: float = DEFAULT_GRACE_S
    readiness_gates: tuple[str, ...] = ()
    conditions: tuple[Mapping[str, Any], ...] = ()  # the pod's status.conditions now
    sandbox_ready: bool = True
    volume_error: str = ""
    terminal: bool = False  # stopped or finished: no start, no restart, the phase is final
    phase: Phase = "Pending"  # the phase decided before (kept once terminal)
    deletion_requested: bool = False  # metadata.deletionTimestamp is set
    removed: bool = False  # the API object is gone
    shutdown_grace_s: float | None = None  # the node agent is stopping
    now: float = 0.0
    wall: str = ""


# -- outputs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StartContainer:
    name: str


@dataclass(frozen=True)
class KillContainer:
    """A liveness or startup probe failed: stop the container (its restart policy applies)."""

    name: str
    reason: str


@dataclass(frozen=True)
class RestartContainer:
    """The container exited and restarts after `delay_s` (its state shows the back-off)."""

    name: str
    exit: Terminated
    delay_s: float
    failures: int
    state: Waiting


@dataclass(frozen=True)
class MarkTerminated:
    """The container exited for good."""

    name: str
    exit: Terminated


@dataclass(frozen=True)
class FinishPod:
    """The pod reached a terminal phase: stop its sidecars and release the sandbox."""

    phase: Phase


@dataclass(frozen=True)
class StopPod:
    """Stop every container (sidecars last) within `grace_s`, then: `delete` the API object
    (graceful deletion), `forget` the pod (its object is gone), or `shutdown` (the node goes
    away: report the pod Failed unless it already finished)."""

    mode: Literal["delete", "forget", "shutdown"]
    grace_s: float
    why: str


Action = StartContainer | KillContainer | RestartContainer | MarkTerminated | FinishPod | StopPod


@dataclass(frozen=True)
class Decision:
    phase: Phase
    conditions: list[Obj]
    init_container_statuses: list[Obj]
    container_statuses: list[Obj]
    actions: list[Action] = field(default_factory=list)

    @property
    def stop(self) -> StopPod | None:
        return next((a for a in self.actions if isinstance(a, StopPod)), None)


# -- spec helpers -------------------------------------------------------------------------
def restart_policy(pod_policy: str | None) -> RestartPolicy:
    if pod_policy == "OnFailure":
        return "OnFailure"
    if pod_policy == "Never":
        return "Never"
    return "Always"


def container_policy(role: Role, pod_policy: RestartPolicy) -> RestartPolicy:
    """The restart policy one container follows."""
    if role == "sidecar":
        return "Always"
    if role == "init":
        return "Never" if pod_policy == "Never" else "OnFailure"
    return pod_policy


def grace_period(pod: Mapping[str, Any]) -> float:
    """The deletion's grace period, else the spec's terminationGracePeriodSeconds, else 30 s."""
    meta_grace = pod["metadata"].get("deletionGracePeriodSeconds")
    if meta_grace is not None:
        return float(meta_grace)
    spec_grace = pod["spec"].get("terminationGracePeriodSeconds")
    return DEFAULT_GRACE_S if spec_grace is None else float(spec_grace)


def probe_order(has_startup_probe: bool, startup: bool | None) -> tuple[ProbeKind, ...]:
    """Which probes run: readiness and liveness only once the startup probe succeeded."""
    if has_startup_probe and startup is not True:
        return ("startup",)
    return ("readiness", "liveness")


# -- decisions ----------------------------------------------------------------------------
def decide_exit(c: ContainerSnapshot, exit_: Terminated, *, pod_policy: RestartPolicy,
                terminal: bool, failures: int, ran_for_s: float, backoff: Backoff,
                ref: str = "") -> RestartContainer | MarkTerminated:
    """What happens to a container whose process just exited with `exit_`."""
    policy = container_policy(c.role, pod_policy)
    restart = not terminal and (
        policy == "Always" or (policy == "OnFailure" and exit_.exit_code != 0))
    if not restart:
        return MarkTerminated(c.name, exit_)
    failures = backoff.failures_after_exit(failures, ran_for_s)
    delay = backoff.delay_s(failures)
    if delay == 0:
        state = Waiting("ContainerCreating")
    else:
        state = Waiting("CrashLoopBackOff",
                        f"back-off {delay:g}s restarting failed container={c.name} pod={ref}")
    return RestartContainer(c.name, exit_, delay, failures, state)


def _startable(c: ContainerSnapshot, now: float) -> bool:
    return not c.done and not c.has_process and now >= c.not_before


def _starts(pod: PodSnapshot) -> tuple[list[str], list[str]]:
    """(containers to start now, containers that would start but wait for their volumes)."""
    due: list[str] = []
    for c in pod.containers:
        if c.role == "sidecar":
            if _startable(c, pod.now):
                due.append(c.name)
            if not c.started:
                break
        elif c.role == "init":
            if c.done and c.ready:
                continue
            if not c.done and _startable(c, pod.now):
                due.append(c.name)
            break
        elif _startable(c, pod.now):
            due.append(c.name)
    if pod.volume_error:
        return [], due
    return due, []


def _probe_kills(pod: PodSnapshot) -> list[KillContainer]:
    kills: list[KillContainer] = []
    for c in pod.containers:
        if not (c.running and c.has_process):
            continue
        kind = "startup" if c.startup is False else "liveness" if c.liveness is False else None
        if kind is not None:
            reason = f"Container {c.name} failed {kind} probe, will be restarted"
            kills.append(KillContainer(c.name, reason))
    return kills


def phase_of(pod: PodSnapshot) -> Phase:
    """The kubelet's getPhase over this pod's containers."""
    if pod.terminal:
        return pod.phase
    pending_init = failed_init = 0
    running = waiting = stopped = succeeded = 0
    # Once every regular container finished for good the kubelet stops the sidecars, and
    # stopped sidecars do not count: the pod's phase is its regular containers'.
    regular = [c for c in pod.containers if c.role == "regular"]
    finished = bool(regular) and all(c.done for c in regular)
    for c in pod.containers:
        if c.role == "sidecar" and finished:
            continue
        if c.role == "init":
            if isinstance(c.state, Terminated):
                failed_init += c.state.exit_code != 0
            elif isinstance(c.state, Waiting) and c.last_state is not None:
                failed_init += c.last_state.exit_code != 0
            else:
                pending_init += 1
        elif c.role == "sidecar":
            # A sidecar that exited (and restarts) does not count for the phase.
            if c.running:
                pending_init += not c.started
                running += 1
            elif isinstance(c.state, Waiting) and c.last_state is None:
                pending_init += 1
                waiting += 1
        elif c.running:
            running += 1
        elif isinstance(c.state, Terminated):
            stopped += 1
            succeeded += c.state.exit_code == 0
        elif c.last_state is not None:
            stopped += 1  # waiting to restart
        else:
            waiting += 1
    if failed_init and pod.restart_policy == "Never":
        return "Failed"
    regular_started = any(c.has_run for c in pod.containers if c.role == "regular")
    if (pending_init and not regular_started) or waiting:
        return "Pending"
    if running:
        return "Running"
    if stopped:
        if pod.restart_policy == "Always":
            return "Running"
        if stopped == succeeded:
            return "Succeeded"
        return "Failed" if pod.restart_policy == "Never" else "Running"
    return "Pending"


@dataclass(frozen=True)
class _Cond:
    type: str
    ok: bool
    reason: str = ""
    message: str = ""


def _names(names: Sequence[str]) -> str:
    return "[" + " ".join(names) + "]"


def _initialized(pod: PodSnapshot, phase: Phase) -> _Cond:
    if phase == "Succeeded":
        return _Cond("Initialized", True, POD_COMPLETED)
    if any(c.has_run for c in pod.containers if c.role == "regular"):
        return _Cond("Initialized", True)
    incomplete = [c.name for c in pod.containers
                  if (c.role == "init" and not c.ready) or (c.role == "sidecar" and not c.started)]
    if incomplete:
        return _Cond("Initialized", False, CONTAINERS_NOT_INITIALIZED,
                     f"containers with incomplete status: {_names(incomplete)}")
    return _Cond("Initialized", True)


def _containers_ready(pod: PodSnapshot, phase: Phase) -> _Cond:
    if phase == "Succeeded":
        return _Cond("ContainersReady", False, POD_COMPLETED)
    if phase == "Failed":
        return _Cond("ContainersReady", False, POD_FAILED)
    unready = [c.name for c in pod.containers if c.role != "init" and not c.ready]
    if unready:
        return _Cond("ContainersReady", False, CONTAINERS_NOT_READY,
                     f"containers with unready status: {_names(unready)}")
    return _Cond("ContainersReady", True)


def _ready(pod: PodSnapshot, containers_ready: _Cond) -> _Cond:
    if not containers_ready.ok:
        return _Cond("Ready", False, containers_ready.reason, containers_ready.message)
    existing = {str(c.get("type")): c for c in pod.conditions}
    unready: list[str] = []
    for gate in pod.readiness_gates:
        cond = existing.get(gate)
        if cond is None:
            unready.append(f'corresponding condition of pod readiness gate "{gate}" does not '
                           "exist.")
        elif cond.get("status") != "True":
            unready.append(f'the status of pod readiness gate "{gate}" is not "True", but '
                           f"{cond.get('status')}")
    if unready:
        return _Cond("Ready", False, READINESS_GATES_NOT_READY, ", ".join(unready))
    return _Cond("Ready", True)


def conditions_of(pod: PodSnapshot, phase: Phase) -> list[Obj]:
    """status.conditions: the foreign ones unchanged, then the node's; a condition keeps its
    lastTransitionTime while its status stays the same."""
    containers_ready = _containers_ready(pod, phase)
    ours = [
        _Cond("PodScheduled", True),
        _Cond("PodReadyToStartContainers", pod.sandbox_ready and phase not in TERMINAL_PHASES),
        _initialized(pod, phase),
        containers_ready,
        _ready(pod, containers_ready),
    ]
    previous = {str(c.get("type")): c for c in pod.conditions}
    out = [dict(c) for c in pod.conditions if c.get("type") not in OWNED]
    for cond in ours:
        status = "True" if cond.ok else "False"
        before = previous.get(cond.type)
        since = (str(before["lastTransitionTime"])
                 if before is not None and before.get("status") == status
                 and before.get("lastTransitionTime") else pod.wall)
        body: Obj = {"type": cond.type, "status": status, "lastTransitionTime": since,
                     "lastProbeTime": None}
        if cond.reason:
            body["reason"] = cond.reason
        if cond.message:
            body["message"] = cond.message
        out.append(body)
    return out


def container_status(c: ContainerSnapshot, shown: ContainerState | None = None) -> Obj:
    """One entry of status.(init)containerStatuses; `shown` overrides the state displayed."""
    state = shown or c.state
    status: Obj = {
        "name": c.name,
        "image": c.image,
        "imageID": "",
        "ready": c.ready,
        "started": c.started,
        "restartCount": c.restart_count,
        "state": state.to_api(),
        "lastState": c.last_state.to_api() if c.last_state is not None else {},
    }
    if c.container_id:
        status["containerID"] = c.container_id
    elif isinstance(state, Terminated) and state.container_id:
        status["containerID"] = state.container_id
    return status


def decide(pod: PodSnapshot) -> Decision:
    """The pod's phase, conditions, container statuses and what to do next."""
    actions: list[Action] = []
    blocked: list[str] = []
    phase = phase_of(pod)
    if pod.removed:
        actions.append(StopPod("forget", min(pod.grace_s, 2.0), "the pod object was deleted"))
    elif pod.shutdown_grace_s is not None:
        actions.append(StopPod("shutdown", min(pod.grace_s, pod.shutdown_grace_s),
                               "the node agent is stopping"))
    elif pod.deletion_requested:
        actions.append(StopPod("delete", pod.grace_s, "the pod is being deleted"))
    elif pod.terminal or not pod.sandbox_ready:
        pass
    elif phase in TERMINAL_PHASES:
        actions.append(FinishPod(phase))
    else:
        actions.extend(_probe_kills(pod))
        due, blocked = _starts(pod)
        actions.extend(StartContainer(name) for name in due)
    volume_wait = Waiting("ContainerCreating", pod.volume_error)
    statuses = {c.name: container_status(c, volume_wait if c.name in blocked else None)
                for c in pod.containers}
    return Decision(
        phase=phase,
        conditions=conditions_of(pod, phase),
        init_container_statuses=[statuses[c.name] for c in pod.containers if c.role != "regular"],
        container_statuses=[statuses[c.name] for c in pod.containers if c.role == "regular"],
        actions=actions,
    )
