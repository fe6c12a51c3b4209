"""The node agent's pod decisions (testbed/nodeagent/podstatus.py), table-driven, without root.

Cases the cluster tests exercise end to end (tests/testbed/test_nodeagent.py, the e2e job
test) are here too: OnFailure restarts with back-off, `exit 0` under OnFailure -> Succeeded, a
container without a command under Never -> Failed, the aggregator pod (a native sidecar and
`fl` under OnFailure) -> Succeeded once `fl` exits 0, deletion.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pqfed.testbed.nodeagent.podstatus import (
    Backoff,
    ContainerSnapshot,
    ContainerState,
    FinishPod,
    KillContainer,
    MarkTerminated,
    PodSnapshot,
    RestartContainer,
    RestartPolicy,
    Running,
    StartContainer,
    StopPod,
    Terminated,
    Waiting,
    container_policy,
    decide,
    decide_exit,
    grace_period,
    phase_of,
    probe_order,
    restart_policy,
    state_from_api,
)

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-01T00:01:00Z"
NOW = 1000.0


def ok(code: int = 0) -> Terminated:
    return Terminated(code, "Completed" if code == 0 else "Error", T0, T0)


RUN = Running(T0)
WAIT = Waiting()


def ctr(name: str = "main", role: Any = "regular", state: ContainerState = WAIT,
        last: Terminated | None = None, proc: bool | None = None, **kw: Any) -> ContainerSnapshot:
    """A container; a running one has a process unless told otherwise."""
    has_process = isinstance(state, Running) if proc is None else proc
    return ContainerSnapshot(name=name, role=role, state=state, last_state=last,
                             has_process=has_process, **kw)


def pod(*containers: ContainerSnapshot, policy: RestartPolicy = "Always",
        **kw: Any) -> PodSnapshot:
    return PodSnapshot(containers=tuple(containers), restart_policy=policy, ref="p_ns",
                       now=NOW, wall=T1, **kw)


def cond(decision: Any, type_: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in decision.conditions if c["type"] == type_)
    return found


# -- phase ---------------------------------------------------------------------------------
SIDECAR_UP = ctr("sidecar", "sidecar", RUN)
PHASES = [
    # (case, pod, phase)
    ("nothing started yet", pod(ctr()), "Pending"),
    ("started, not reported yet", pod(ctr(proc=True)), "Pending"),
    ("running", pod(ctr(state=RUN)), "Running"),
    ("Never, exited 0", pod(ctr(state=ok()), policy="Never"), "Succeeded"),
    ("Never, exited 1", pod(ctr(state=ok(1)), policy="Never"), "Failed"),
    ("OnFailure, exited 0", pod(ctr(state=ok()), policy="OnFailure"), "Succeeded"),
    ("OnFailure, restarting after exit 3",
     pod(ctr(state=Waiting("CrashLoopBackOff"), last=ok(3)), policy="OnFailure"), "Running"),
    ("Always, restarting after exit 0",
     pod(ctr(state=WAIT, last=ok()), policy="Always"), "Running"),
    ("one running, one never started", pod(ctr("a", state=RUN), ctr("b")), "Pending"),
    ("one done, one running", pod(ctr("a", state=ok()), ctr("b", state=RUN), policy="Never"),
     "Running"),
    ("Never, one succeeded, one failed",
     pod(ctr("a", state=ok()), ctr("b", state=ok(2)), policy="Never"), "Failed"),
    ("OnFailure, one succeeded, one restarting",
     pod(ctr("a", state=ok()), ctr("b", last=ok(2)), policy="OnFailure"), "Running"),
    ("init running", pod(ctr("init", "init", RUN), ctr()), "Pending"),
    ("init failed under Never", pod(ctr("init", "init", ok(1)), ctr(), policy="Never"), "Failed"),
    ("init restarting under OnFailure",
     pod(ctr("init", "init", WAIT, last=ok(1)), ctr(), policy="OnFailure"), "Pending"),
    ("sidecar not started", pod(ctr("sidecar", "sidecar"), ctr()), "Pending"),
    ("sidecar running, main starting", pod(SIDECAR_UP, ctr(proc=True)), "Pending"),
    ("sidecar and main running", pod(SIDECAR_UP, ctr(state=RUN)), "Running"),
    # The aggregator pod: `fl` exits 0 while its native sidecar still serves.
    ("aggregator: fl done, sidecar running",
     pod(SIDECAR_UP, ctr("fl", state=ok()), policy="OnFailure"), "Succeeded"),
    ("sidecar restarting after main started",
     pod(ctr("sidecar", "sidecar", WAIT, last=ok(1)), ctr(state=RUN)), "Running"),
    ("terminal: the phase is final",
     pod(ctr(state=RUN), terminal=True, phase="Succeeded"), "Succeeded"),
]


@pytest.mark.parametrize(("case", "snapshot", "phase"), PHASES, ids=[c[0] for c in PHASES])
def test_phase(case: str, snapshot: PodSnapshot, phase: str) -> None:
    assert phase_of(snapshot) == phase
    assert decide(snapshot).phase == phase


def test_a_terminal_phase_finishes_the_pod_once() -> None:
    done = pod(SIDECAR_UP, ctr("fl", state=ok()), policy="OnFailure")
    assert decide(done).actions == [FinishPod("Succeeded")]
    assert decide(replace(done, terminal=True, phase="Succeeded")).actions == []
    failed = pod(ctr("init", "init", ok(1)), ctr(), policy="Never")
    assert decide(failed).actions == [FinishPod("Failed")]


# -- what starts -------------------------------------------------------------------------
STARTS = [
    # (case, pod, containers started)
    ("a fresh pod", pod(ctr("a"), ctr("b")), ["a", "b"]),
    ("init containers one at a time",
     pod(ctr("i1", "init"), ctr("i2", "init"), ctr()), ["i1"]),
    ("the next init after one succeeded",
     pod(ctr("i1", "init", ok()), ctr("i2", "init"), ctr()), ["i2"]),
    ("no regular container while an init one runs",
     pod(ctr("i1", "init", RUN), ctr()), []),
    ("regular containers after every init succeeded",
     pod(ctr("i1", "init", ok()), ctr("i2", "init", ok()), ctr()), ["main"]),
    ("a sidecar first", pod(ctr("sidecar", "sidecar"), ctr("i", "init"), ctr()), ["sidecar"]),
    ("the next init once the sidecar runs",
     pod(SIDECAR_UP, ctr("i", "init"), ctr()), ["i"]),
    ("not past a sidecar whose startup probe is undecided",
     pod(ctr("sidecar", "sidecar", RUN, startup=None), ctr()), []),
    ("nothing after a failed init under Never",
     pod(ctr("i", "init", ok(1)), ctr(), policy="Never"), []),
    ("an init container again after its back-off",
     pod(ctr("i", "init", WAIT, last=ok(1), not_before=NOW - 1), ctr(), policy="OnFailure"),
     ["i"]),
    ("not during the back-off",
     pod(ctr(state=Waiting("CrashLoopBackOff"), last=ok(1), not_before=NOW + 10)), []),
    ("not while a process exists", pod(ctr(proc=True)), []),
    ("a terminated container stays terminated", pod(ctr(state=ok()), ctr("b", state=RUN)), []),
    ("a restarted sidecar next to running containers",
     pod(ctr("sidecar", "sidecar", WAIT, last=ok(1)), ctr(state=RUN)), ["sidecar"]),
]


@pytest.mark.parametrize(("case", "snapshot", "started"), STARTS, ids=[c[0] for c in STARTS])
def test_starts(case: str, snapshot: PodSnapshot, started: list[str]) -> None:
    starts = [a for a in decide(snapshot).actions if isinstance(a, StartContainer)]
    assert starts == [StartContainer(name) for name in started]


def test_no_start_without_sandbox_or_volumes() -> None:
    assert decide(pod(ctr(), sandbox_ready=False)).actions == []
    blocked = decide(pod(ctr(), volume_error='secret "identity" not found'))
    assert blocked.actions == []
    state = blocked.container_statuses[0]["state"]
    assert state == {"waiting": {"reason": "ContainerCreating",
                                 "message": 'secret "identity" not found'}}


# -- exits, restarts, back-off -----------------------------------------------------------
EXITS = [
    # (case, role, pod policy, exit code, restarts)
    ("Always restarts a success", "regular", "Always", 0, True),
    ("Always restarts a failure", "regular", "Always", 1, True),
    ("OnFailure keeps a success", "regular", "OnFailure", 0, False),
    ("OnFailure restarts a failure", "regular", "OnFailure", 3, True),
    ("Never keeps a failure", "regular", "Never", 1, False),
    ("an init container restarts on failure", "init", "Always", 1, True),
    ("an init container completes", "init", "Always", 0, False),
    ("an init container under Never fails the pod", "init", "Never", 1, False),
    ("a sidecar always restarts", "sidecar", "Never", 0, True),
]


@pytest.mark.parametrize(("case", "role", "policy", "code", "restarts"), EXITS,
                         ids=[c[0] for c in EXITS])
def test_exit(case: str, role: Any, policy: RestartPolicy, code: int, restarts: bool) -> None:
    c = ctr(role=role, state=RUN)
    action = decide_exit(c, ok(code), pod_policy=policy, terminal=False, failures=0,
                         ran_for_s=1.0, backoff=Backoff())
    assert isinstance(action, RestartContainer) is restarts
    if isinstance(action, MarkTerminated):
        assert action.exit == ok(code)


def test_no_restart_once_terminal() -> None:
    action = decide_exit(ctr(state=RUN), ok(1), pod_policy="Always", terminal=True, failures=0,
                         ran_for_s=1.0, backoff=Backoff())
    assert action == MarkTerminated("main", ok(1))


BACKOFF = [
    # (consecutive failures before, ran for s, failures after, delay s, waiting reason)
    (0, 1.0, 1, 0.0, "ContainerCreating"),  # the first restart is immediate
    (1, 1.0, 2, 10.0, "CrashLoopBackOff"),
    (2, 1.0, 3, 20.0, "CrashLoopBackOff"),
    (3, 1.0, 4, 40.0, "CrashLoopBackOff"),
    (5, 1.0, 6, 160.0, "CrashLoopBackOff"),
    (6, 1.0, 7, 300.0, "CrashLoopBackOff"),  # 320 s capped at 5 min
    (20, 1.0, 21, 300.0, "CrashLoopBackOff"),
    (6, 599.0, 7, 300.0, "CrashLoopBackOff"),
    (6, 600.0, 1, 0.0, "ContainerCreating"),  # ran 10 minutes: the count starts again
]


@pytest.mark.parametrize(("before", "ran", "after", "delay", "reason"), BACKOFF)
def test_crash_loop_backoff(before: int, ran: float, after: int, delay: float,
                            reason: str) -> None:
    action = decide_exit(ctr(state=RUN), ok(1), pod_policy="Always", terminal=False,
                         failures=before, ran_for_s=ran, backoff=Backoff(), ref="p_ns")
    assert isinstance(action, RestartContainer)
    assert (action.failures, action.delay_s, action.state.reason) == (after, delay, reason)
    if delay:
        assert action.state.message == (f"back-off {delay:g}s restarting failed "
                                         "container=main pod=p_ns")


def test_backoff_follows_the_configured_base() -> None:
    fast = Backoff(initial_s=1.0, max_s=4.0)
    assert [fast.delay_s(n) for n in range(1, 6)] == [0.0, 1.0, 2.0, 4.0, 4.0]


# -- probes and readiness ------------------------------------------------------------------
def test_probe_order() -> None:
    assert probe_order(False, True) == ("readiness", "liveness")
    assert probe_order(True, None) == ("startup",)
    assert probe_order(True, False) == ("startup",)
    assert probe_order(True, True) == ("readiness", "liveness")


READINESS = [
    # (case, pod, ContainersReady, Ready, reason, message)
    ("no probes", pod(ctr(state=RUN)), "True", "True", None, None),
    ("readiness undecided", pod(ctr(state=RUN, readiness=None)), "False", "False",
     "ContainersNotReady", "containers with unready status: [main]"),
    ("readiness failed", pod(ctr(state=RUN, readiness=False)), "False", "False",
     "ContainersNotReady", "containers with unready status: [main]"),
    ("readiness waits for the startup probe",
     pod(ctr(state=RUN, startup=None, readiness=True)), "False", "False",
     "ContainersNotReady", "containers with unready status: [main]"),
    ("an unready native sidecar", pod(ctr("sidecar", "sidecar", RUN, readiness=None),
                                      ctr(state=RUN)), "False", "False",
     "ContainersNotReady", "containers with unready status: [sidecar]"),
    ("not running", pod(ctr(proc=True)), "False", "False", "ContainersNotReady",
     "containers with unready status: [main]"),
    ("Succeeded", pod(ctr(state=ok()), policy="Never"), "False", "False", "PodCompleted", None),
    ("Failed", pod(ctr(state=ok(1)), policy="Never"), "False", "False", "PodFailed", None),
    ("a missing readiness gate", pod(ctr(state=RUN), readiness_gates=("example.com/lb",)),
     "True", "False", "ReadinessGatesNotReady",
     'corresponding condition of pod readiness gate "example.com/lb" does not exist.'),
    ("a false readiness gate",
     pod(ctr(state=RUN), readiness_gates=("example.com/lb",),
         conditions=({"type": "example.com/lb", "status": "False"},)),
     "True", "False", "ReadinessGatesNotReady",
     'the status of pod readiness gate "example.com/lb" is not "True", but False'),
    ("a true readiness gate",
     pod(ctr(state=RUN), readiness_gates=("example.com/lb",),
         conditions=({"type": "example.com/lb", "status": "True"},)),
     "True", "True", None, None),
]


@pytest.mark.parametrize(("case", "snapshot", "containers_ready", "ready", "reason", "message"),
                         READINESS, ids=[c[0] for c in READINESS])
def test_readiness(case: str, snapshot: PodSnapshot, containers_ready: str, ready: str,
                   reason: str | None, message: str | None) -> None:
    decision = decide(snapshot)
    assert cond(decision, "ContainersReady")["status"] == containers_ready
    assert cond(decision, "Ready")["status"] == ready
    assert cond(decision, "Ready").get("reason") == reason
    assert cond(decision, "Ready").get("message") == message


KILLS = [
    ("liveness failed", ctr(state=RUN, liveness=False), "liveness"),
    ("startup failed", ctr(state=RUN, startup=False), "startup"),
    ("liveness undecided", ctr(state=RUN, liveness=None), None),
    ("not running", ctr(state=ok(), liveness=False), None),
]


@pytest.mark.parametrize(("case", "c", "kind"), KILLS, ids=[k[0] for k in KILLS])
def test_failed_probe_kills(case: str, c: ContainerSnapshot, kind: str | None) -> None:
    kills = [a for a in decide(pod(c, ctr("other", state=RUN))).actions
             if isinstance(a, KillContainer)]
    expected = [] if kind is None else [
        KillContainer("main", f"Container main failed {kind} probe, will be restarted")]
    assert kills == expected


# -- conditions --------------------------------------------------------------------------
INITIALIZED = [
    # (case, pod, status, reason, message)
    ("no init containers", pod(ctr()), "True", None, None),
    ("an init container running", pod(ctr("i", "init", RUN), ctr()), "False",
     "ContainersNotInitialized", "containers with incomplete status: [i]"),
    ("a sidecar not started", pod(ctr("s", "sidecar", RUN, startup=None), ctr()), "False",
     "ContainersNotInitialized", "containers with incomplete status: [s]"),
    ("init done, sidecar running", pod(ctr("i", "init", ok()), SIDECAR_UP, ctr()),
     "True", None, None),
    ("a sidecar restarting after main started",
     pod(ctr("s", "sidecar", WAIT, last=ok(1)), ctr(state=RUN)), "True", None, None),
    ("Succeeded", pod(SIDECAR_UP, ctr(state=ok()), policy="Never"), "True", "PodCompleted",
     None),
    ("init failed", pod(ctr("i", "init", ok(1)), ctr(), policy="Never"), "False",
     "ContainersNotInitialized", "containers with incomplete status: [i]"),
]


@pytest.mark.parametrize(("case", "snapshot", "status", "reason", "message"), INITIALIZED,
                         ids=[c[0] for c in INITIALIZED])
def test_initialized(case: str, snapshot: PodSnapshot, status: str, reason: str | None,
                     message: str | None) -> None:
    got = cond(decide(snapshot), "Initialized")
    assert (got["status"], got.get("reason"), got.get("message")) == (status, reason, message)


def test_conditions_keep_transition_times_and_foreign_conditions() -> None:
    before = (
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": T0},
        {"type": "Ready", "status": "False", "lastTransitionTime": T0},
        {"type": "ContainersReady", "status": "True", "lastTransitionTime": T0},
        {"type": "example.com/lb", "status": "True", "lastTransitionTime": T0},
    )
    decision = decide(pod(ctr(state=RUN, readiness=False), conditions=before))
    assert cond(decision, "PodScheduled")["lastTransitionTime"] == T0  # unchanged
    assert cond(decision, "Ready")["lastTransitionTime"] == T0  # still False
    assert cond(decision, "ContainersReady") == {
        "type": "ContainersReady", "status": "False", "lastTransitionTime": T1,
        "lastProbeTime": None, "reason": "ContainersNotReady",
        "message": "containers with unready status: [main]"}
    assert cond(decision, "example.com/lb") == before[3]
    assert cond(decision, "PodReadyToStartContainers")["status"] == "True"
    assert [c["type"] for c in decision.conditions].count("Ready") == 1
    fresh = decide(pod(ctr()))
    assert cond(fresh, "PodScheduled") == {"type": "PodScheduled", "status": "True",
                                           "lastTransitionTime": T1, "lastProbeTime": None}
    assert cond(decide(pod(ctr(), sandbox_ready=False)),
                "PodReadyToStartContainers")["status"] == "False"
    assert cond(decide(pod(ctr(state=ok()), policy="Never")),
                "PodReadyToStartContainers")["status"] == "False"


# -- container statuses ------------------------------------------------------------------
def test_container_statuses() -> None:
    term = Terminated(137, "Error", T0, T1, message="Container main failed liveness probe",
                      signal=9, container_id="pqfed://41")
    decision = decide(pod(
        ctr("i", "init", ok()), SIDECAR_UP,
        ctr(state=Waiting("CrashLoopBackOff", "back-off 10s"), last=term, restart_count=2,
            image="busybox")))
    assert [s["name"] for s in decision.init_container_statuses] == ["i", "sidecar"]
    assert decision.init_container_statuses[0]["ready"] is True  # completed init container
    assert decision.container_statuses == [{
        "name": "main", "image": "busybox", "imageID": "", "ready": False, "started": False,
        "restartCount": 2,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
        "lastState": {"terminated": {
            "exitCode": 137, "reason": "Error", "startedAt": T0, "finishedAt": T1, "signal": 9,
            "message": "Container main failed liveness probe", "containerID": "pqfed://41"}},
    }]
    running = decide(pod(ctr(state=RUN, container_id="pqfed://7"))).container_statuses[0]
    assert (running["containerID"], running["started"], running["ready"]) == \
        ("pqfed://7", True, True)
    done = decide(pod(ctr(state=term), policy="Never")).container_statuses[0]
    assert done["containerID"] == "pqfed://41"


STATES: list[ContainerState] = [
    Waiting(), Waiting("CreateContainerConfigError", 'secret "x" not found'), Running(T0),
    ok(), Terminated(1, "OOMKilled", T0, T1, "killed", 9, "pqfed://3"),
]


@pytest.mark.parametrize("state", STATES)
def test_states_round_trip_through_the_api_shape(state: ContainerState) -> None:
    assert state_from_api(state.to_api()) == state


def test_state_from_api_defaults() -> None:
    assert state_from_api({}) is None
    assert state_from_api(None) is None
    assert state_from_api({"terminated": {"exitCode": 2}}) == Terminated(2, "Error", "", "")


# -- stopping ------------------------------------------------------------------------------
STOPS = [
    ("deletion", dict(deletion_requested=True), StopPod("delete", 30.0, "the pod is being deleted")),
    ("object gone", dict(removed=True), StopPod("forget", 2.0, "the pod object was deleted")),
    ("node shutdown", dict(shutdown_grace_s=5.0),
     StopPod("shutdown", 5.0, "the node agent is stopping")),
    ("deletion of a finished pod", dict(deletion_requested=True, terminal=True,
                                        phase="Succeeded"),
     StopPod("delete", 30.0, "the pod is being deleted")),
]


@pytest.mark.parametrize(("case", "flags", "stop"), STOPS, ids=[s[0] for s in STOPS])
def test_stop(case: str, flags: dict[str, Any], stop: StopPod) -> None:
    decision = decide(pod(ctr(state=RUN), **flags))
    assert decision.actions == [stop]
    assert decision.stop == stop


def test_grace_period_and_policies() -> None:
    spec: dict[str, Any] = {"containers": []}
    assert grace_period({"metadata": {}, "spec": spec}) == 30.0
    assert grace_period({"metadata": {}, "spec": {**spec, "terminationGracePeriodSeconds": 5}}) \
        == 5.0
    assert grace_period({"metadata": {"deletionGracePeriodSeconds": 0},
                         "spec": {**spec, "terminationGracePeriodSeconds": 5}}) == 0.0
    assert [restart_policy(p) for p in (None, "Always", "OnFailure", "Never")] == \
        ["Always", "Always", "OnFailure", "Never"]
    assert [container_policy(r, "Never") for r in ("regular", "init", "sidecar")] == \
        ["Never", "Never", "Always"]
    assert [container_policy(r, "Always") for r in ("regular", "init", "sidecar")] == \
        ["Always", "OnFailure", "Always"]
