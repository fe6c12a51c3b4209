"""Hierarchical edge aggregation (services/edge.py) with real Flower messages, real training and
real ML-DSA: edges verify their clients, the centre accepts only edges, the socket framing is
strict, an edge cannot alter or replay the model its clients train from, and a hierarchical
job trains as well as a flat one while the centre receives less."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

from pqfed.pqc.audit import AuditLog, verify_audit_log
from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.pqc.signing import ModelRejected, sign_model
from pqfed.services import clientapp, edge, hierarchy, records, serverapp
from pqfed.services.downlink import weights_digest
from pqfed.services.models import build_model, get_weights
from pqfed.services.rounds import RoundRecorder, read_status
from pqfed.services.simulation import InProcessGrid, simulate
from pqfed.services.spec import parse_spec

SPEC = parse_spec({"task": "breast-cancer", "clients": 4, "minClients": 2, "rounds": 2,
                   "hierarchy": {"enabled": True, "edges": 2},
                   "compression": {"method": "topk+int8", "topkFraction": 0.2}})


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1


def _identity_dir(tmp: Path, ca: CertificateAuthority, ident: Identity) -> str:
    d = tmp / ident.certificate.node_id
    d.mkdir(parents=True, exist_ok=True)
    ident.save(d / "tls.crt", d / "tls.key")
    (d / "ca.crt").write_text(ca.root.to_pem())
    return str(d)


def _context(tmp: Path, ca: CertificateAuthority, ident: Identity, pid: int) -> Context:
    return Context(run_id=1, node_id=100 + pid, state=RecordDict(),
                   node_config={"partition-id": pid,
                                "identity-dir": _identity_dir(tmp, ca, ident),
                                records.MODEL_SIGNER_KEY: "aggregator"},
                   run_config={"spec": SPEC.model_dump_json(by_alias=True), "job": "job-h"})


_SIGNERS: dict[int, Identity] = {}


def _model_sig(ca: CertificateAuthority, weights: list[np.ndarray], rnd: int,
               epoch: bytes = b"\x05" * 8) -> bytes:
    """The central aggregator's signature over the round's model."""
    signer = _SIGNERS.setdefault(id(ca), ca.new_identity("aggregator", Role.AGGREGATOR))
    return sign_model(signer, "job-h", epoch, rnd, rnd, weights_digest(weights)).to_bytes()


def _signed_reply(tmp: Path, ca: CertificateAuthority, ident: Identity, pid: int) -> Message:
    weights = get_weights(build_model("breast-cancer", seed=0))
    msg = Message(RecordDict({"arrays": ArrayRecord(weights),
                              "config": ConfigRecord({"round": 1}),
                              records.MODEL_SIG_KEY: ConfigRecord(
                                  {"signed": _model_sig(ca, weights, 1)})}),
                  dst_node_id=100 + pid, message_type=MessageType.TRAIN)
    return clientapp.client_app(msg, _context(tmp, ca, ident, pid))


def test_membership_covers_every_client_once() -> None:
    spec = parse_spec({"clients": 7, "minClients": 2, "hierarchy": {"enabled": True,
                                                                    "edges": 3}})
    groups = [hierarchy.edge_members(spec, e) for e in range(3)]
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_socket_framing_round_trip_and_limits() -> None:
    a, b = socket.socketpair()
    with a, b:
        weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.float32)]
        edge.send_frame(a, {"round": 3}, edge.pack_weights(weights))
        header, payload = edge.recv_frame(b)
        assert header == {"round": 3}
        assert all(np.array_equal(x, y) for x, y in
                   zip(edge.unpack_weights(payload), weights, strict=True))
        a.sendall((edge.MAX_HEADER + 1).to_bytes(4, "big"))
        with pytest.raises(ValueError, match="header"):
            edge.recv_frame(b)
    c, d = socket.socketpair()
    with c, d:
        head = json.dumps([1, 2]).encode()
        c.sendall(len(head).to_bytes(4, "big") + head + (0).to_bytes(4, "big"))
        with pytest.raises(ValueError, match="JSON object"):
            edge.recv_frame(d)
    # The payload loader never unpickles (object arrays would execute code on load).
    buf = io.BytesIO()
    np.savez(buf, np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        edge.unpack_weights(buf.getvalue())


def test_unreachable_edge_is_an_edge_round_error(tmp_path: Path) -> None:
    with pytest.raises(edge.EdgeRoundError, match="unreachable"):
        edge.request_edge_round(tmp_path / "nope.sock", 1, [np.zeros(2, np.float32)], {}, 0.2,
                                b"")


def test_edge_accepts_only_its_ca_clients_and_counts_them(
        tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority) -> None:
    contexts = {
        100: _context(tmp_path, ca, ca.new_identity("client-0", Role.CLIENT), 0),
        101: _context(tmp_path, ca, ca.new_identity("client-1", Role.CLIENT), 1),
        # an edge certificate may not sign client updates, nor may a foreign CA's client
        102: _context(tmp_path, ca, ca.new_identity("edge-9", Role.EDGE), 2),
        # (it trusts our CA's models, but its own certificate is another CA's)
        103: _context(tmp_path / "x", ca, other_ca.new_identity("client-3", Role.CLIENT), 3),
    }
    ident = ca.new_identity("edge-0", Role.EDGE)
    audit = AuditLog(tmp_path / "edge-audit.jsonl", ident)
    agg = edge.EdgeAggregator(InProcessGrid(contexts), SPEC, "job-h", trust=ca.trust,
                              recorder=RoundRecorder(tmp_path / "edge", "job-h", SPEC),
                              audit=audit)
    start = get_weights(build_model("breast-cancer", seed=0))
    weights, metrics = agg.run_round(5, start, {}, 60.0, _model_sig(ca, start, 5))
    assert metrics["clients"] == 2 and metrics["rejected"] == 2
    assert metrics["num-examples"] > 0
    assert any(not np.array_equal(w, s) for w, s in zip(weights, start, strict=True))
    st = read_status(tmp_path / "edge")
    assert st is not None and st["currentRound"] == 5
    assert sorted(st["rounds"][0]["participants"]) == ["client-0", "client-1"]
    assert "accuracy" not in st["rounds"][0]  # the centre evaluates, not the edge
    events = verify_audit_log(tmp_path / "edge-audit.jsonl", ca.trust).events
    assert events == {"update-accepted": 2, "update-rejected": 2}
    # nothing valid -> an error for the centre, not an empty aggregate
    bad = edge.EdgeAggregator(InProcessGrid({102: contexts[102]}), SPEC, "job-h",
                              trust=ca.trust, audit=None,
                              recorder=RoundRecorder(tmp_path / "edge2", "job-h", SPEC))
    with pytest.raises(edge.EdgeRoundError, match="fewer than minClients"):
        bad.run_round(6, start, {}, 60.0, _model_sig(ca, start, 6))


def test_clients_refuse_a_model_their_edge_altered_or_replayed(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    """The edge forwards the central aggregator's signature; a model it changed, or an older
    signed model it replays, is refused by the clients before training (the in-process grid
    raises the client's error; Flower turns it into an error reply)."""
    contexts = {100 + i: _context(tmp_path, ca, ca.new_identity(f"client-{i}", Role.CLIENT), i)
                for i in range(2)}
    agg = edge.EdgeAggregator(InProcessGrid(contexts), SPEC, "job-h", trust=ca.trust,
                              recorder=RoundRecorder(tmp_path / "edge", "job-h", SPEC),
                              audit=None)
    start = get_weights(build_model("breast-cancer", seed=0))
    altered = [w.copy() for w in start]
    altered[-1] += 0.25  # e.g. a backdoored bias
    with pytest.raises(ModelRejected, match="altered in transit"):
        agg.run_round(1, altered, {}, 60.0, _model_sig(ca, start, 1))
    # the genuine round-2 model: both clients train and count
    _, metrics = agg.run_round(2, start, {}, 60.0, _model_sig(ca, start, 2))
    assert metrics["clients"] == 2 and metrics["rejected"] == 0
    with pytest.raises(ModelRejected, match="replayed"):  # round 1's model, relabelled
        agg.run_round(3, start, {}, 60.0, _model_sig(ca, start, 1))
    with pytest.raises(ModelRejected, match="replayed"):  # round 2's model again
        agg.run_round(2, start, {}, 60.0, _model_sig(ca, start, 2))
    # an edge signing the model itself is not the pinned central aggregator
    own = sign_model(ca.new_identity("edge-0", Role.EDGE), "job-h", b"\x05" * 8, 3, 3,
                     weights_digest(altered)).to_bytes()
    with pytest.raises(ModelRejected, match="certificate"):
        agg.run_round(3, altered, {}, 60.0, own)


def test_an_edge_counts_each_client_certificate_once(tmp_path: Path,
                                                     ca: CertificateAuthority) -> None:
    """Client-0 behind two Flower node ids at its edge: one update of it is aggregated."""
    c0 = ca.new_identity("client-0", Role.CLIENT)
    contexts = {100: _context(tmp_path, ca, c0, 0), 101: _context(tmp_path, ca, c0, 2),
                102: _context(tmp_path, ca, ca.new_identity("client-1", Role.CLIENT), 1)}
    agg = edge.EdgeAggregator(InProcessGrid(contexts), SPEC, "job-h", trust=ca.trust,
                              recorder=RoundRecorder(tmp_path / "edge", "job-h", SPEC),
                              audit=None)
    start = get_weights(build_model("breast-cancer", seed=0))
    _, metrics = agg.run_round(1, start, {}, 60.0, _model_sig(ca, start, 1))
    assert metrics["clients"] == 2 and metrics["rejected"] == 1


@pytest.mark.parametrize(("roles", "signer", "accepted"), [
    ((Role.EDGE,), Role.CLIENT, False),  # hierarchical centre: a client may not bypass its edge
    ((Role.EDGE,), Role.EDGE, True),
    ((Role.CLIENT,), Role.EDGE, False),  # flat centre (and an edge's own clients)
])
def test_centre_checks_the_signer_role(tmp_path: Path, ca: CertificateAuthority,
                                       aggregator: Identity, roles: tuple[Role, ...],
                                       signer: Role, accepted: bool) -> None:
    s = serverapp.VerifiedStrategy(FedAvg(), trust=ca.trust, job="job-h",
                              recorder=RoundRecorder(tmp_path / "state", "job-h", SPEC),
                              audit=None, round_offset=0, min_clients=1, roles=roles)
    s._global = [np.asarray(w) for w in get_weights(build_model("breast-cancer", seed=0))]
    reply = _signed_reply(tmp_path, ca, ca.new_identity(f"node-{signer.name.lower()}",
                                                        signer), 0)
    arrays, _ = s.aggregate_train(1, [reply])
    assert (arrays is not None) is accepted
    rec = s.recorder._open[1]
    assert rec.rejected_updates == (0 if accepted else 1)
    if not accepted:
        assert "role" in " ".join(rec.notes).lower()


def test_hierarchical_federation_matches_flat_with_less_central_traffic() -> None:
    base = {"task": "breast-cancer", "clients": 6, "minClients": 3, "rounds": 3,
            "compression": {"method": "topk+int8"}}
    flat = simulate(parse_spec(base))
    hier = simulate(parse_spec({**base, "hierarchy": {"enabled": True, "edges": 2}}))
    assert hier["phase"] == "Succeeded"
    for r in hier["rounds"]:
        assert sorted(r["participants"]) == ["edge-0", "edge-1"]
    # the centre receives one update per edge instead of one per client
    assert hier["rounds"][-1]["bytesReceived"] * 2 < flat["rounds"][-1]["bytesReceived"]
    assert hier["accuracy"] > 0.9 and hier["accuracy"] > flat["accuracy"] - 0.05


def test_an_edge_refuses_a_revoked_clients_update(tmp_path: Path,
                                                  ca: CertificateAuthority) -> None:
    """The edge ServerApp's aggregator (open_edge) checks client updates against the newest
    revocation list in its identity directory: once the CA revokes client-1 mid-job, the
    edge rejects client-1's update and audits why."""
    c0, c1 = ca.new_identity("client-0", Role.CLIENT), ca.new_identity("client-1", Role.CLIENT)
    contexts = {100: _context(tmp_path, ca, c0, 0), 101: _context(tmp_path, ca, c1, 1)}
    edge_dir = Path(_identity_dir(tmp_path, ca, ca.new_identity("edge-0", Role.EDGE)))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={
        "spec": SPEC.model_dump_json(by_alias=True), "job": "job-h",
        "state-dir": str(tmp_path / "edge"), "identity-dir": str(edge_dir),
        records.EDGE_SOCKET_KEY: str(tmp_path / "edge.sock")})
    agg, audit = edge.open_edge(InProcessGrid(contexts), context)
    start = get_weights(build_model("breast-cancer", seed=0))
    _, metrics = agg.run_round(1, start, {}, 60.0, _model_sig(ca, start, 1))
    assert metrics["clients"] == 2 and metrics["rejected"] == 0
    (edge_dir / "crl.pem").write_text(ca.revoke(None, c1.certificate.serial).to_pem())
    time.sleep(1.1)  # the trust store re-reads the list at most once a second
    _, metrics = agg.run_round(2, start, {}, 60.0, _model_sig(ca, start, 2))
    assert metrics["clients"] == 1 and metrics["rejected"] == 1
    entries = [json.loads(x) for x in audit.path.read_text().splitlines()]
    (rejected,) = [e for e in entries if e["event"] == "update-rejected"]
    assert rejected["round"] == 2 and "revoked" in rejected["reason"]
    assert verify_audit_log(audit.path, ca.trust).events["update-accepted"] == 3
