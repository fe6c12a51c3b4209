"""The ClientApp/ServerApp logic on real Flower messages, real training and real ML-DSA:
a signed, compressed update is accepted; tampered, replayed or foreign ones are rejected and
audited; a round below minClients keeps the global model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

from pqfed.pqc.audit import AuditLog, verify_audit_log
from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.services import apps
from pqfed.services.models import build_model, get_weights
from pqfed.services.rounds import RoundRecorder
from pqfed.services.spec import parse_spec

SPEC = parse_spec({"task": "breast-cancer", "clients": 3, "minClients": 2, "rounds": 2,
                   "compression": {"method": "topk+int8", "topkFraction": 0.2}})


def _identity_dir(tmp: Path, ca: CertificateAuthority, ident: Identity) -> str:
    d = tmp / ident.certificate.node_id
    d.mkdir(parents=True, exist_ok=True)
    ident.save(d / "tls.crt", d / "tls.key")
    (d / "ca.crt").write_text(ca.root.to_pem())
    return str(d)


def _train_reply(tmp: Path, ca: CertificateAuthority, ident: Identity, pid: int,
                 rnd: int = 1, job: str = "job-a") -> tuple[Message, list[np.ndarray]]:
    weights = get_weights(build_model("breast-cancer", seed=0))
    msg = Message(RecordDict({"arrays": ArrayRecord(weights),
                              "config": ConfigRecord({"round": rnd})}),
                  dst_node_id=100 + pid, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=100 + pid,
                  node_config={"partition-id": pid,
                               "identity-dir": _identity_dir(tmp, ca, ident)},
                  state=RecordDict(),
                  run_config={"spec": SPEC.model_dump_json(by_alias=True), "job": job})
    return apps.client_app(msg, ctx), weights


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # What flwr-serverapp sets in its process before messages are created.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 1


@pytest.fixture
def strategy(tmp_path: Path, ca: CertificateAuthority,
             aggregator: Identity) -> apps.VerifiedStrategy:
    s = apps.VerifiedStrategy(FedAvg(), trust=ca.trust, job="job-a",
                              recorder=RoundRecorder(tmp_path / "state", "job-a", SPEC),
                              audit=AuditLog(tmp_path / "audit.jsonl", aggregator),
                              round_offset=0, min_clients=2)
    s._global = [np.asarray(w) for w in get_weights(build_model("breast-cancer", seed=0))]
    return s


def test_signed_compressed_updates_are_verified_and_aggregated(
        tmp_path: Path, ca: CertificateAuthority, strategy: apps.VerifiedStrategy,
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
        strategy: apps.VerifiedStrategy) -> None:
    good, _ = _train_reply(tmp_path, ca, ca.new_identity("client-0", Role.CLIENT), 0)
    tampered, _ = _train_reply(tmp_path, ca, ca.new_identity("client-1", Role.CLIENT), 1)
    _tamper_blob(tampered)
    replayed, _ = _train_reply(tmp_path, ca, ca.new_identity("client-2", Role.CLIENT), 2, rnd=7)
    foreign, _ = _train_reply(tmp_path / "x", other_ca,
                              other_ca.new_identity("client-2", Role.CLIENT), 2)
    unsigned, _ = _train_reply(tmp_path, ca, ca.new_identity("client-2", Role.CLIENT), 2)
    del unsigned.content[apps.UPDATE_KEY]
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
