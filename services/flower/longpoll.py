"""The SuperLink holds a node's empty ``pull-messages`` until it has an instruction:
`FleetLongPoll`, a pure ASGI layer, and `NodeWakeups`, the per-node wake-up board.

Flower 1.42's Fleet API over HTTP is request-response: a SuperNode learns of a new
instruction only by asking, so an idle node either asks often (load on the aggregator: every
ask crosses both PQC sidecars and the SuperLink's HTTP stack) or late (dispatch latency).
`IdlePoller` (services/flower/polling.py) bounds both from the node's side. A long poll
removes the trade-off from the SuperLink's side, the way HTTP long polling has always worked
(RFC 6202, section 2.1):

* An authenticated ``pull-messages`` that finds nothing for its node is not answered at
  once. The layer runs Flower's own handler again when an instruction for that node is
  stored (the ServerApp's Runtime API ``push-messages`` names each message's destination
  node), or once more when ``hold_s`` has passed, and answers with that result. Flower's
  handler does all the work each time: the layer never reads or writes Flower's state.
* A ``push-messages`` through the Runtime API wakes the held pulls of the nodes it
  addressed (all held pulls when the destinations cannot be read).
* A client that goes away while its pull is held is noticed (``http.disconnect``) and its
  pull is not run again, so no instruction is marked delivered to a closed connection.
* When the server shuts down (`NodeWakeups.close`, called from uvicorn's shutdown), every
  held pull is answered at once: a server waits for its open requests before it exits.
* ``hold_s`` stays well under the HTTP client timeout of Flower's SuperNode (30 s,
  ``flwr.supercore.protobuf.client``), so any Flower 1.42 node, patched or not, only sees a
  slower empty answer. pqfed's SuperNodes (`IdlePoller`) ask again at the fast interval
  after a held empty answer.

The layer sits innermost in the SuperLink's middleware stack (services/flower/patches.py,
`SuperLinkAsgiMiddleware`), after node authentication, so only authenticated pulls are held.
What Flower calls where (the paths, its protobuf request and response in the request state)
is passed in as `LongPollRoutes`; this module imports nothing from Flower and is tested
with a plain ASGI app (tests/services/flower/test_longpoll.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Flower 1.42's SuperNode gives every Fleet request this long (``ProtobufClient``'s httpx
#: timeout); a held pull must be answered well before.
FLOWER_FLEET_CLIENT_TIMEOUT_S = 30.0


class LongPollError(ValueError):
    """A long-poll setting is out of range; ``field`` names it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def check_hold(hold_s: float) -> float:
    """``hold_s`` as a float, or LongPollError: a positive number of seconds, at most half
    of `FLOWER_FLEET_CLIENT_TIMEOUT_S` (a held answer must reach the node before its client
    gives up, through two sidecars on a busy host)."""
    limit = FLOWER_FLEET_CLIENT_TIMEOUT_S / 2
    if isinstance(hold_s, bool) or not isinstance(hold_s, int | float) \
            or not 0 < hold_s <= limit:
        raise LongPollError("hold_s", f"{hold_s!r} must be a number of seconds in (0, {limit}] "
                                   f"(Flower's SuperNode gives up on a request after "
                                   f"{FLOWER_FLEET_CLIENT_TIMEOUT_S:g} s)")
    return float(hold_s)


@dataclass(frozen=True)
class LongPollRoutes:
    """Where Flower's Fleet pulls and Runtime pushes are, and how to read them.

    ``pull_node``, ``pull_empty`` and ``pushed_nodes`` read the request scope after Flower's
    protobuf translation parsed the request (``pull_node``) or after the handler ran
    (``pull_empty``, ``pushed_nodes``); ``pushed_nodes`` returns None when it cannot tell
    which nodes a push addressed.
    """

    pull_path: str
    push_path: str
    pull_node: Callable[[Scope], int | None]
    pull_empty: Callable[[Scope], bool]
    pushed_nodes: Callable[[Scope], Iterable[int] | None]


@dataclass
class LongPollStats:
    """What the layer did, for logs and tests."""

    held: int = 0          # pulls that found nothing and were held
    woken: int = 0         # held pulls run again because their node was addressed
    expired: int = 0       # held pulls answered after hold_s
    delivered: int = 0     # held pulls that were answered with an instruction
    disconnected: int = 0  # held pulls whose client went away

    def line(self) -> str:
        return (f"pqfed long poll: held {self.held}, woken {self.woken}, delivered "
                f"{self.delivered}, expired {self.expired}, disconnected {self.disconnected}")


class NodeWakeups:
    """Per-node generations: `wake` bumps a node's generation and wakes its waiters; a
    waiter that saw generation g returns at once if the node is already past g, so a push
    that lands while the handler runs is not missed. One event loop uses it."""

    def __init__(self) -> None:
        self.closing = False  # the server is shutting down: hold nothing any more
        self._epoch = 0  # bumped by wake_all: every node is past it
        self._generation: dict[int, int] = {}
        self._events: dict[int, asyncio.Event] = {}

    def generation(self, node: int) -> int:
        return self._epoch + self._generation.get(node, 0)

    def wake(self, nodes: Iterable[int]) -> None:
        for node in set(nodes):
            self._generation[node] = self._generation.get(node, 0) + 1
            event = self._events.pop(node, None)
            if event is not None:
                event.set()

    def wake_all(self) -> None:
        self._epoch += 1
        events, self._events = self._events, {}
        for event in events.values():
            event.set()

    def close(self) -> None:
        """The server is shutting down: every held pull is answered now, none is held again
        (a server waits for its open requests before it exits)."""
        self.closing = True
        self.wake_all()

    async def wait(self, node: int, seen: int, timeout_s: float) -> bool:
        """True when ``node`` was woken after generation ``seen``; False after ``timeout_s``."""
        if self.generation(node) != seen:
            return True
        event = self._events.setdefault(node, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)
        return self.generation(node) != seen


@dataclass
class _Buffered:
    """One run of the inner app: its response messages, held back until we decide."""

    messages: list[Message] = field(default_factory=list)

    @property
    def status(self) -> int | None:
        for m in self.messages:
            if m["type"] == "http.response.start":
                return int(m["status"])
        return None


class FleetLongPoll:
    """Pure ASGI: holds empty Fleet pulls (module docstring). ``hold_s``: the longest hold."""

    def __init__(self, app: App, *, hold_s: float, routes: LongPollRoutes,
                 wakeups: NodeWakeups | None = None, stats: LongPollStats | None = None,
                 report: Callable[[str], None] | None = None, report_s: float = 60.0,
                 ) -> None:
        self.app = app
        self.hold_s = check_hold(hold_s)
        self.routes = routes
        self.wakeups = wakeups if wakeups is not None else NodeWakeups()
        self.stats = stats if stats is not None else LongPollStats()
        #: Gets `LongPollStats.line` at most every ``report_s`` while pulls are held, and at
        #: the server's shutdown (the SuperLink's log).
        self.report = report
        self.report_s = report_s
        self._reported_at: float | None = None
        self._reported = ""

    def _report(self, force: bool = False) -> None:
        if self.report is None:
            return
        now = asyncio.get_running_loop().time()
        line = self.stats.line()
        due = self._reported_at is None or now - self._reported_at >= self.report_s
        if line != self._reported and (force or due):
            self.report(line)
            self._reported_at, self._reported = now, line

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        elif scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
        elif scope["path"] == self.routes.push_path:
            await self._push(scope, receive, send)
        elif scope["path"] == self.routes.pull_path:
            await self._pull(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                self._report(force=True)
            await send(message)

        await self.app(scope, receive, watch)

    async def _push(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        if status == 200:
            nodes = self.routes.pushed_nodes(scope)
            if nodes is None:
                self.wakeups.wake_all()
            else:
                self.wakeups.wake(nodes)

    async def _pull(self, scope: Scope, receive: Receive, send: Send) -> None:
        node = self.routes.pull_node(scope)
        if node is None:  # no parsed pull request (Flower refuses it below): nothing to hold
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold_s
        gone: asyncio.Task[Message] | None = None  # set once the pull is held
        waker: asyncio.Task[bool] | None = None
        try:
            while True:
                seen = self.wakeups.generation(node)
                result = await self._run(scope, body)
                if result.status != 200:
                    break
                if not self.routes.pull_empty(scope):
                    if gone is not None:
                        self.stats.delivered += 1
                    break
                remaining = deadline - loop.time()
                if remaining <= 0 or self.wakeups.closing:
                    if gone is not None:
                        self.stats.expired += 1
                    break
                if gone is None:
                    self.stats.held += 1
                    gone = asyncio.ensure_future(_disconnect(receive))
                waker = asyncio.ensure_future(self.wakeups.wait(node, seen, remaining))
                done, _ = await asyncio.wait([waker, gone], return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    waker.cancel()
                    self.stats.disconnected += 1
                    return  # nobody to answer: do not run the pull (it would mark delivery)
                if waker.result():
                    self.stats.woken += 1
            for message in result.messages:
                await send(message)
            if gone is not None:
                self._report()
        finally:
            # also when this request is cancelled (its server or client went away)
            for task in (waker, gone):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _run(self, scope: Scope, body: bytes) -> _Buffered:
        out = _Buffered()
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the app reads only the body; never here
            raise AssertionError("unreachable")

        async def collect(message: Message) -> None:
            out.messages.append(message)

        await self.app(scope, replay, collect)
        return out


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # disconnected before the body ended: the handler sees what came
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _disconnect(receive: Receive) -> Message:
    """Waits for the client to go away (the body is read: nothing else comes)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return message
