"""`FlowerTuning`: every knob of how pqfed launches Flower, in one frozen object.

A deployment, a SuperLink, a SuperExec and a SuperNode each take one `FlowerTuning` (the
default: stock Flower) instead of the same keyword arguments threaded through each layer.
`FlowerTuning.fast()` is what the pods run (`pqfed fl ...`); `PQFED_FLOWER_STOCK=1` there
selects the default, the baseline of the round-time benchmark (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Self

# flwr 1.42's SuperExec refuses a FLWR_SUPEREXEC_TASK_POLL_INTERVAL outside this range
# (flwr.supercore.superexec.run_superexec); checked here so the error names our field.
SUPEREXEC_POLL_RANGE_S = (0.01, 60.0)
#: The SuperLink's HTTP middlewares: Flower's own stack, or the same checks in the same order
#: with the per-request `BaseHTTPMiddleware` layers that do nothing for a request skipped
#: (services/flower/patches.py, `SuperLinkAsgiMiddleware`).
SUPERLINK_MIDDLEWARES = ("stock", "asgi")


class FlowerTuningError(ValueError):
    """A `FlowerTuning` field is out of range; `field` names it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"FlowerTuning.{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class IdleBackoff:
    """How an idle SuperNode polls the SuperLink for its next message
    (services/flower/polling.py has the state machine, `IdlePoller`).

    After a message arrives or a reply has been pushed, the node expects work soon (the next
    instruction of the round, e.g. evaluate after train, or the next round): it keeps polling
    at the fast interval (`FlowerTuning.poll_cap`) for ``window_s``. Past that, each empty
    poll multiplies the wait by ``factor`` up to ``cap_s``. ``cap_s`` therefore bounds how
    much later than at the fast rate an idle node sees a new round's first instruction;
    ``window_s`` keeps small federations, whose next instruction comes within a second,
    exactly as fast as before.
    """

    window_s: float = 1.0
    cap_s: float = 2.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        for name in ("window_s", "cap_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise FlowerTuningError(f"idle_backoff.{name}",
                                        f"{value!r} must be a number of seconds >= 0")
        if not self.cap_s > 0:
            raise FlowerTuningError("idle_backoff.cap_s", "must be > 0 seconds")
        if isinstance(self.factor, bool) or not isinstance(self.factor, int | float) \
                or not self.factor > 1:
            raise FlowerTuningError("idle_backoff.factor",
                                    f"{self.factor!r} must be > 1 (each idle poll waits that "
                                    "many times longer, up to cap_s)")

    def to_arg(self) -> str:
        """``WINDOW,CAP,FACTOR`` (the launcher's ``--idle-backoff``)."""
        return f"{self.window_s},{self.cap_s},{self.factor}"

    @classmethod
    def from_arg(cls, text: str) -> IdleBackoff:
        """Parses `to_arg`'s form; a bad one raises FlowerTuningError naming the field."""
        parts = text.split(",")
        if len(parts) != 3:
            raise FlowerTuningError("idle_backoff", f"{text!r}: give WINDOW,CAP,FACTOR in "
                                                    "seconds, seconds, multiplier (e.g. 1,2,2)")
        try:
            window, cap, factor = (float(x) for x in parts)
        except ValueError as exc:
            raise FlowerTuningError("idle_backoff", f"{text!r}: {exc}") from exc
        return cls(window, cap, factor)


@dataclass(frozen=True)
class FlowerTuning:
    """How Flower's processes are launched. The default is stock Flower 1.42."""

    #: Cap, in seconds, on the hard-coded poll sleeps and object-pull back-offs of the
    #: SuperLink, SuperNode, ServerApp and ClientApp processes, and the wake-on-arrival of
    #: the SuperNode's reply wait (services/flower/patches.py). ``None``: stock sleeps (3 s
    #: idle loops, 1-10 s back-offs).
    poll_cap: float | None = None
    #: How often a SuperExec asks its Runtime API for a task to launch
    #: (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``). ``None``: Flower's default, 1 s.
    superexec_poll_interval: float | None = None
    #: Fork each ClientApp task from a per-node warm process that has imported
    #: ``flwr-clientapp`` and ``preload`` once (services/flower/warm_clientapp.py), instead of
    #: starting a cold ``flwr-clientapp`` interpreter per message.
    warm_clientapp: bool = False
    #: Extra modules the warm ClientApp process imports before it forks (e.g. torch, the app).
    #: Keep them free of import-time thread pools: a fork copies one thread only.
    preload: tuple[str, ...] = ()
    #: A SuperNode's idle polls back off from ``poll_cap`` (`IdleBackoff`). ``None``: an
    #: idle SuperNode polls every ``poll_cap`` s (or every 3 s, stock).
    idle_backoff: IdleBackoff | None = None
    #: The SuperLink's HTTP middleware stack (`SUPERLINK_MIDDLEWARES`).
    superlink_middleware: str = "stock"
    #: The SuperLink holds a node's empty ``pull-messages`` up to this many seconds, answering
    #: as soon as an instruction for that node is stored (services/flower/longpoll.py). Needs
    #: the "asgi" middleware stack, which places that layer. ``None``: answered at once.
    long_poll_s: float | None = None

    def __post_init__(self) -> None:
        if self.poll_cap is not None and not self.poll_cap > 0:
            raise FlowerTuningError("poll_cap", f"{self.poll_cap!r} must be > 0 seconds "
                                                "(or None for stock sleeps)")
        low, high = SUPEREXEC_POLL_RANGE_S
        interval = self.superexec_poll_interval
        if interval is not None and not low <= interval <= high:
            raise FlowerTuningError("superexec_poll_interval",
                                    f"{interval!r} s is outside Flower's range [{low}, {high}]")
        if isinstance(self.preload, str):  # a bare string would preload its characters
            raise FlowerTuningError("preload", "must be a tuple of module names, not a str")
        object.__setattr__(self, "preload", tuple(self.preload))
        if self.preload and not self.warm_clientapp:
            raise FlowerTuningError("preload", "only the warm ClientApp process preloads; "
                                               "set warm_clientapp=True or drop preload")
        backoff = self.idle_backoff
        if backoff is not None:
            if not isinstance(backoff, IdleBackoff):
                raise FlowerTuningError("idle_backoff", f"{backoff!r} is not an IdleBackoff")
            if self.poll_cap is None:
                raise FlowerTuningError("idle_backoff", "backs off from the fast poll: set "
                                                        "poll_cap as well, or drop idle_backoff")
            if backoff.cap_s < self.poll_cap:
                raise FlowerTuningError("idle_backoff.cap_s",
                                        f"{backoff.cap_s} s is below poll_cap {self.poll_cap} s;"
                                        " a back-off cap must not poll faster than the fast rate")
        if self.superlink_middleware not in SUPERLINK_MIDDLEWARES:
            raise FlowerTuningError("superlink_middleware",
                                    f"{self.superlink_middleware!r}: choose one of "
                                    f"{', '.join(SUPERLINK_MIDDLEWARES)}")
        if self.long_poll_s is not None:
            from pqfed.services.flower.longpoll import LongPollError, check_hold

            try:
                object.__setattr__(self, "long_poll_s", check_hold(self.long_poll_s))
            except LongPollError as exc:
                raise FlowerTuningError("long_poll_s", exc.reason) from exc
            if self.superlink_middleware != "asgi":
                raise FlowerTuningError("long_poll_s", "the long poll is a layer of the "
                                                       "'asgi' middleware stack: set "
                                                       "superlink_middleware='asgi' or drop "
                                                       "long_poll_s")

    @classmethod
    def fast(cls, poll: float = 0.1, preload: tuple[str, ...] = (),
             idle_backoff: IdleBackoff | None = None) -> Self:
        """Capped polls, SuperExecs asking every ``poll`` s, warm ClientApps (and, given,
        idle polls backing off)."""
        return cls(poll_cap=poll, superexec_poll_interval=poll, warm_clientapp=True,
                   preload=preload, idle_backoff=idle_backoff)

    @property
    def stock(self) -> bool:
        """Nothing differs from stock Flower."""
        return self == type(self)()

    def replace(self, **changes: object) -> Self:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
