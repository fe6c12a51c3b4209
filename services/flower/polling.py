"""When an idle Flower node polls the SuperLink again: `IdlePoller`, a pure state machine.

Flower's Fleet API is request-response: a SuperNode learns of a new instruction only by
asking (``pull-messages``). pqfed's SuperNodes ask every 0.1 s (`FlowerTuning.poll_cap`),
which made a 3-client round ~1 s, but every idle node then sends 10 requests per second
through both PQC sidecars and the SuperLink's HTTP stack; with many nodes those polls fill
the aggregator's one event loop (docs/BENCHMARKS.md, "Aggregator capacity").

The policy (`IdleBackoff` holds its numbers):

* **Fast while work is expected.** After a message arrives, after a reply has been pushed
  and when the node starts, the next instruction usually follows within a second in a small
  federation (evaluate after train, the next round after evaluate): for ``window_s`` the
  node polls at the fast interval, exactly as before.
* **Back off while idle.** Past the window each empty poll multiplies the wait by
  ``factor``, up to ``cap_s``: a node waiting for 99 others to finish a round, or for the
  next job, sends a request every ``cap_s`` instead of ten per second.
* **Dispatch latency stays bounded.** A backed-off node sees a new instruction at most
  ``cap_s`` later than at the fast rate; the first message resets it to fast, so the rest
  of that round (object pulls, reply, the next instruction) runs at full speed.

* **Held polls are not idle time.** Flower 1.42 has no way for the SuperLink to wake a node
  (no long poll, no push on the HTTP transport); pqfed's SuperLink holds an empty poll until
  the node has an instruction or ``hold_s`` passed (services/flower/longpoll.py). A poll that
  took ``cap_s`` or more was held (or its SuperLink is that slow): the next one follows at
  the fast interval, so the node is always asking, and an idle node still sends at most one
  request per ``cap_s``. Against a SuperLink that answers at once the back-off above holds.

The bound on the idle wait is what the node side can give on its own; the SuperNode patch
(services/flower/patches.py, `SuperNodeIdleBackoff`) and the capacity benchmark's emulated
clients (testbed/bench/capacity_client.py) both drive this class. Times are passed in
(``now``: a monotonic clock), so the policy is tested without sleeping.
"""

from __future__ import annotations

from pqfed.services.flower.settings import IdleBackoff


class IdlePoller:
    """One node's poll timing. Not thread-safe: one Fleet loop drives it."""

    def __init__(self, fast_s: float, backoff: IdleBackoff, now: float) -> None:
        if not fast_s > 0:
            raise ValueError(f"fast_s: {fast_s!r} must be > 0 seconds")
        self.fast_s = fast_s
        self.backoff = backoff
        self.last_activity = now
        self.delay = fast_s
        self._pending: float | None = None

    def activity(self, now: float) -> None:
        """A message arrived or a reply was pushed (or the node started): poll fast."""
        self.last_activity = now
        self.delay = self.fast_s
        self._pending = None

    def empty_poll(self, now: float, waited: float = 0.0) -> float:
        """The SuperLink had no message: seconds to wait before the next poll. ``waited``:
        how long that poll took; one that took ``cap_s`` or more was held by the SuperLink
        (a long poll, services/flower/longpoll.py), which did the waiting: ask again at the
        fast interval. An idle node still asks at most once per ``cap_s``."""
        b = self.backoff
        if waited >= b.cap_s or now - self.last_activity < b.window_s:
            self.delay = self.fast_s
        else:
            self.delay = min(b.cap_s, max(self.fast_s, self.delay * b.factor))
        self._pending = self.delay
        return self.delay

    def take_pending(self) -> float | None:
        """The wait `empty_poll` decided, once (the SuperNode's idle sleep asks for it);
        None when the next sleep is not the idle one (a reply or object wait)."""
        pending, self._pending = self._pending, None
        return pending
