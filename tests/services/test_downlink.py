"""Compressed model broadcasts (services/downlink.py): nodes reconstruct exactly what the
aggregator published from whatever version they hold; anything that does not fit is refused;
server-side error feedback keeps the public model converging to the server's model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pqfed.services import downlink
from pqfed.services.compression import Method
from pqfed.services.downlink import BASE, Broadcast, Broadcaster, DownlinkError, Held, apply
from pqfed.services.spec import parse_spec


def _model(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(size=(40, 30)).astype(np.float32), rng.normal(size=30).astype(np.float32)]


def _drift(weights: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    return [w + 0.05 * rng.normal(size=w.shape).astype(np.float32) for w in weights]


def test_nodes_follow_the_public_model_from_any_version() -> None:
    rng = np.random.default_rng(0)
    target = _model(rng)
    template = [np.zeros_like(t) for t in target]
    b = Broadcaster(Method.TOPK_INT8, 0.1)
    b.advance(target)
    always = apply(b.broadcast_for(1), None, template)  # node 1: every round
    b.ack(1)
    first = b.broadcast_for(1)
    assert first.steps[0].start == BASE
    late: Held | None = None
    for rnd in range(1, 6):
        target = _drift(target, rng)
        b.advance(target)
        msg = Broadcast.from_bytes(b.broadcast_for(1).to_bytes())
        assert [s.start for s in msg.steps] == [rnd - 1]  # one step for an up-to-date node
        always = apply(msg, always, template)
        b.ack(1)
        if rnd == 2:  # node 2 joins at round 2 and then misses rounds 3 and 4
            late = apply(b.broadcast_for(2), None, template)
            b.ack(2)
    assert late is not None and late.version == 2
    catch_up = b.broadcast_for(2)
    assert [s.start for s in catch_up.steps] == [2, 3, 4]  # only what it lacks
    late = apply(catch_up, late, template)
    assert b.public is not None
    for held in (always, late):
        assert held.version == b.version == 5
        assert all(np.array_equal(h, p) for h, p in zip(held.weights, b.public, strict=True))
    # a node whose reply was lost (server still thinks version 2) applied the steps already:
    # the overlap is skipped, not applied twice
    b.acked[1] = 2
    again = apply(b.broadcast_for(1), always, template)
    assert all(np.array_equal(h, p) for h, p in zip(again.weights, b.public, strict=True))


def test_broadcasts_are_much_smaller_than_the_dense_model() -> None:
    rng = np.random.default_rng(1)
    target = _model(rng)
    dense = sum(t.nbytes for t in target)
    b = Broadcaster(Method.TOPK_INT8, 0.1)
    b.advance(target)
    assert len(b.broadcast_for(1).to_bytes()) < dense * 0.3  # int8 base
    b.ack(1)
    b.advance(_drift(target, rng))
    assert len(b.broadcast_for(1).to_bytes()) < dense * 0.1  # top-k 10% + int8 step


def test_error_feedback_converges_to_the_target() -> None:
    rng = np.random.default_rng(2)
    target = _model(rng)
    b = Broadcaster(Method.TOPK_INT8, 0.1)
    errors = []
    for _ in range(40):
        public = b.advance(target)
        errors.append(sum(float(np.abs(t - p).max()) for t, p in zip(target, public,
                                                                       strict=True)))
    assert errors[-1] < errors[0] * 0.05


def test_unknown_nodes_get_the_whole_model_after_pruning() -> None:
    rng = np.random.default_rng(3)
    target = _model(rng)
    b = Broadcaster(Method.TOPK_INT8, 0.5)
    for _ in range(30):
        target = _drift(target, rng)
        b.advance(target)
    assert 1 not in b.steps  # history beyond two models' size was dropped
    full = b.broadcast_for(99)
    assert len(full.steps) == 1 and full.steps[0].start == BASE
    held = apply(full, None, [np.zeros_like(t) for t in target])
    assert held.version == b.version


def test_mismatched_or_tampered_broadcasts_are_refused() -> None:
    rng = np.random.default_rng(4)
    target = _model(rng)
    template = [np.zeros_like(t) for t in target]
    b = Broadcaster(Method.TOPK_INT8, 0.1)
    b.advance(target)
    held = apply(b.broadcast_for(1), None, template)
    b.ack(1)
    b.advance(_drift(target, rng))
    step = b.broadcast_for(1)
    with pytest.raises(DownlinkError, match="does not hold"):
        apply(step, None, template)  # a continuation for a node without a model
    other_epoch = dataclasses.replace(held, epoch=b"\x00" * 8)
    with pytest.raises(DownlinkError, match="does not hold"):
        apply(step, other_epoch, template)  # a model of a previous aggregator incarnation
    with pytest.raises(DownlinkError, match="starts at version"):
        apply(step, dataclasses.replace(held, version=7), template)
    blob = bytearray(step.steps[0].blob)
    blob[-1] ^= 0x01  # one quantized value changed
    bad = dataclasses.replace(step, steps=(dataclasses.replace(step.steps[0],
                                                               blob=bytes(blob)),))
    with pytest.raises(DownlinkError, match="digest"):
        apply(bad, held, template)
    data = step.to_bytes()
    for broken in (data[:-1], data + b"\x00", b"PQM0" + data[4:], data[:40]):
        with pytest.raises(DownlinkError):
            Broadcast.from_bytes(broken)


def test_spec_switches_the_downlink() -> None:
    assert downlink.for_spec(parse_spec({})) is None  # no compression: dense broadcasts
    on = parse_spec({"compression": {"method": "topk+int8"}})
    assert isinstance(downlink.for_spec(on), Broadcaster)
    off = parse_spec({"compression": {"method": "topk+int8", "downlink": False}})
    assert downlink.for_spec(off) is None


def test_federation_with_compressed_broadcasts_trains() -> None:
    from pqfed.services.simulation import simulate

    base = {"task": "breast-cancer", "clients": 4, "minClients": 2, "rounds": 4,
            "compression": {"method": "topk+int8"}}
    dense = simulate(parse_spec({**base, "compression": {"method": "topk+int8",
                                                         "downlink": False}}))
    comp = simulate(parse_spec(base))
    assert comp["phase"] == "Succeeded" and comp["accuracy"] > 0.9
    assert all(not r["notes"] for r in comp["rounds"])  # no node had to be resent anything
    later = [r["bytesSent"] for r in comp["rounds"][1:]]
    assert max(later) < 0.15 * dense["rounds"][-1]["bytesSent"]


def test_a_node_that_lost_its_model_gets_it_whole_next_round(tmp_path: Path) -> None:
    """A node whose state is gone (same node id) cannot apply a step: it answers with an
    error, the aggregator forgets what it held, and the next broadcast is the whole model."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from pqfed.pqc.identity import CertificateAuthority, Role
    from pqfed.services import clientapp, serverapp
    from pqfed.services.models import build_model, get_weights
    from pqfed.services.rounds import RoundRecorder
    from pqfed.services.simulation import InProcessGrid

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    spec = parse_spec({"clients": 2, "minClients": 1, "compression": {"method": "topk+int8"}})
    ca = CertificateAuthority.generate("fed-dl")
    contexts = {}
    for i in range(2):
        d = tmp_path / f"client-{i}"
        d.mkdir()
        ca.new_identity(f"client-{i}", Role.CLIENT).save(d / "tls.crt", d / "tls.key")
        (d / "ca.crt").write_text(ca.root.to_pem())
        contexts[100 + i] = Context(run_id=1, node_id=100 + i, state=RecordDict(),
                                    node_config={"partition-id": i, "identity-dir": str(d)},
                                    run_config={"spec": spec.model_dump_json(by_alias=True),
                                                "job": "job-dl"})
    grid = InProcessGrid(contexts)
    b = Broadcaster(Method.TOPK_INT8, 0.1)
    strategy = serverapp.VerifiedStrategy(
        FedAvg(1.0, 0.0, 1, 0, 1), trust=ca.trust, job="job-dl", audit=None, round_offset=0,
        min_clients=1, recorder=RoundRecorder(tmp_path / "state", "job-dl", spec), downlink=b,
        model_signer=ca.new_identity("aggregator", Role.AGGREGATOR))
    arrays = ArrayRecord(get_weights(build_model("breast-cancer", seed=0)))

    def round_(rnd: int, arrays: ArrayRecord, lost: bool = False
               ) -> tuple[ArrayRecord, dict[int, Broadcast]]:
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        sent = {m.metadata.dst_node_id: Broadcast.from_bytes(
            m.content["arrays"]["blob"].numpy().tobytes()) for m in msgs}
        replies = []
        for m in msgs:
            node = m.metadata.dst_node_id
            if lost and node == 100:
                contexts[100].state = RecordDict()  # the node's model is gone
                with pytest.raises(DownlinkError, match="does not hold"):
                    clientapp.client_app(m, contexts[100])
                replies.append(Message(Error(0, "broadcast does not fit"), reply_to=m))
            else:
                replies.append(clientapp.client_app(m, contexts[node]))
        new, _ = strategy.aggregate_train(rnd, replies)
        assert new is not None
        return new, sent

    arrays, sent = round_(1, arrays)
    assert all(s.steps[0].start == BASE for s in sent.values()) and set(b.acked) == {100, 101}
    arrays, sent = round_(2, arrays, lost=True)
    assert all(s.steps[0].start != BASE for s in sent.values())  # both were sent one step
    assert set(b.acked) == {101}  # node 100 answered with an error: forgotten
    arrays, sent = round_(3, arrays)
    assert sent[100].steps[0].start == BASE and sent[101].steps[0].start != BASE
    assert set(b.acked) == {100, 101}
