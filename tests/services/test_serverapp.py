"""The ClientApp/ServerApp logic on real Flower messages, real training and real ML-DSA:
a signed, compressed update is accepted; tampered, replayed or foreign ones are rejected and
audited; a round below minClients keeps the global model; one certified node gets one vote per
round whatever Flower node ids it uses; the weight is the signed one; nodes train only on a
model the central aggregator signed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

from pqfed.pqc.audit import AuditLog, verify_audit_log
from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.pqc.signing import ModelRejected, SignedModel, SignedUpdate, sign_model
from pqfed.services import clientapp, identity_dir, records, serverapp
from pqfed.services.downlink import weights_digest
from pqfed.services.models import build_model, get_weights
from pqfed.services.records import MODEL_SIGNER_KEY
from pqfed.services.rounds import RoundRecorder
from pqfed.services.simulation import InProcessGrid
from pqfed.services.spec import parse_spec

SPEC = parse_spec({"task": "breast-cancer", "clients": 3, "minClients": 2, "rounds": 2,
                   "compression": {"method": "topk+int8", "topkFraction": 0.2}})


def _identity_dir(tmp: Path, ca: CertificateAuthority, ident: Identity) -> str:
    d = tmp / ident.certificate.node_id
    d.mkdir(parents=True, exist_ok=True)
    ident.save(d / "tls.crt", d / "tls.key")
    (d / "ca.crt").write_text(ca.root.to_pem())
    return str(d)


_SIGNERS: dict[int, Identity] = {}
EPOCH = b"\x07" * 8


def _model_sig(ca: CertificateAuthority, weights: list[np.ndarray], rnd: int, job: str,
               epoch: bytes = EPOCH) -> ConfigRecord:
    """What the central aggregator attaches: its signature over the round's model."""
    signer = _SIGNERS.setdefault(id(ca), ca.new_identity("aggregator", Role.AGGREGATOR))
    signed = sign_model(signer, job, epoch, rnd, rnd, weights_digest(weights))
    return ConfigRecord({"signed": signed.to_bytes()})


def _train_msg(ca: CertificateAuthority, weights: list[np.ndarray], pid: int, rnd: int = 1,
               job: str = "job-a") -> Message:
    return Message(RecordDict({"arrays": ArrayRecord(weights),
                               "config": ConfigRecord({"round": rnd}),
                               records.MODEL_SIG_KEY: _model_sig(ca, weights, rnd, job)}),
                   dst_node_id=100 + pid, message_type=MessageType.TRAIN)


def _context(tmp: Path, ca: CertificateAuthority, ident: Identity, pid: int,
             job: str = "job-a") -> Context:
    return Context(run_id=1, node_id=100 + pid,
                   node_config={"partition-id": pid,
                                "identity-dir": _identity_dir(tmp, ca, ident),
                                MODEL_SIGNER_KEY: "aggregator"},
                   state=RecordDict(),
                   run_config={"spec": SPEC.model_dump_json(by_alias=True), "job": job})


def _train_reply(tmp: Path, ca: CertificateAuthority, ident: Identity, pid: int,
                 rnd: int = 1, job: str = "job-a") -> tuple[Message, list[np.ndarray]]:
    weights = get_weights(build_model("breast-cancer", seed=0))
    msg = _train_msg(ca, weights, pid, rnd, job)
    return clientapp.client_app(msg, _context(tmp, ca, ident, pid, job)), weights


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # What flwr-serverapp sets in its process before messages are created.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 1


@pytest.fixture
def strategy(tmp_path: Path, ca: CertificateAuthority,
             aggregator: Identity) -> serverapp.VerifiedStrategy:
    s = serverapp.VerifiedStrategy(FedAvg(), trust=ca.trust, job="job-a",
                              recorder=RoundRecorder(tmp_path / "state", "job-a", SPEC),
                              audit=AuditLog(tmp_path / "audit.jsonl", aggregator),
                              round_offset=0, min_clients=2)
    s._global = [np.asarray(w) for w in get_weights(build_model("breast-cancer", seed=0))]
    return s


def test_signed_compressed_updates_are_verified_and_aggregated(
        tmp_path: Path, ca: CertificateAuthority, strategy: serverapp.VerifiedStrategy,
        aggregator: Identity) -> None:
    replies = [_train_reply(tmp_path, ca, ca.new_identity(f"client-{i}", Role.CLIENT), i)[0]
               for i in range(3)]
    blob_sizes = [r.content["arrays"]["blob"].numpy().nbytes for r in replies]
    dense = sum(w.nbytes for w in strategy._global)
    assert all(b < dense * 0.5 for b in blob_sizes)  # top-k 20% + int8 is far smaller
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert len(arrays.to_numpy_ndarrays()) == len(strategy._global)
    rec = strategy.recorder._open[1]
    assert sorted(rec.participants) == ["client-0", "client-1", "client-2"]
    assert rec.rejected_updates == 0 and rec.crypto_seconds > 0
    summary = verify_audit_log(tmp_path / "audit.jsonl", ca.trust)
    assert summary.events == {"update-accepted": 3}


def _tamper_blob(m: Message) -> None:
    blob = bytearray(m.content["arrays"]["blob"].numpy().tobytes())
    blob[-1] ^= 1
    m.content["arrays"] = ArrayRecord({"blob": Array(np.frombuffer(bytes(blob), dtype=np.uint8))})


def test_tampered_replayed_and_foreign_updates_are_rejected(
        tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority,
        strategy: serverapp.VerifiedStrategy) -> None:
    good, _ = _train_reply(tmp_path, ca, ca.new_identity("client-0", Role.CLIENT), 0)
    tampered, _ = _train_reply(tmp_path, ca, ca.new_identity("client-1", Role.CLIENT), 1)
    _tamper_blob(tampered)
    replayed, _ = _train_reply(tmp_path, ca, ca.new_identity("client-2", Role.CLIENT), 2, rnd=7)
    foreign, _ = _train_reply(tmp_path / "x", other_ca,
                              other_ca.new_identity("client-2", Role.CLIENT), 2)
    unsigned, _ = _train_reply(tmp_path, ca, ca.new_identity("client-2", Role.CLIENT), 2)
    del unsigned.content[records.UPDATE_KEY]
    arrays, _ = strategy.aggregate_train(1, [good, tampered, replayed, foreign, unsigned])
    assert arrays is None  # one valid update < minClients=2: the global model is kept
    rec = strategy.recorder._open[1]
    assert rec.rejected_updates == 4 and rec.participants == ["client-0"]
    assert not rec.aggregated
    reasons = " ".join(rec.notes)
    assert "tampered" in reasons and "replayed" in reasons and "certificate" in reasons
    events = verify_audit_log(tmp_path / "audit.jsonl", ca.trust).events
    assert events == {"update-accepted": 1, "update-rejected": 4}


def test_round_records_checkpoint_and_resume(tmp_path: Path) -> None:
    rec = RoundRecorder(tmp_path, "job-a", SPEC)
    weights = get_weights(build_model("breast-cancer", seed=0))
    rec.start_round(1, bytes_sent=1000)
    rec.note_update(1, "client-0", 400)
    out = rec.evaluate(1, ArrayRecord(weights))
    assert 0.0 <= float(out["accuracy"]) <= 1.0
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["currentRound"] == 1 and status["rounds"][0]["bytesReceived"] == 400
    done, ckpt = RoundRecorder(tmp_path, "job-a", SPEC).resume()
    assert done == 1 and ckpt is not None
    assert all(np.array_equal(a, b) for a, b in zip(ckpt, weights, strict=True))
    assert RoundRecorder(tmp_path, "other-job", SPEC).resume() == (0, None)


def test_privacy_budget_limits_rounds() -> None:
    from pqfed.services.rounds import epsilon_after

    spec = parse_spec({"clients": 3, "rounds": 50, "privacy": {
        "enabled": True, "noiseMultiplier": 1.0, "targetEpsilon": 8.0}})
    rec = RoundRecorder(Path("/tmp/pqfed-test-dp"), "j", spec)
    allowed = rec.rounds_allowed()
    assert 0 < allowed < 50
    assert epsilon_after(spec, allowed) <= 8.0 < epsilon_after(spec, allowed + 1)  # type: ignore[operator]


def test_local_dp_splits_epsilon_and_delta_over_the_rounds() -> None:
    """Each round gets targetEpsilon/rounds and delta/rounds, so the job's guarantee (basic
    composition) is (targetEpsilon, delta); before, every round spent the whole delta."""
    from pqfed.services.rounds import epsilon_after, local_dp_budget

    spec = parse_spec({"clients": 3, "rounds": 10, "privacy": {
        "enabled": True, "mode": "local", "targetEpsilon": 8.0, "delta": 1e-5}})
    eps, delta = local_dp_budget(spec)
    assert eps == pytest.approx(0.8) and delta == pytest.approx(1e-6)
    assert epsilon_after(spec, 10) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="privacy.targetEpsilon"):  # no silent 1.0
        parse_spec({"clients": 3, "rounds": 10, "privacy": {"enabled": True, "mode": "local"}})


# ---- one vote per certified node and round (Sybil SuperNodes) -------------------------------

def test_a_node_gets_one_update_per_round_whatever_it_sends(
        tmp_path: Path, ca: CertificateAuthority, strategy: serverapp.VerifiedStrategy) -> None:
    """Client-0 replies three times in round 1 (the same update twice, and a different one as
    if from a second SuperNode): only its first update counts, the others are rejected,
    logged and audited; so client-0 alone cannot reach minClients=2."""
    c0 = ca.new_identity("client-0", Role.CLIENT)
    first, _ = _train_reply(tmp_path, ca, c0, 0)
    weights = get_weights(build_model("breast-cancer", seed=0))
    again = Message(first.content, reply_to=_train_msg(ca, weights, 0))  # the same bytes
    other, _ = _train_reply(tmp_path, ca, c0, 1)  # other data, same certificate
    arrays, _ = strategy.aggregate_train(1, [first, again, other])
    assert arrays is None  # one vote < minClients=2: the global model is kept
    rec = strategy.recorder._open[1]
    assert rec.participants == ["client-0"] and rec.rejected_updates == 2
    assert strategy.accepted_clients == 1
    assert sum("second update" in n for n in rec.notes) == 2
    events = verify_audit_log(tmp_path / "audit.jsonl", ca.trust).events
    assert events == {"update-accepted": 1, "update-rejected": 2}


def test_two_supernodes_of_one_client_count_once(tmp_path: Path,
                                                 ca: CertificateAuthority) -> None:
    """One enrolled client behind two Flower node ids (two SuperNodes on its route) next to
    one honest client: minClients=3 is not met, and the round aggregates two updates."""
    c0, c1 = ca.new_identity("client-0", Role.CLIENT), ca.new_identity("client-1", Role.CLIENT)
    contexts = {100: _context(tmp_path, ca, c0, 0), 101: _context(tmp_path, ca, c0, 2),
                102: _context(tmp_path, ca, c1, 1)}
    s = serverapp.VerifiedStrategy(FedAvg(), trust=ca.trust, job="job-a",
                              recorder=RoundRecorder(tmp_path / "state", "job-a", SPEC),
                              audit=None, round_offset=0, min_clients=3,
                              model_signer=ca.new_identity("aggregator", Role.AGGREGATOR))
    start = ArrayRecord(get_weights(build_model("breast-cancer", seed=0)))
    grid = InProcessGrid(contexts)
    msgs = list(s.configure_train(1, start, ConfigRecord(), grid))
    assert len(msgs) == 3  # Flower sees three nodes
    arrays, _ = s.aggregate_train(1, list(grid.send_and_receive(msgs)))
    assert arrays is None and s.accepted_clients == 2
    rec = s.recorder._open[1]
    assert sorted(rec.participants) == ["client-0", "client-1"]
    assert "fewer than minClients=3" in " ".join(rec.notes)


def test_the_weight_is_the_signed_one(tmp_path: Path, ca: CertificateAuthority,
                                      strategy: serverapp.VerifiedStrategy) -> None:
    """A reply whose unsigned num-examples metric was inflated aggregates exactly as the
    untouched one: FedAvg weighs by the signed manifest's num_examples."""
    replies = [_train_reply(tmp_path, ca, ca.new_identity(f"client-{i}", Role.CLIENT), i)[0]
               for i in range(2)]
    signed = [SignedUpdate.from_bytes(r.content[records.UPDATE_KEY]["signed"]) for r in replies]
    assert [s.manifest.num_examples for s in signed] == [
        int(r.content["metrics"]["num-examples"]) for r in replies]
    weights = get_weights(build_model("breast-cancer", seed=0))
    honest, _ = strategy.aggregate_train(1, [Message(r.content, reply_to=_train_msg(ca, weights, i))
                                             for i, r in enumerate(replies)])
    strategy._voted.clear()
    replies[0].content["metrics"]["num-examples"] = 10**9
    inflated, _ = strategy.aggregate_train(1, replies)
    assert honest is not None and inflated is not None
    for a, b in zip(honest.to_numpy_ndarrays(), inflated.to_numpy_ndarrays(), strict=True):
        np.testing.assert_array_equal(a, b)


# ---- the model a node trains on -------------------------------------------------------------

def test_a_node_trains_only_on_the_aggregators_signed_model(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    ident = ca.new_identity("client-0", Role.CLIENT)
    ctx = _context(tmp_path, ca, ident, 0)
    weights = get_weights(build_model("breast-cancer", seed=0))
    altered = [w.copy() for w in weights]
    altered[0][0] += 0.5
    # the right signature, other weights (an edge changed the model)
    msg = _train_msg(ca, weights, 0, rnd=1)
    msg.content["arrays"] = ArrayRecord(altered)
    with pytest.raises(ModelRejected, match="altered"):
        clientapp.client_app(msg, ctx)
    # signed by someone else than the pinned aggregator (an edge signing its own model)
    edge = ca.new_identity("edge-0", Role.EDGE)
    forged = sign_model(edge, "job-a", EPOCH, 1, 1, weights_digest(altered))
    msg = _train_msg(ca, altered, 0, rnd=1)
    msg.content[records.MODEL_SIG_KEY] = ConfigRecord({"signed": forged.to_bytes()})
    with pytest.raises(ModelRejected, match="certificate"):
        clientapp.client_app(msg, ctx)
    msg = _train_msg(ca, weights, 0, rnd=1)
    del msg.content[records.MODEL_SIG_KEY]
    with pytest.raises(ModelRejected, match="no signature"):
        clientapp.client_app(msg, ctx)
    assert records.MODEL_SEEN_KEY not in ctx.state  # nothing was accepted so far
    # the genuine round-2 model trains; replaying it, or round 1's model, is refused
    good = _train_msg(ca, weights, 0, rnd=2)
    assert not clientapp.client_app(good, ctx).has_error()
    for replay in (_train_msg(ca, weights, 0, rnd=2), _train_msg(ca, weights, 0, rnd=1)):
        with pytest.raises(ModelRejected, match="replayed"):
            clientapp.client_app(replay, ctx)
    # a restarted aggregator (new epoch) may repeat the round, not go back
    again = _train_msg(ca, weights, 0, rnd=2)
    again.content[records.MODEL_SIG_KEY] = _model_sig(ca, weights, 2, "job-a", epoch=b"\x08" * 8)
    assert not clientapp.client_app(again, ctx).has_error()
    older = _train_msg(ca, weights, 0, rnd=1)
    older.content[records.MODEL_SIG_KEY] = _model_sig(ca, weights, 1, "job-a", epoch=b"\x09" * 8)
    with pytest.raises(ModelRejected, match="earlier epoch"):
        clientapp.client_app(older, ctx)


class _RenewingGrid(InProcessGrid):
    """Before the train messages of each round in `renew_at` go out, the operator's renewal
    lands in the aggregator's identity directory: a new key and certificate (tls.crt, tls.key),
    as the kubelet swaps them into the pod."""

    def __init__(self, contexts: dict[int, Context], ca: CertificateAuthority, directory: Path,
                 renew_at: set[int]) -> None:
        super().__init__(contexts)
        self.ca, self.directory, self.renew_at = ca, directory, renew_at
        self.train_rounds = 0
        self.issued: list[Identity] = []

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        msgs = list(messages)
        if msgs and msgs[0].metadata.message_type == MessageType.TRAIN:
            self.train_rounds += 1
            if self.train_rounds in self.renew_at:
                new = self.ca.new_identity("aggregator", Role.AGGREGATOR)
                new.save(self.directory / "tls.crt", self.directory / "tls.key")
                self.issued.append(new)
        return super().push_messages(msgs)


def test_aggregator_hands_its_audit_log_over_to_renewed_certificates(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    """The ServerApp's audit log follows the identity directory: renewed twice mid-job, the log
    spans three certificates, each taking over through a signed hand-over, and verifies."""
    spec = SPEC.model_copy(update={"rounds": 3})
    first = ca.new_identity("aggregator", Role.AGGREGATOR)
    agg_dir = Path(_identity_dir(tmp_path / "agg", ca, first))
    contexts = {100 + i: _context(tmp_path, ca, ca.new_identity(f"client-{i}", Role.CLIENT), i)
                for i in range(3)}
    for c in contexts.values():  # a flat job: nodes talk to the aggregator, no model signature
        c.run_config["spec"] = spec.model_dump_json(by_alias=True)
        del c.node_config[MODEL_SIGNER_KEY]
    grid = _RenewingGrid(contexts, ca, agg_dir, renew_at={2, 3})
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={
        "spec": spec.model_dump_json(by_alias=True), "job": "job-a",
        "state-dir": str(tmp_path / "state"), "identity-dir": str(agg_dir)})
    serverapp.server_app(grid, server)
    summary = verify_audit_log(tmp_path / "state" / "audit.jsonl", ca.trust)
    assert summary.signers == tuple(i.certificate.serial for i in [first, *grid.issued])
    assert summary.events["signer-renewed"] == 2
    assert summary.events["update-accepted"] == 9
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert status["currentRound"] == 3 and status["auditHead"] == summary.head


def test_model_signatures_follow_the_renewed_identity(tmp_path: Path,
                                                      ca: CertificateAuthority) -> None:
    old = ca.new_identity("aggregator", Role.AGGREGATOR)
    d = Path(_identity_dir(tmp_path / "agg", ca, old))
    s = serverapp.VerifiedStrategy(FedAvg(), trust=ca.trust, job="job-a",
                              recorder=RoundRecorder(tmp_path / "state", "job-a", SPEC),
                              audit=None, round_offset=0, min_clients=1, model_signer=old,
                              renewed=identity_dir.identity_source(str(d)))
    s._global = [np.asarray(w) for w in get_weights(build_model("breast-cancer", seed=0))]
    signed = s._model_signature(1)
    assert signed is not None and SignedModel.from_bytes(signed).certificate == old.certificate
    new = ca.new_identity("aggregator", Role.AGGREGATOR)
    new.save(d / "tls.crt", d / "tls.key")
    signed = s._model_signature(2)
    assert signed is not None and SignedModel.from_bytes(signed).certificate == new.certificate
