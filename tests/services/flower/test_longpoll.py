"""`FleetLongPoll` (services/flower/longpoll.py) on a plain ASGI app that keeps Flower's
contract: a pull's handler result lands in the request state, a push names its nodes.

Held pulls are answered when their node is addressed, not by another node's push, after the
hold when nothing comes, never after their client left; a push that lands while the handler
runs is not missed. The node side (`IdlePoller`) asks again at the fast interval after a held
empty answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest

from pqfed.services.flower import FlowerTuning, FlowerTuningError, IdleBackoff, IdlePoller
from pqfed.services.flower.longpoll import (
    FLOWER_FLEET_CLIENT_TIMEOUT_S,
    FleetLongPoll,
    LongPollError,
    LongPollRoutes,
    check_hold,
)

PULL, PUSH = "/v1/fleet/pull-messages", "/v1/runtime/push-messages"


class Link:
    """A SuperLink stand-in: per-node instruction queues behind Flower's request-state
    contract. ``pull_runs`` counts handler runs; ``during_pull`` runs inside the next one."""

    def __init__(self) -> None:
        self.queues: dict[int, list[str]] = {}
        self.pull_runs = 0
        self.during_pull: list[Any] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        state = scope.setdefault("state", {})
        if scope["path"] == PULL:
            self.pull_runs += 1
            queue = self.queues.setdefault(state["node"], [])
            state["response"] = queue[:1]
            del queue[:1]
            while self.during_pull:  # after the handler looked, before it answers
                self.during_pull.pop(0)()
        elif scope["path"] == PUSH:
            for node in state.get("push", []):
                self.queues.setdefault(node, []).append(body.decode())
        await send({"type": "http.response.start", "status": state.get("status", 200),
                    "headers": []})
        await send({"type": "http.response.body", "body": b""})


def routes(*, readable_push: bool = True) -> LongPollRoutes:
    def pushed(scope: Any) -> Iterable[int] | None:
        return scope["state"].get("push") if readable_push else None

    return LongPollRoutes(PULL, PUSH, pull_node=lambda s: s["state"].get("node"),
                          pull_empty=lambda s: not s["state"]["response"],
                          pushed_nodes=pushed)


class Client:
    """Drives one request through the layer; ``leave()`` disconnects it."""

    def __init__(self, app: Any, path: str, state: dict[str, Any], body: bytes = b"") -> None:
        self.scope: dict[str, Any] = {"type": "http", "method": "POST", "path": path,
                                      "state": state}
        self.sent: list[dict[str, Any]] = []
        self._body = body
        self._left = asyncio.Event()
        self._read = False
        self.task = asyncio.ensure_future(app(self.scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        if not self._read:
            self._read = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self._left.set()

    @property
    def answered(self) -> bool:
        return any(m["type"] == "http.response.body" for m in self.sent)


def pull(app: Any, node: int) -> Client:
    return Client(app, PULL, {"node": node})


def push(app: Any, nodes: list[int], text: str = "instruction") -> Client:
    return Client(app, PUSH, {"push": nodes}, text.encode())


def test_a_held_pull_is_answered_when_its_node_gets_an_instruction() -> None:
    async def go() -> None:
        link = Link()
        layer = FleetLongPoll(link, hold_s=5.0, routes=routes())
        waiting = pull(layer, 7)
        await asyncio.sleep(0.05)
        assert not waiting.answered and layer.stats.held == 1
        await push(layer, [7]).task
        await asyncio.wait_for(waiting.task, 1.0)  # long before the 5 s hold
        assert waiting.answered and waiting.scope["state"]["response"] == ["instruction"]
        assert (layer.stats.woken, layer.stats.delivered, layer.stats.expired) == (1, 1, 0)

    asyncio.run(go())


def test_another_nodes_instruction_does_not_answer_it_and_the_hold_ends_empty() -> None:
    async def go() -> None:
        link = Link()
        layer = FleetLongPoll(link, hold_s=0.3, routes=routes())
        waiting = pull(layer, 7)
        await asyncio.sleep(0.05)
        await push(layer, [8]).task
        await asyncio.sleep(0.05)
        assert not waiting.answered
        await asyncio.wait_for(waiting.task, 2.0)
        assert waiting.answered and waiting.scope["state"]["response"] == []
        assert link.pull_runs == 2  # once on arrival, once more at the end of the hold
        assert (layer.stats.expired, layer.stats.woken) == (1, 0)
        assert link.queues[8] == ["instruction"]  # node 8's instruction stays for node 8

    asyncio.run(go())


def test_an_instruction_already_there_is_answered_at_once() -> None:
    async def go() -> None:
        link = Link()
        link.queues[7] = ["ready"]
        layer = FleetLongPoll(link, hold_s=5.0, routes=routes())
        c = pull(layer, 7)
        await asyncio.wait_for(c.task, 0.5)
        assert c.scope["state"]["response"] == ["ready"] and layer.stats.held == 0

    asyncio.run(go())


def test_a_client_that_left_is_not_answered_and_its_pull_not_run_again() -> None:
    async def go() -> None:
        link = Link()
        layer = FleetLongPoll(link, hold_s=5.0, routes=routes())
        waiting = pull(layer, 7)
        await asyncio.sleep(0.05)
        waiting.leave()
        await asyncio.wait_for(waiting.task, 1.0)
        await push(layer, [7]).task
        assert not waiting.answered and layer.stats.disconnected == 1
        assert link.pull_runs == 1
        assert link.queues[7] == ["instruction"]  # not marked delivered to a closed connection

    asyncio.run(go())


def test_a_push_during_the_handler_run_is_not_missed() -> None:
    async def go() -> None:
        link = Link()
        layer = FleetLongPoll(link, hold_s=5.0, routes=routes())
        # an instruction is stored and its wake lands after the handler looked (empty) but
        # before the layer waits
        def stored() -> None:
            link.queues[7].append("late")
            layer.wakeups.wake([7])

        link.during_pull.append(stored)
        c = pull(layer, 7)
        await asyncio.wait_for(c.task, 1.0)  # not the 5 s hold
        assert c.scope["state"]["response"] == ["late"]
        assert link.pull_runs == 2 and layer.stats.woken == 1

    asyncio.run(go())


def test_a_push_whose_nodes_cannot_be_read_wakes_every_held_pull() -> None:
    async def go() -> None:
        link = Link()
        layer = FleetLongPoll(link, hold_s=5.0, routes=routes(readable_push=False))
        a, b = pull(layer, 1), pull(layer, 2)
        await asyncio.sleep(0.05)
        await push(layer, [1]).task
        await asyncio.wait_for(a.task, 1.0)
        assert a.scope["state"]["response"] == ["instruction"]
        assert not b.answered  # woken, looked, found nothing: held again
        b.leave()
        await asyncio.wait_for(b.task, 1.0)
        assert link.pull_runs == 4

    asyncio.run(go())


def test_errors_and_other_paths_pass_at_once() -> None:
    async def go() -> None:
        link = Link()
        layer = FleetLongPoll(link, hold_s=5.0, routes=routes())
        refused = Client(layer, PULL, {"node": 7, "status": 401})
        await asyncio.wait_for(refused.task, 0.5)
        assert refused.sent[0]["status"] == 401
        other = Client(layer, "/v1/fleet/send-node-heartbeat", {})
        await asyncio.wait_for(other.task, 0.5)
        assert other.answered and layer.stats.held == 0

    asyncio.run(go())


@pytest.mark.parametrize("hold", [0, -1, True, "5", FLOWER_FLEET_CLIENT_TIMEOUT_S])
def test_a_hold_outside_the_flower_clients_timeout_is_refused(hold: Any) -> None:
    with pytest.raises(LongPollError) as err:
        check_hold(hold)
    assert err.value.field == "hold_s" and "30 s" in str(err.value)
    assert check_hold(10) == 10.0


def test_the_tuning_names_the_long_poll_field() -> None:
    assert FlowerTuning(superlink_middleware="asgi", long_poll_s=10).long_poll_s == 10.0
    with pytest.raises(FlowerTuningError) as err:
        FlowerTuning(long_poll_s=10)  # the stock stack has no long-poll layer
    assert err.value.field == "long_poll_s" and "asgi" in str(err.value)
    with pytest.raises(FlowerTuningError) as err:
        FlowerTuning(superlink_middleware="asgi", long_poll_s=60)
    assert err.value.field == "long_poll_s"


def test_a_node_asks_again_at_once_after_a_held_empty_answer() -> None:
    backoff = IdleBackoff(window_s=1.0, cap_s=2.0, factor=2.0)
    p = IdlePoller(0.1, backoff, now=0.0)
    assert p.empty_poll(5.0, waited=0.01) == 0.2      # answered at once, idle: backs off
    assert p.empty_poll(6.0, waited=0.01) == 0.4
    assert p.empty_poll(16.4, waited=10.0) == 0.1     # held 10 s by the SuperLink: fast
    assert p.empty_poll(17.0, waited=0.01) == 0.2     # answered at once again: backs off


def test_flowers_requests_and_answers_are_read_as_the_layer_needs() -> None:
    """`_long_poll_routes` on flwr 1.42's own protobuf messages, where its translation
    middleware and ``ProtobufRoute`` keep them (the request state)."""
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
    from flwr.proto.message_pb2 import Message, Metadata
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PushAppMessagesRequest

    from pqfed.services.flower.patches import LONG_POLL_PULL, LONG_POLL_PUSH, _long_poll_routes

    r = _long_poll_routes()
    assert (r.pull_path, r.push_path) == (LONG_POLL_PULL[1], LONG_POLL_PUSH[1])
    pulled = {"state": {"protobuf_request": PullMessagesRequest(node=Node(node_id=7))}}
    assert r.pull_node(pulled) == 7
    assert r.pull_node({"state": {}}) is None
    pulled["state"]["protobuf_response"] = PullMessagesResponse()
    assert r.pull_empty(pulled)
    pulled["state"]["protobuf_response"] = PullMessagesResponse(
        messages_list=[Message(metadata=Metadata(dst_node_id=7))])
    assert not r.pull_empty(pulled)
    pushed = PushAppMessagesRequest(messages_list=[
        Message(metadata=Metadata(dst_node_id=n)) for n in (7, 9)])
    assert r.pushed_nodes({"state": {"protobuf_request": pushed}}) == [7, 9]
    assert r.pushed_nodes({"state": {}}) is None  # unknown: the layer wakes every held pull


def test_what_the_layer_did_is_reported_while_pulls_are_held_and_at_shutdown() -> None:
    lines: list[str] = []

    async def go() -> None:
        link = Link()
        layer = FleetLongPoll(link, hold_s=0.1, routes=routes(), report=lines.append,
                              report_s=3600)
        await asyncio.wait_for(pull(layer, 7).task, 1.0)
        await asyncio.wait_for(pull(layer, 7).task, 1.0)  # within report_s: not reported

        async def receive() -> dict[str, Any]:
            return {"type": "lifespan.shutdown"}

        async def app(scope: Any, rcv: Any, send: Any) -> None:
            await send({"type": "lifespan.shutdown.complete"})

        layer.app = app
        await layer({"type": "lifespan"}, receive, lambda m: asyncio.sleep(0))

    asyncio.run(go())
    assert lines == ["pqfed long poll: held 1, woken 0, delivered 0, expired 1, disconnected 0",
                     "pqfed long poll: held 2, woken 0, delivered 0, expired 2, disconnected 0"]


def test_shutting_down_answers_every_held_pull_and_holds_no_new_one() -> None:
    async def go() -> None:
        link = Link()
        layer = FleetLongPoll(link, hold_s=5.0, routes=routes())
        waiting = pull(layer, 7)
        await asyncio.sleep(0.05)
        layer.wakeups.close()  # uvicorn's shutdown (services/flower/patches.py)
        await asyncio.wait_for(waiting.task, 1.0)
        assert waiting.answered and waiting.scope["state"]["response"] == []
        late = pull(layer, 8)
        await asyncio.wait_for(late.task, 1.0)
        assert late.answered and layer.stats.held == 1

    asyncio.run(go())
