"""Emulated clients of the capacity benchmark (testbed/bench/capacity.py): many per process.

Each emulated client is what a real pqfed client pod puts on the wire, minus local training:

* its own enrolled identity (certificate + ML-DSA key issued by the job's CA, in its own
  identity directory) and its own outbound PQC sidecar (`pqfed.pqc.sidecar.proxy.Sidecar`,
  the production class; every client's sidecar lives in this process's one event loop), so
  every client has its own pqfed1 channel, authenticated with its own certificate, to the
  aggregator's sidecar;
* Flower's own Fleet client (`flwr.supernode.fleet_http_connection.http_request_response`,
  what `flower-supernode` runs): register/activate node, heartbeats, pull messages, pull and
  confirm the message objects, push the reply and its objects, with the same poll cap,
  pull back-off (patches.install_fast_poll) and idle back-off (`IdlePoller`, with
  ``--idle-backoff``) as pqfed's SuperNodes;
* pqfed's client mod chain unchanged (`mods.client_mods()`: model-signature check where
  required, compressed-broadcast decoding, delta + top-k/int8 with error feedback, ML-DSA
  signature bound to job, round and weight), around a training handler that does not train.

What is skipped, and why the aggregator cannot tell: the handler returns the instruction's
weights plus a delta drawn once per client (seeded by its index) instead of running SGD on
the client's partition. The aggregator never sees the partition or the training; it sees an
encoded delta of the model's shape, signed for this round by this client's certificate, and
its cost (decode, verify, aggregate) depends on the delta's size, which top-k fixes, not on
its values. The ClientApp's per-message process fork (SuperExec -> warm ClientApp zygote) is
client-side cost and is skipped as well.

`--tamper I` and `--replay I` make client I misbehave, to show the aggregator's checks run:
tamper flips one byte of the signed update after signing; replay re-sends, in every later
round, the signed update (blob and manifest) it sent in its first round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pqfed.services import IdleBackoff, IdlePoller

log = logging.getLogger("pqfed.capacity")


@dataclass
class ClientPlan:
    """One emulated client: its index, identity directory and misbehaviour (if any)."""

    index: int
    identity_dir: Path
    tamper: bool = False
    replay: bool = False
    delta: list[np.ndarray[Any, Any]] | None = None
    first_reply: Any = None  # the content of its first training reply (for --replay)
    counts: dict[str, int] = field(default_factory=lambda: {"train": 0, "errors": 0})


def start_sidecars(plans: list[ClientPlan], aggregator: str, groups: tuple[str, ...],
                   loop: asyncio.AbstractEventLoop, peer_id: str = "aggregator"
                   ) -> dict[int, int]:
    """One outbound sidecar per client, all in `loop`, to ``aggregator`` (the node
    ``peer_id``: the aggregator, or an edge); returns index -> route port."""
    from pqfed.pqc import Group
    from pqfed.pqc.sidecar.config import Endpoint, Route, SidecarConfig
    from pqfed.pqc.sidecar.metrics import SidecarMetrics
    from pqfed.pqc.sidecar.proxy import Sidecar

    metrics = SidecarMetrics()  # one registry for the process's sidecars
    peer = Endpoint.parse(aggregator, "aggregator")

    async def start_all() -> dict[int, int]:
        ports: dict[int, int] = {}
        for plan in plans:
            d = plan.identity_dir
            config = SidecarConfig(
                cert=d / "tls.crt", key=d / "tls.key", ca=d / "ca.crt",
                routes=(Route(Endpoint("127.0.0.1", 0), peer, peer_id),), admin=None,
                groups=tuple(Group[g] for g in groups), crypto_threads=1,
                reload_interval_s=3600.0)
            sidecar = Sidecar(config, metrics)
            await sidecar.start()
            ports[plan.index] = sidecar.bound["route0"]
        return ports

    return asyncio.run_coroutine_threadsafe(start_all(), loop).result()


def _train_handler(plan: ClientPlan) -> Any:
    """The handler in place of local training (module docstring)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from pqfed.services import array_record, float_arrays

    def train(msg: Message, context: Any) -> Message:
        received = time.time()
        weights = float_arrays(array_record(msg.content, "arrays"))
        if plan.delta is None:
            rng = np.random.default_rng(plan.index)
            plan.delta = [np.asarray(rng.normal(0, 0.01, w.shape), np.float32) for w in weights]
        new = [w + d for w, d in zip(weights, plan.delta, strict=True)]
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({
            "train-loss": 0.0, "num-examples": 32, "train-seconds": 0.0,
            "t-received": received, "t-replied": time.time()})}), reply_to=msg)

    return train


def _client_app(plan: ClientPlan) -> Any:
    from flwr.clientapp import ClientApp

    from pqfed.services import client_mods

    app = ClientApp(mods=client_mods())
    app.train()(_train_handler(plan))
    return app


def _misbehave(plan: ClientPlan, reply: Any) -> None:
    """--tamper / --replay: alter the signed reply as an attacker on the wire could."""
    from flwr.app import Array, ArrayRecord, RecordDict

    from pqfed.services import BLOB_KEY, UPDATE_KEY, blob_of

    if plan.replay:
        if plan.first_reply is None:
            plan.first_reply = (blob_of(reply.content), reply.content[UPDATE_KEY])
        else:
            blob, signed = plan.first_reply
            fields = dict(reply.content.items())
            fields["arrays"] = ArrayRecord({BLOB_KEY: Array(np.frombuffer(blob, np.uint8))})
            fields[UPDATE_KEY] = signed
            reply.content = RecordDict(fields)
    if plan.tamper:
        data = bytearray(blob_of(reply.content))
        data[len(data) // 2] ^= 0x01
        fields = dict(reply.content.items())
        fields["arrays"] = ArrayRecord({BLOB_KEY: Array(np.frombuffer(bytes(data), np.uint8))})
        reply.content = RecordDict(fields)


def run_client(plan: ClientPlan, port: int, spec_json_path: Path, poll: float,
               stop: threading.Event, backoff: IdleBackoff | None = None) -> None:
    """One client's Fleet loop (as flower-supernode's worker loop, with the ClientApp run in
    this thread instead of a forked process; idle polls as its `SuperNodeIdleBackoff`)."""
    from flwr.app import Context, Message, RecordDict
    from flwr.common.config import get_fused_config_from_fab
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        no_object_id_recompute,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        pull_and_inflate_object_from_tree,
        push_objects,
    )
    from flwr.supernode.fleet_http_connection import http_request_response

    del spec_json_path
    app = _client_app(plan)
    node_config: dict[str, Any] = {"partition-id": plan.index, "num-partitions": 1,
                                   "identity-dir": str(plan.identity_dir)}
    context: Context | None = None
    poller = IdlePoller(poll, backoff, time.monotonic()) if backoff is not None else None
    with http_request_response(f"127.0.0.1:{port}", insecure=True) as conn:
        node_id, receive, send, get_run, get_fab, pull_object, push_object, confirm = conn
        while not stop.is_set():
            asked = time.monotonic()
            got = receive()
            if got is None:  # a held (long) poll took the SuperLink's hold: ask again soon
                now = time.monotonic()
                stop.wait(poller.empty_poll(now, waited=now - asked) if poller else poll)
                continue
            if poller:
                poller.activity(time.monotonic())
            head, tree = got
            run_id = head.metadata.run_id
            if context is None:
                run = get_run(run_id)
                fab = get_fab(run.fab_hash, run_id)
                context = Context(run_id=run_id, node_id=node_id, node_config=node_config,
                                  state=RecordDict(),
                                  run_config=get_fused_config_from_fab(fab.content, run))
            msg = pull_and_inflate_object_from_tree(
                tree, partial(pull_object, run_id), partial(confirm, run_id),
                return_type=Message)
            msg.metadata.__dict__["_message_id"] = tree.object_id
            t0 = time.perf_counter()
            try:
                reply = app(message=msg, context=context)
            except Exception as exc:  # as the ClientApp runtime: an error reply
                from flwr.app import Error

                plan.counts["errors"] += 1
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"),
                                reply_to=msg)
            else:
                plan.counts["train"] += 1
                if reply.has_content():
                    _misbehave(plan, reply)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            with no_object_id_recompute():
                reply_tree = get_object_tree(reply)
                objects = get_all_nested_objects(reply)
                ids, session = send(reply, reply_tree, time.perf_counter() - t0)
                push_objects(objects, partial(push_object, run_id, session),
                             object_ids_to_push=ids)
            if poller:
                poller.activity(time.monotonic())


def parse_indices(text: str) -> list[int]:
    """``FIRST:COUNT`` or ``I,J,K``."""
    if ":" in text:
        first, count = (int(x) for x in text.split(":"))
        return list(range(first, first + count))
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pqfed.testbed.bench.capacity_client")
    p.add_argument("--identities", required=True, help="directory with client-<i>/ dirs")
    p.add_argument("--indices", required=True,
                   help="FIRST:COUNT, or the client indices comma-separated")
    p.add_argument("--aggregator", required=True,
                   help="the sidecar the clients dial (aggregator's or edge's), HOST:PORT")
    p.add_argument("--peer-id", default="aggregator",
                   help="node id that sidecar must prove (aggregator, or edge-<e>)")
    p.add_argument("--group", default="X25519_MLKEM768")
    p.add_argument("--poll", type=float, default=0.1,
                   help="Fleet poll interval (pqfed SuperNodes: 0.1 s)")
    p.add_argument("--idle-backoff", default=None, metavar="WINDOW,CAP,FACTOR",
                   help="idle polls back off as pqfed's SuperNodes (FlowerTuning.idle_backoff);"
                        " without it every empty poll waits --poll")
    p.add_argument("--tamper", type=int, action="append", default=[])
    p.add_argument("--replay", type=int, action="append", default=[])
    p.add_argument("--spec", default="", help="(unused) the job spec")
    p.add_argument("--stagger", type=float, default=0.01,
                   help="seconds between client starts (connection ramp-up)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pqfed.services import install_fast_poll

    install_fast_poll(args.poll)  # what `pqfed fl client` runs its SuperNode with
    backoff = IdleBackoff.from_arg(args.idle_backoff) if args.idle_backoff else None
    base = Path(args.identities)
    plans = [ClientPlan(i, base / f"client-{i}", tamper=i in args.tamper,
                        replay=i in args.replay) for i in parse_indices(args.indices)]
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True, name="sidecars").start()
    ports = start_sidecars(plans, args.aggregator, (args.group,), loop, args.peer_id)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = []
    for plan in plans:
        t = threading.Thread(target=_guarded, args=(plan, ports[plan.index], Path(args.spec),
                                                    args.poll, stop, backoff),
                             daemon=True, name=f"client-{plan.index}")
        t.start()
        threads.append(t)
        time.sleep(args.stagger)
    print(json.dumps({"ready": len(plans)}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while not stop.is_set() and any(t.is_alive() for t in threads):
            stop.wait(0.5)
    stop.set()
    print(json.dumps({"counts": {p.index: p.counts for p in plans}}), flush=True)
    return 0


def _guarded(plan: ClientPlan, port: int, spec: Path, poll: float,
             stop: threading.Event, backoff: IdleBackoff | None) -> None:
    try:
        run_client(plan, port, spec, poll, stop, backoff)
    except BaseException as exc:  # a client thread reports and ends (SystemExit too)
        if not stop.is_set():
            log.error("client-%d ended: %s: %s", plan.index, type(exc).__name__, exc)


if __name__ == "__main__":
    raise SystemExit(main())
