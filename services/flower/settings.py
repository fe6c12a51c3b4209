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


class FlowerTuningError(ValueError):
    """A `FlowerTuning` field is out of range; `field` names it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"FlowerTuning.{field}: {reason}")
        self.field = field
        self.reason = reason


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

    @classmethod
    def fast(cls, poll: float = 0.1, preload: tuple[str, ...] = ()) -> Self:
        """Capped polls, SuperExecs asking every ``poll`` s, warm ClientApps."""
        return cls(poll_cap=poll, superexec_poll_interval=poll, warm_clientapp=True,
                   preload=preload)

    @property
    def stock(self) -> bool:
        """Nothing differs from stock Flower."""
        return self == type(self)()

    def replace(self, **changes: object) -> Self:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
