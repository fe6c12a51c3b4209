"""Every change pqfed makes to Flower's internals at run time, in one place.

Flower 1.42 has no settings for what these patches change (poll sleeps, pull back-offs, the
SuperLink's HTTP parser, node registration); they replace private module attributes,
constants, keyword defaults and methods of the pinned ``flwr==1.42.0`` (pyproject.toml),
inside the processes pqfed launches (``python -m pqfed.services.flower exec``, the warm
ClientApp process), never in an importing library user's process.

Each patch is a small object: its ``targets`` (module + attribute path, and the signature or
kind the patch relies on), what happens on another flwr version, and a note on upstream.

* The guard is hard: a patch is applied only when the installed flwr is exactly
  `PINNED_FLWR_VERSION`. On any other version a patch either logs one clear line and leaves
  Flower stock (``OnOtherVersion.STOCK``: the patch only makes Flower faster, stock Flower is
  correct) or refuses with `UnsupportedFlowerVersion` (``OnOtherVersion.REFUSE``: the patch
  carries a security property that stock Flower lacks, so running without it would be wrong).
* No silent skips: on the pinned version every target is resolved and checked before anything
  is changed; a missing target or a changed signature raises `PatchTargetMissing` naming the
  target and the flwr version.
* tests/services/flower/test_patches.py checks every target against the installed flwr and
  the guard on a simulated other version.

To move to a new flwr: bump the pin, run those tests, re-measure (docs/BENCHMARKS.md), and
re-read each patch's "Upstream" note against the new release. That is why this module is
longer than our ~500-line habit: every reach into Flower's internals is in this one file, so
an upgrade is reviewed here and nowhere else.

Upstream notes were checked against flwr 1.42.0, the newest release on PyPI at the time of
writing (the main-branch snapshot of flwrlabs/flower at hand, 1.30.0-dev of April 2026,
predates it). Where flwr already has a setting, it is used instead of a patch: the
SuperExec's task-poll interval (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``,
`FlowerTuning.superexec_poll_interval`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import threading
import time
import types
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Generic, TypeVar

from pqfed.services.flower.polling import IdlePoller
from pqfed.services.flower.settings import IdleBackoff
from pqfed.services.node_defaults import FLEET_PATH_PREFIX

log = logging.getLogger(__name__)

#: The only flwr release these patches are applied to (pyproject.toml pins it).
PINNED_FLWR_VERSION = "1.42.0"

S = TypeVar("S")


class FlowerPatchError(RuntimeError):
    """Base class of the errors of this module."""


class PatchTargetMissing(FlowerPatchError):
    """A patch target is absent or not what the patch relies on in the installed flwr."""

    def __init__(self, target: str, flwr_version: str, reason: str) -> None:
        super().__init__(f"Flower patch target {target} ({reason}) in flwr {flwr_version}; "
                         f"the patches are written for flwr {PINNED_FLWR_VERSION}: reinstall "
                         "it or update services/flower/patches.py")
        self.target = target
        self.flwr_version = flwr_version
        self.reason = reason


class UnsupportedFlowerVersion(FlowerPatchError):
    """A patch whose absence would be wrong was asked for on an unpinned flwr."""

    def __init__(self, patch: str, flwr_version: str, why: str) -> None:
        super().__init__(f"Flower patch {patch!r} refuses flwr {flwr_version} (pinned: "
                         f"{PINNED_FLWR_VERSION}): {why}. Install flwr=={PINNED_FLWR_VERSION} "
                         "(pyproject.toml)")
        self.patch = patch
        self.flwr_version = flwr_version


class OnOtherVersion(StrEnum):
    """What a patch does when the installed flwr is not the pinned one."""

    STOCK = "stock"  # log once, leave Flower as it is
    REFUSE = "refuse"  # raise UnsupportedFlowerVersion


@functools.cache
def installed_flwr_version() -> str:
    """The flwr distribution's version (read once per process)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr")
    except PackageNotFoundError:
        return "(not installed)"


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """``module`` + dotted ``path`` of an attribute a patch replaces or relies on.

    ``params``: the parameter names the callable must have, in order (checked through
    ``functools.wraps`` wrappers, so a patched target still checks). ``keyword_defaults``:
    names that must be keyword-only parameters with defaults. ``expect``: returns why the
    value is not what the patch relies on, or None.
    """

    module: str
    path: str
    params: tuple[str, ...] | None = None
    keyword_defaults: tuple[str, ...] = ()
    expect: Callable[[Any], str | None] | None = None

    @property
    def name(self) -> str:
        return f"{self.module}.{self.path}"

    def owner(self, flwr_version: str) -> Any:
        """The module or class that holds the last attribute of ``path``."""
        try:
            obj: Any = importlib.import_module(self.module)
        except ImportError as exc:
            raise PatchTargetMissing(self.name, flwr_version,
                                     f"module does not import: {exc}") from exc
        for part in self.path.split(".")[:-1]:
            if not hasattr(obj, part):
                raise PatchTargetMissing(self.name, flwr_version, f"no attribute {part!r}")
            obj = getattr(obj, part)
        return obj

    @property
    def attr(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def resolve(self, flwr_version: str) -> Any:
        """The target's current value, checked; raises PatchTargetMissing."""
        owner = self.owner(flwr_version)
        # a method must be defined on that class itself: patching an inherited one would
        # change the base class for everyone
        space = owner.__dict__ if isinstance(owner, type) else vars(owner)
        if self.attr not in space:
            raise PatchTargetMissing(self.name, flwr_version, f"no attribute {self.attr!r}")
        value = space[self.attr]
        if self.params is not None:
            try:
                names = tuple(inspect.signature(value).parameters)
            except (TypeError, ValueError) as exc:
                raise PatchTargetMissing(self.name, flwr_version, "not a callable") from exc
            if names != self.params:
                raise PatchTargetMissing(self.name, flwr_version,
                                         f"signature {names} is not {self.params}")
        if self.keyword_defaults:
            defaults = getattr(value, "__kwdefaults__", None) or {}
            missing = [k for k in self.keyword_defaults if k not in defaults]
            if missing:
                raise PatchTargetMissing(self.name, flwr_version,
                                         f"no keyword-only defaults {missing}")
        if self.expect is not None and (reason := self.expect(value)) is not None:
            raise PatchTargetMissing(self.name, flwr_version, reason)
        return value

    def set(self, value: Any, flwr_version: str) -> None:
        setattr(self.owner(flwr_version), self.attr, value)


class FlowerPatch(Generic[S]):
    """One named patch; ``install(setting)`` guards, checks every target, then applies."""

    name: ClassVar[str]
    targets: ClassVar[tuple[Target, ...]]
    on_other_version: ClassVar[OnOtherVersion]
    #: Why stock Flower would be wrong (REFUSE) or what stock Flower costs (STOCK).
    without: ClassVar[str]

    def install(self, setting: S, *, flwr_version: str | None = None) -> bool:
        """Apply with ``setting``; False (stock Flower, logged) on an unpinned flwr where
        that is safe. ``flwr_version`` overrides the installed version (tests)."""
        version = installed_flwr_version() if flwr_version is None else flwr_version
        if version != PINNED_FLWR_VERSION:
            if self.on_other_version is OnOtherVersion.REFUSE:
                raise UnsupportedFlowerVersion(self.name, version, self.without)
            log.warning("Flower patch %s is written for flwr %s, flwr %s is installed: "
                        "running stock Flower here (%s)", self.name, PINNED_FLWR_VERSION,
                        version, self.without)
            return False
        values = [t.resolve(version) for t in self.targets]  # all checked before any change
        self.apply(setting, values, version)
        return True

    def apply(self, setting: S, values: list[Any], flwr_version: str) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- helpers


def _is_time_module(value: Any) -> str | None:
    ok = value is time or isinstance(value, CappedTime)
    return None if ok else f"{value!r} is not the time module"


def _is_sleep(value: Any) -> str | None:
    ok = value is time.sleep or isinstance(getattr(value, "__self__", None), CappedTime)
    return None if ok else f"{value!r} is not time.sleep"


def _is_seconds(value: Any) -> str | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    return None if ok else f"{value!r} is not a poll interval in seconds"


def _is_str(value: Any) -> str | None:
    return None if isinstance(value, str) else f"{value!r} is not a str"


def _is_module(name: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = isinstance(value, types.ModuleType) and value.__name__ == name
        return None if ok else f"{value!r} is not the module {name}"

    return check


class CappedTime:
    """Stand-in for a module's ``time`` with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self._cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class WakeableTime(CappedTime):
    """``CappedTime`` whose ``sleep`` also ends as soon as ``wakeup`` is set.

    The SuperNode's Fleet loop sleeps while it waits for the ClientApp's reply and for that
    reply's objects; both arrive through the node's Runtime API (another thread of the same
    process), which sets ``wakeup`` when it stores them. The cap stays as a fallback.
    """

    def __init__(self, cap: float, wakeup: threading.Event) -> None:
        super().__init__(cap)
        self._wakeup = wakeup

    def sleep(self, seconds: float) -> None:
        self._wakeup.wait(min(seconds, self._cap))
        self._wakeup.clear()


#: Set whenever this process's SuperNode state stores a message or an object.
NODE_WAKEUP = threading.Event()


class IdleBackoffTime(WakeableTime):
    """``WakeableTime`` whose idle sleep (the one after an empty ``pull-messages``) lasts
    what the node's `IdlePoller` decided; its reply and object waits stay capped."""

    def __init__(self, cap: float, wakeup: threading.Event, poller: IdlePoller) -> None:
        super().__init__(cap, wakeup)
        self.poller = poller

    def sleep(self, seconds: float) -> None:
        idle = self.poller.take_pending()
        if idle is None:
            super().sleep(seconds)
            return
        self._wakeup.wait(idle)
        self._wakeup.clear()


def run_after(fn: Callable[..., Any], hook: Callable[[], None]) -> Callable[..., Any]:
    """``fn``, then ``hook`` (also when ``fn`` raises)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            hook()

    return wrapper


def throttled(fn: Callable[..., Any], interval: float) -> Callable[..., Any]:
    """``fn(self)`` runs at most once per ``interval`` seconds per instance."""
    last: dict[int, float] = {}

    @functools.wraps(fn)
    def wrapper(self: Any) -> Any:
        now = time.monotonic()
        if now - last.get(id(self), -interval) < interval:
            return None
        last[id(self)] = now
        return fn(self)

    return wrapper


def _replace_method(target: Target, fn: Any, wrap: Callable[[Any], Any], version: str) -> None:
    if getattr(fn, "__pqfed_patched__", False):
        return  # installed before in this process: never wrap twice
    patched = wrap(fn)
    patched.__pqfed_patched__ = True
    target.set(patched, version)


# --------------------------------------------------------------------------- fast-poll patches


class SuperNodeReplyWakeup(FlowerPatch[float]):
    """The SuperNode's Fleet loop: idle sleep capped, reply wait ended on arrival.

    ``start_client_internal`` sleeps 3 s when the SuperLink has no message for the node and
    0.5 s per check while it waits for its ClientApp's reply and each of that reply's
    objects. Its ``time`` becomes a `WakeableTime` (sleeps capped at the setting), and
    storing a message (``InMemoryNodeState.store_message``) or an object
    (``InMemoryObjectStore.put``) in the node's Runtime API wakes it.

    Upstream: still needed. flwr 1.42.0 keeps ``time.sleep(3)`` / ``time.sleep(0.5)`` in
    ``flwr/supernode/start_client_internal.py`` with no setting.
    """

    name = "supernode-reply-wakeup"
    targets = (
        Target("flwr.supernode.start_client_internal", "time", expect=_is_time_module),
        Target("flwr.supernode.nodestate.in_memory_nodestate",
               "InMemoryNodeState.store_message", params=("self", "message")),
        Target("flwr.supercore.object_store.in_memory_object_store",
               "InMemoryObjectStore.put", params=("self", "object_id", "object_content")),
    )
    on_other_version = OnOtherVersion.STOCK
    without = "the SuperNode polls every 3 s and checks for its reply every 0.5 s"

    def apply(self, setting: float, values: list[Any], flwr_version: str) -> None:
        clock, store_message, put = self.targets
        clock.set(WakeableTime(setting, NODE_WAKEUP), flwr_version)
        for target, fn in ((store_message, values[1]), (put, values[2])):
            _replace_method(target, fn, lambda f: run_after(f, NODE_WAKEUP.set), flwr_version)


class ServerAppGridPoll(FlowerPatch[float]):
    """The ServerApp's ``Grid.send_and_receive``: its 3 s wait between pulls, capped.

    Upstream: still needed. flwr 1.42.0 sleeps ``time.sleep(3)`` in
    ``flwr/superlink/grid/http_grid.py`` (``send_and_receive``) with no setting.
    """

    name = "serverapp-grid-poll"
    targets = (Target("flwr.superlink.grid.http_grid", "time", expect=_is_time_module),)
    on_other_version = OnOtherVersion.STOCK
    without = "each ServerApp round waits up to 3 s longer for the replies"

    def apply(self, setting: float, values: list[Any], flwr_version: str) -> None:
        self.targets[0].set(CappedTime(setting), flwr_version)


class StrategyNodeWait(FlowerPatch[float]):
    """The strategies' wait for enough connected nodes: its 1 s sleep, capped.

    Upstream: still needed. flwr 1.42.0 ``flwr/serverapp/strategy/strategy_utils.py``
    (``sample_nodes``) sleeps ``sleep(1)`` per check with no setting.
    """

    name = "strategy-node-wait"
    targets = (Target("flwr.serverapp.strategy.strategy_utils", "sleep", expect=_is_sleep),)
    on_other_version = OnOtherVersion.STOCK
    without = "a round that waits for nodes re-checks every 1 s"

    def apply(self, setting: float, values: list[Any], flwr_version: str) -> None:
        self.targets[0].set(CappedTime(setting).sleep, flwr_version)


class RuntimePollIntervals(FlowerPatch[float]):
    """The long-poll interval of the Runtime API routers (SuperLink, SuperNode) and of a
    task's wait for its reply: 0.25 s each, several per message hop; lowered to the setting
    (never raised).

    Upstream: still needed. flwr 1.42.0 has them as module constants
    (``flwr/supercore/routers/runtime/responses.py`` ``_POLL_INTERVAL``,
    ``flwr/supercore/task_process/agent/session.py`` ``_DEFAULT_TASK_REPLY_POLL_INTERVAL``),
    read at each sleep, with no setting.
    """

    name = "runtime-poll-intervals"
    targets = (
        Target("flwr.supercore.routers.runtime.responses", "_POLL_INTERVAL",
               expect=_is_seconds),
        Target("flwr.supercore.task_process.agent.session", "_DEFAULT_TASK_REPLY_POLL_INTERVAL",
               expect=_is_seconds),
    )
    on_other_version = OnOtherVersion.STOCK
    without = "Runtime API long polls wake every 0.25 s"

    def apply(self, setting: float, values: list[Any], flwr_version: str) -> None:
        for target, value in zip(self.targets, values, strict=True):
            target.set(min(float(value), setting), flwr_version)


class PullBackoff(FlowerPatch[float]):
    """Object pulls (ClientApp <- SuperNode, SuperNode <- SuperLink, ServerApp <- SuperLink)
    retry a missing object after 1 s, doubling up to 10 s, at most 500 times; the defaults are
    bound at definition time, so ``__kwdefaults__`` of both functions is patched: retry every
    setting seconds, no try limit, the same overall patience (``max_time``, 2 h). An object is
    usually missing only because its sender is still pushing it, and a 0.5 s back-off then
    cost up to ~0.4 s per hop (ClientApp <- SuperNode, measured).

    Upstream: still needed. flwr 1.42.0 ``flwr/supercore/inflatable/inflatable_utils.py``
    takes the back-off as keyword defaults from ``PULL_INITIAL_BACKOFF``/``PULL_BACKOFF_CAP``
    (``flwr/supercore/constant.py``); its callers pass none.
    """

    name = "pull-backoff"
    _KEYS = ("initial_backoff", "backoff_cap", "max_tries_per_object")
    targets = (
        Target("flwr.supercore.inflatable.inflatable_utils", "pull_objects",
               keyword_defaults=_KEYS),
        Target("flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree",
               keyword_defaults=_KEYS),
    )
    on_other_version = OnOtherVersion.STOCK
    without = "an object not yet pushed is retried after 1 s, then 2, 4 ... 10 s"

    def apply(self, setting: float, values: list[Any], flwr_version: str) -> None:
        for fn in values:
            fn.__kwdefaults__.update(initial_backoff=setting, backoff_cap=setting,
                                     max_tries_per_object=None)


class TokenSweepThrottle(FlowerPatch[float]):
    """The SuperLink's SQL state sweeps expired task claims (one UPDATE + commit) at the start
    of nearly every request: ~17% of its CPU in a 3-node round, measured with py-spy. Token
    checks compare ``active_until`` themselves, so sweeping at most once per setting seconds
    (per state object) only delays when an expired claim is requeued or failed.

    Upstream: still needed. flwr 1.42.0 ``flwr/supercore/corestate/sql_corestate.py`` calls
    ``_cleanup_expired_task_tokens()`` from six request paths, unthrottled.
    """

    name = "token-sweep-throttle"
    targets = (Target("flwr.supercore.corestate.sql_corestate",
                      "SqlCoreState._cleanup_expired_task_tokens", params=("self",)),)
    on_other_version = OnOtherVersion.STOCK
    without = "the SuperLink sweeps expired task tokens on nearly every request"

    def apply(self, setting: float, values: list[Any], flwr_version: str) -> None:
        _replace_method(self.targets[0], values[0], lambda f: throttled(f, setting),
                        flwr_version)


class SuperNodeIdleBackoff(FlowerPatch[tuple[float, IdleBackoff]]):
    """The SuperNode's idle polls back off (services/flower/polling.py has the policy).

    Setting: (the fast poll interval, `IdleBackoff`). ``start_client_internal``'s loop calls
    ``_pull_and_store_message`` (None: the SuperLink had no message) and, after a message,
    ``_push_messages``; both are looked up in the module at each call, so wrapping them
    tells an `IdlePoller` what happened: an empty pull (and how long the SuperLink held it)
    asks it for the next wait, a message
    or a pushed reply resets it to fast. The loop's ``time`` becomes an `IdleBackoffTime`
    (a `WakeableTime`, so `SuperNodeReplyWakeup` still holds): the sleep right after an
    empty pull is the idle one and lasts the poller's wait; the others stay capped.

    Upstream: still needed. flwr 1.42.0 ``flwr/supernode/start_client_internal.py`` sleeps
    a fixed ``time.sleep(3)`` after an empty pull, with no setting and no back-off.
    """

    name = "supernode-idle-backoff"
    _MODULE = "flwr.supernode.start_client_internal"
    targets = (
        Target(_MODULE, "time", expect=_is_time_module),
        Target(_MODULE, "_pull_and_store_message",
               params=("state", "object_store", "node_config", "receive", "get_run", "get_fab",
                       "pull_object", "confirm_message_received", "trusted_entities")),
        Target(_MODULE, "_push_messages",
               params=("state", "object_store", "send", "push_object")),
    )
    on_other_version = OnOtherVersion.STOCK
    without = "an idle SuperNode polls at the fixed poll cap"

    def apply(self, setting: tuple[float, IdleBackoff], values: list[Any],
              flwr_version: str) -> None:
        fast, backoff = setting
        clock, pull, push = self.targets
        current = values[0]
        if isinstance(current, IdleBackoffTime):  # installed before: keep its poller
            poller = current.poller
        else:
            poller = IdlePoller(fast, backoff, time.monotonic())
            clock.set(IdleBackoffTime(fast, NODE_WAKEUP, poller), flwr_version)

        def after_pull(fn: Any) -> Any:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                started = time.monotonic()
                run_id = fn(*args, **kwargs)
                if run_id is None:  # how long it took tells a held (long) poll
                    now = time.monotonic()
                    poller.empty_poll(now, waited=now - started)
                else:
                    poller.activity(time.monotonic())
                return run_id

            return wrapper

        _replace_method(pull, values[1], after_pull, flwr_version)
        _replace_method(push, values[2],
                        lambda f: run_after(f, lambda: poller.activity(time.monotonic())),
                        flwr_version)


#: At most one expired-token sweep per this many seconds (TokenSweepThrottle's setting).
TOKEN_SWEEP_INTERVAL_S = 1.0

SUPERNODE_REPLY_WAKEUP = SuperNodeReplyWakeup()
SERVERAPP_GRID_POLL = ServerAppGridPoll()
STRATEGY_NODE_WAIT = StrategyNodeWait()
RUNTIME_POLL_INTERVALS = RuntimePollIntervals()
PULL_BACKOFF = PullBackoff()
TOKEN_SWEEP_THROTTLE = TokenSweepThrottle()
SUPERNODE_IDLE_BACKOFF = SuperNodeIdleBackoff()
FAST_POLL_PATCHES: tuple[FlowerPatch[float], ...] = (
    SUPERNODE_REPLY_WAKEUP, SERVERAPP_GRID_POLL, STRATEGY_NODE_WAIT, RUNTIME_POLL_INTERVALS,
    PULL_BACKOFF,
)


def install_fast_poll(cap: float, *, flwr_version: str | None = None) -> list[str]:
    """Cap the hard-coded poll sleeps and pull back-offs of flwr in this process, wake the
    SuperNode's reply wait on arrival and throttle the SuperLink's expired-token sweep;
    return the targets patched (none, logged, on an unpinned flwr)."""
    patched: list[str] = []
    for patch in FAST_POLL_PATCHES:
        if patch.install(cap, flwr_version=flwr_version):
            patched += [t.name for t in patch.targets]
    if TOKEN_SWEEP_THROTTLE.install(TOKEN_SWEEP_INTERVAL_S, flwr_version=flwr_version):
        patched += [t.name for t in TOKEN_SWEEP_THROTTLE.targets]
    return patched


def install_idle_backoff(cap: float, backoff: IdleBackoff, *,
                         flwr_version: str | None = None) -> bool:
    """`SUPERNODE_IDLE_BACKOFF`, after `install_fast_poll` (``cap``: the fast interval)."""
    return SUPERNODE_IDLE_BACKOFF.install((cap, backoff), flwr_version=flwr_version)


# --------------------------------------------------------------------------- SuperLink patches


class UvicornHttpPin(FlowerPatch[str]):
    """The SuperLink's HTTP/1.1 parser, pinned. flwr's ``flower-superlink`` serves the Fleet,
    Control and Runtime APIs with ``uvicorn.run`` and no ``http=``, so uvicorn's "auto" picks
    httptools or h11 by what is installed; the two disagree on edge cases (a bare LF ends a
    line for h11, not for httptools) and the sidecar's request filter
    (pqc/sidecar/httpfilter.py) was validated against one of them. Every ``uvicorn.Config``
    made in this process uses the setting; a caller's different explicit choice is
    overridden, with a warning.

    On another flwr: refuses, because whether that flwr still builds its server through
    ``uvicorn.Config`` (and with which ``http``) is unknown, and a SuperLink parsing
    differently from the filter in front of it reopens request smuggling.

    Upstream: still needed. flwr 1.42.0 ``flwr/superlink/cli/flower_superlink.py`` calls
    ``uvicorn.run(app=..., host=..., port=..., ...)`` without ``http`` and has no option.
    """

    name = "uvicorn-http-pin"
    targets = (
        Target("flwr.superlink.cli.flower_superlink", "uvicorn", expect=_is_module("uvicorn")),
        Target("uvicorn.config", "Config.__init__",
               expect=lambda f: None if "http" in inspect.signature(f).parameters
               else "no `http` parameter"),
        Target("uvicorn.config", "HTTP_PROTOCOLS",
               expect=lambda v: None if isinstance(v, dict) else f"{v!r} is not a dict"),
    )
    on_other_version = OnOtherVersion.REFUSE
    without = ("the SuperLink's HTTP parser would be uvicorn's automatic choice, not the one "
               "the sidecar's request filter was validated against")

    def apply(self, setting: str, values: list[Any], flwr_version: str) -> None:
        _, init, protocols = values
        if setting not in protocols or setting == "auto":
            raise ValueError(f"--http {setting!r}: choose one of "
                             f"{sorted(set(protocols) - {'auto'})}")
        original = getattr(init, "__pqfed_original__", init)

        @functools.wraps(original)
        def pinned(self: Any, *args: Any, **kwargs: Any) -> None:
            requested = kwargs.get("http", "auto")
            if requested not in ("auto", setting):
                log.warning("uvicorn http=%r overridden: pinned to %r", requested, setting)
            kwargs["http"] = setting
            original(self, *args, **kwargs)

        pinned.__pqfed_original__ = original  # type: ignore[attr-defined]
        pinned.__pqfed_http__ = setting  # type: ignore[attr-defined]
        self.targets[1].set(pinned, flwr_version)


class PeerBinding(FlowerPatch[bytes]):
    """One Flower node per certificate, in a SuperLink process.

    The inbound PQC sidecar adds the header named by the setting (``X-Pqfed-Peer``, the node
    id of the certificate that authenticated the channel; a value a peer sent itself is
    dropped) to every request it forwards. An outermost ASGI middleware (added through
    ``_get_middleware``, which ``create_app`` calls) hands it to ``register_node``: a Fleet
    ``register-node`` carrying it unregisters the node that certificate registered before, so
    each certificate holds at most one live Flower node and a second SuperNode of one
    enrolled client replaces the first instead of counting twice (in sampling,
    ``min_available_nodes`` and Krum's f). Requests without the header (no sidecar in front:
    the plaintext baseline) are unchanged. The Fleet router calls ``register_node`` through
    its module (``fleet_handlers.register_node``), so replacing the module attribute reaches
    it.

    On another flwr: refuses; stock Flower would let one certificate hold many nodes.

    Upstream: still needed. flwr 1.42.0 binds nodes to their own public keys only with
    SuperNode authentication (``enable_supernode_auth``, which disables Fleet registration),
    never to the transport's certificate, and has no hook for it.
    """

    name = "peer-binding"
    targets = (
        Target("flwr.superlink.main", "_get_middleware", params=()),
        Target("flwr.superlink.servicer.fleet.fleet_handlers", "register_node",
               params=("request", "state", "enable_supernode_auth")),
        Target("flwr.superlink.routers.fleet.router", "fleet_handlers",
               expect=_is_module("flwr.superlink.servicer.fleet.fleet_handlers")),
        Target("flwr.server.superlink.linkstate.linkstate", "LinkState.delete_node",
               params=("self", "owner_aid", "node_id")),
        Target("flwr.common.constant", "NOOP_FLWR_AID", expect=_is_str),
    )
    on_other_version = OnOtherVersion.REFUSE
    without = "one enrolled client could register several Flower nodes and count several times"

    def apply(self, setting: bytes, values: list[Any], flwr_version: str) -> None:
        from starlette.middleware import Middleware

        get_middleware_target, register_target, *_ = self.targets
        stock_middleware, stock_register, _, _, noop_aid = values
        if getattr(stock_register, "__pqfed_patched__", False):
            return
        header = setting.lower()  # ASGI header names are lower-case bytes
        peer_var: ContextVar[str | None] = ContextVar("pqfed_peer", default=None)

        class PeerMiddleware:
            """Outermost ASGI middleware: the request's certified peer, for the handlers."""

            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                peer = None
                if scope.get("type") == "http":
                    peer = next((v.decode("ascii", "replace")
                                 for k, v in scope.get("headers", ()) if k.lower() == header),
                                None)
                token = peer_var.set(peer)
                try:
                    await self.app(scope, receive, send)
                finally:
                    peer_var.reset(token)

        bound: dict[str, int] = {}
        lock = threading.Lock()

        def get_middleware() -> list[Any]:
            return [Middleware(PeerMiddleware), *stock_middleware()]

        def register_node(request: Any, state: Any, enable_supernode_auth: bool) -> Any:
            response = stock_register(request=request, state=state,
                                      enable_supernode_auth=enable_supernode_auth)
            peer = peer_var.get()
            if peer:
                with lock:
                    previous, bound[peer] = bound.get(peer), int(response.node_id)
                if previous is not None and previous != response.node_id:
                    with contextlib.suppress(ValueError):  # already unregistered
                        state.delete_node(noop_aid, previous)
                    log.warning("peer binding: %s registered node %d; its node %d is "
                                "unregistered (one Flower node per certificate)", peer,
                                response.node_id, previous)
            return response

        register_node.__pqfed_patched__ = True  # type: ignore[attr-defined]
        get_middleware_target.set(get_middleware, flwr_version)
        register_target.set(register_node, flwr_version)


#: flwr 1.42.0's SuperLink middlewares in request order (``flwr.superlink.main``), by class
#: name; ``http_error_translator`` is the ``BaseHTTPMiddleware`` given a ``dispatch``.
STOCK_SUPERLINK_MIDDLEWARES = (
    "ControlSensitiveResponseMiddleware", "http_error_translator",
    "ControlAuthenticationMiddleware", "ControlLicenseMiddleware",
    "ProtobufTranslationMiddleware", "ControlEventLogMiddleware", "NodeAuthMiddleware",
    "FleetEventLogMiddleware",
)
#: Of those, the ones that do nothing (``return await call_next(request)``) for a request
#: whose path is not a Control API path (``_is_control_path``).
CONTROL_ONLY_MIDDLEWARES = frozenset({
    "ControlSensitiveResponseMiddleware", "ControlAuthenticationMiddleware",
    "ControlLicenseMiddleware", "ControlEventLogMiddleware",
})


def _middleware_label(entry: Any) -> str:
    dispatch = entry.kwargs.get("dispatch") if hasattr(entry, "kwargs") else None
    return str(getattr(dispatch, "__name__", None) or getattr(entry.cls, "__name__", entry))


def _stock_middleware_stack(fn: Any) -> str | None:
    from starlette.middleware.base import BaseHTTPMiddleware

    if getattr(fn, "__pqfed_asgi__", False):
        return None  # installed: the stock stack was checked then
    try:
        entries = list(fn())
    except Exception as exc:
        return f"calling it failed: {exc!r}"
    if any(getattr(e.cls, "__pqfed_asgi__", False) for e in entries):
        return None  # installed, then wrapped by the peer binding
    # pqfed's own pure-ASGI middlewares (the peer binding) may already be around it
    stock = [_middleware_label(e) for e in entries
             if isinstance(e.cls, type) and issubclass(e.cls, BaseHTTPMiddleware)]
    if tuple(stock) != STOCK_SUPERLINK_MIDDLEWARES:
        return f"BaseHTTPMiddleware stack {stock} is not {list(STOCK_SUPERLINK_MIDDLEWARES)}"
    return None


def _control_paths_only(keys: Any) -> str | None:
    bad = [k for k in keys if not str(k[1]).startswith("/v1/control/")]
    return f"sensitive routes outside /v1/control/: {bad}" if bad else None


#: The Fleet pull a SuperLink long poll holds and the Runtime push that wakes it
#: (services/flower/longpoll.py), with the protobuf request types flwr parses them into.
LONG_POLL_PULL = ("POST", f"{FLEET_PATH_PREFIX}pull-messages")
LONG_POLL_PUSH = ("POST", "/v1/runtime/push-messages")


def _parses_long_poll_routes(table: Any) -> str | None:
    names = {key: getattr(table.get(key), "__name__", None) for key in (LONG_POLL_PULL,
                                                                        LONG_POLL_PUSH)}
    want = {LONG_POLL_PULL: "PullMessagesRequest", LONG_POLL_PUSH: "PushAppMessagesRequest"}
    return None if names == want else f"parses {names}, not {want}"


def _stores_protobuf_response(cls: Any) -> str | None:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError) as exc:
        return f"source unavailable: {exc!r}"
    ok = "state.protobuf_response = result" in source
    return None if ok else "no longer stores the handler's result in request.state"


def _long_poll_routes() -> Any:
    """`LongPollRoutes` for flwr 1.42: the parsed requests and the handler's result live in
    the request state (``ProtobufTranslationMiddleware``, ``ProtobufRoute``)."""
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
    from flwr.proto.runtime_pb2 import PushAppMessagesRequest

    from pqfed.services.flower.longpoll import LongPollRoutes

    def state(scope: Any, key: str) -> Any:
        return (scope.get("state") or {}).get(key)

    def pull_node(scope: Any) -> int | None:
        request = state(scope, "protobuf_request")
        return int(request.node.node_id) if isinstance(request, PullMessagesRequest) else None

    def pull_empty(scope: Any) -> bool:
        response = state(scope, "protobuf_response")
        return isinstance(response, PullMessagesResponse) and not response.messages_list

    def pushed_nodes(scope: Any) -> list[int] | None:
        request = state(scope, "protobuf_request")
        if not isinstance(request, PushAppMessagesRequest):
            return None
        return [int(m.metadata.dst_node_id) for m in request.messages_list]

    return LongPollRoutes(pull_path=LONG_POLL_PULL[1], push_path=LONG_POLL_PUSH[1],
                          pull_node=pull_node, pull_empty=pull_empty,
                          pushed_nodes=pushed_nodes)


class SuperLinkAsgiMiddleware(FlowerPatch[float | None]):
    """The SuperLink's middlewares as pure ASGI where they act on a request, absent where
    they would only pass it on: same checks, same order, same responses.

    flwr 1.42.0 stacks eight Starlette ``BaseHTTPMiddleware`` layers (`STOCK_SUPERLINK_
    MIDDLEWARES`); each runs every request through a task group and memory streams, which
    py-spy showed as most of a saturated SuperLink's CPU (docs/BENCHMARKS.md, "Aggregator
    capacity"). Here, in the same positions:

    * the four Control middlewares (`CONTROL_ONLY_MIDDLEWARES`) run, unchanged, only for
      Control API paths (flwr's own ``_is_control_path``); for any other request their
      ``dispatch`` is ``return await call_next(request)``, so skipping it changes nothing;
    * ``FleetEventLogMiddleware`` runs, unchanged, only for Fleet paths when a Fleet event
      log plugin is configured (it passes every request on otherwise);
    * ``http_error_translator``: a pure ASGI layer that calls flwr's own translator with the
      exception raised below it (before the response started), so a ``FlowerError``, an
      ``HTTPException`` (e.g. node auth's 401) or an unexpected error gets the same response;
    * ``NodeAuthMiddleware``: a pure ASGI layer that calls flwr's own ``authenticate_node``
      in the thread pool for every Fleet request carrying a parsed protobuf request, as the
      stock one does: an unauthenticated or forged Fleet request is refused with 401;
    * ``ProtobufTranslationMiddleware`` stays as it is (it does real work on every request);
    * setting (``long_poll_s``) not None: innermost, `FleetLongPoll` (services/flower/
      longpoll.py) holds an authenticated ``pull-messages`` that found nothing until a
      Runtime ``push-messages`` addresses its node, or ``long_poll_s`` passed. It reads the
      parsed request and the handler's result from the request state, where flwr's protobuf
      translation and ``ProtobufRoute`` keep them (targets 6 and 7). uvicorn's
      ``Server.shutdown`` (target 8) first answers every held pull: uvicorn waits for open
      requests before it exits, so a held pull would delay a SuperLink's stop by the hold.

    On another flwr: stock middlewares (correct, slower; no long poll).

    Upstream: still needed. flwr 1.42.0 ``flwr/superlink/main.py`` ``_get_middleware`` builds
    the stack from ``BaseHTTPMiddleware`` subclasses, with no setting.
    """

    name = "superlink-asgi-middleware"
    targets = (
        Target("flwr.superlink.main", "_get_middleware", params=(),
               expect=_stock_middleware_stack),
        Target("flwr.superlink.routers.control.middlewares", "_is_control_path",
               params=("path",)),
        Target("flwr.superlink.routers.control.middlewares", "CONTROL_SENSITIVE_ROUTE_KEYS",
               expect=_control_paths_only),
        Target("flwr.superlink.routers.fleet.node_auth", "authenticate_node",
               params=("request",)),
        Target("flwr.supercore.error.http", "http_error_translator",
               params=("request", "call_next")),
        Target("flwr.supercore.protobuf.translation", "PROTOBUF_REQUEST_TYPES",
               expect=_parses_long_poll_routes),
        Target("flwr.supercore.protobuf.routing", "ProtobufRoute",
               expect=_stores_protobuf_response),
        Target("uvicorn.server", "Server.shutdown", params=("self", "sockets")),
    )
    on_other_version = OnOtherVersion.STOCK
    without = "every SuperLink request passes eight BaseHTTPMiddleware layers"

    def apply(self, setting: float | None, values: list[Any], flwr_version: str) -> None:
        from google.protobuf.message import (  # type: ignore[import-untyped]
            Message as ProtobufMessage,
        )
        from starlette.concurrency import run_in_threadpool
        from starlette.middleware import Middleware
        from starlette.requests import Request

        stock_get, is_control_path, _, authenticate_node, translate, _, _, shutdown = values
        if getattr(stock_get, "__pqfed_asgi__", False):
            return
        long_poll: list[Any] = []
        if setting is not None:
            from pqfed.services.flower.longpoll import FleetLongPoll, NodeWakeups

            wakeups = NodeWakeups()
            long_poll.append(Middleware(FleetLongPoll, hold_s=setting,
                                        routes=_long_poll_routes(), wakeups=wakeups,
                                        report=logging.getLogger("flwr").info))
            original_shutdown = getattr(shutdown, "__pqfed_original__", shutdown)

            @functools.wraps(original_shutdown)
            async def answer_held_pulls_first(server: Any, sockets: Any = None) -> None:
                wakeups.close()
                await original_shutdown(server, sockets)

            answer_held_pulls_first.__pqfed_original__ = original_shutdown  # type: ignore[attr-defined]
            self.targets[7].set(answer_held_pulls_first, flwr_version)

        def control(scope: Any) -> bool:
            return bool(is_control_path(scope["path"]))

        def fleet_event_log(scope: Any) -> bool:
            app = scope.get("app")
            plugin = getattr(getattr(app, "state", None), "fleet_event_log_plugin", None)
            return str(scope["path"]).startswith(FLEET_PATH_PREFIX) and plugin is not None

        class OnlyWhere:
            """Runs ``inner`` (a stock middleware, unchanged) for the HTTP requests where
            ``applies``; every other request goes straight to ``app``."""

            __pqfed_asgi__ = True

            def __init__(self, app: Any, inner: Any, applies: Callable[[Any], bool]) -> None:
                self.app = app
                self.inner = inner(app)
                self.applies = applies

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                if scope["type"] == "http" and not self.applies(scope):
                    await self.app(scope, receive, send)
                else:
                    await self.inner(scope, receive, send)

        class ErrorTranslation:
            """flwr's ``http_error_translator`` without ``BaseHTTPMiddleware``."""

            __pqfed_asgi__ = True

            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                if scope["type"] != "http":
                    await self.app(scope, receive, send)
                    return
                started = False

                async def tracking_send(message: Any) -> None:
                    nonlocal started
                    started = started or message["type"] == "http.response.start"
                    await send(message)

                try:
                    await self.app(scope, receive, tracking_send)
                except Exception as exc:
                    if started:  # as BaseHTTPMiddleware: too late for an error response
                        raise
                    error = exc

                    async def raise_it(_request: Any) -> Any:
                        raise error

                    response = await translate(Request(scope, receive), raise_it)
                    await response(scope, receive, send)

        class NodeAuth:
            """flwr's ``NodeAuthMiddleware`` without ``BaseHTTPMiddleware``."""

            __pqfed_asgi__ = True

            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                if scope["type"] == "http" and str(scope["path"]).startswith(FLEET_PATH_PREFIX):
                    request = Request(scope, receive)
                    parsed = getattr(request.state, "protobuf_request", None)
                    if isinstance(parsed, ProtobufMessage):
                        await run_in_threadpool(authenticate_node, request)
                await self.app(scope, receive, send)

        def convert(entry: Any) -> Any:
            label = _middleware_label(entry)
            if label in CONTROL_ONLY_MIDDLEWARES:
                return Middleware(OnlyWhere, inner=entry.cls, applies=control)
            if label == "FleetEventLogMiddleware":
                return Middleware(OnlyWhere, inner=entry.cls, applies=fleet_event_log)
            if label == "http_error_translator":
                return Middleware(ErrorTranslation)
            if label == "NodeAuthMiddleware":
                return Middleware(NodeAuth)
            return entry

        def get_middleware() -> list[Any]:
            return [*(convert(e) for e in stock_get()), *long_poll]

        get_middleware.__pqfed_asgi__ = True  # type: ignore[attr-defined]
        self.targets[0].set(get_middleware, flwr_version)


UVICORN_HTTP_PIN = UvicornHttpPin()
PEER_BINDING = PeerBinding()
SUPERLINK_ASGI_MIDDLEWARE = SuperLinkAsgiMiddleware()

#: Every patch, for the target tests.
ALL_PATCHES: Sequence[FlowerPatch[Any]] = (
    *FAST_POLL_PATCHES, TOKEN_SWEEP_THROTTLE, SUPERNODE_IDLE_BACKOFF, UVICORN_HTTP_PIN,
    PEER_BINDING, SUPERLINK_ASGI_MIDDLEWARE,
)


def pin_uvicorn_http(implementation: str, *, flwr_version: str | None = None) -> str:
    """`UVICORN_HTTP_PIN` with ``implementation``; returns the patched target."""
    UVICORN_HTTP_PIN.install(implementation, flwr_version=flwr_version)
    return UVICORN_HTTP_PIN.targets[1].name


def install_asgi_middleware(long_poll_s: float | None = None, *,
                            flwr_version: str | None = None) -> bool:
    """`SUPERLINK_ASGI_MIDDLEWARE`, holding empty Fleet pulls up to ``long_poll_s`` when given
    (before `install_peer_binding`, which wraps its stack)."""
    return SUPERLINK_ASGI_MIDDLEWARE.install(long_poll_s, flwr_version=flwr_version)


def install_peer_binding(*, flwr_version: str | None = None) -> bool:
    """`PEER_BINDING` with the sidecar's peer header."""
    from pqfed.pqc.sidecar.httpfilter import PEER_HEADER

    return PEER_BINDING.install(PEER_HEADER, flwr_version=flwr_version)
