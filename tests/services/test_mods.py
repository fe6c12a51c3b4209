"""The client mod chain (services/mods.py) on real Flower messages, real training and real
ML-DSA: in the order `client_mods()` builds, a compressed broadcast is decoded, the model
signature checked, local DP applied, the update compressed and signed, and the aggregator
verifies and aggregates it; each mod refuses a chain in which it sits in the wrong place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.pqc.signing import SignedUpdate
from pqfed.services import clientapp, downlink, mods
from pqfed.services.models import build_model, get_weights
from pqfed.services.records import (
    BLOB_KEY,
    BROADCAST_KEY,
    MODEL_SIGNER_KEY,
    RESIDUAL_KEY,
    UPDATE_KEY,
    blob_of,
    float_arrays,
)
from pqfed.services.rounds import RoundRecorder
from pqfed.services.serverapp import VerifiedStrategy
from pqfed.services.simulation import InProcessGrid
from pqfed.services.spec import FederationJobSpec, parse_spec

# Every mod has work to do: compressed broadcasts, local DP, top-k + int8 with error feedback.
SPEC = parse_spec({"task": "breast-cancer", "clients": 3, "minClients": 3, "rounds": 2,
                   "compression": {"method": "topk+int8", "topkFraction": 0.2},
                   "privacy": {"enabled": True, "mode": "local", "targetEpsilon": 50.0}})
NO_DP = parse_spec({**SPEC.model_dump(by_alias=True, exclude={"privacy"})})


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _contexts(tmp: Path, ca: CertificateAuthority, spec: FederationJobSpec = SPEC
              ) -> dict[int, Context]:
    out = {}
    for i in range(spec.clients):
        d = tmp / f"client-{i}"
        d.mkdir(parents=True, exist_ok=True)
        ca.new_identity(f"client-{i}", Role.CLIENT).save(d / "tls.crt", d / "tls.key")
        (d / "ca.crt").write_text(ca.root.to_pem())
        out[100 + i] = Context(run_id=1, node_id=100 + i, state=RecordDict(), node_config={
            "partition-id": i, "identity-dir": str(d), MODEL_SIGNER_KEY: "aggregator"},
            run_config={"spec": spec.model_dump_json(by_alias=True), "job": "job-m"})
    return out


def _strategy(tmp: Path, ca: CertificateAuthority, signer: Identity) -> VerifiedStrategy:
    return VerifiedStrategy(FedAvg(), trust=ca.trust, job="job-m", audit=None, round_offset=0,
                            min_clients=3, recorder=RoundRecorder(tmp / "state", "job-m", SPEC),
                            downlink=downlink.for_spec(SPEC), model_signer=signer)


def _app(chain: list[mods.Mod]) -> ClientApp:
    app = ClientApp(mods=chain)
    app.train()(clientapp.train)
    return app


def _round(strategy: VerifiedStrategy, app: ClientApp, contexts: dict[int, Context],
           rnd: int, arrays: ArrayRecord) -> tuple[bool, list[Message]]:
    """(whether every model went out as a compressed broadcast, the replies)"""
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), InProcessGrid(contexts)))
    compressed = all(BROADCAST_KEY in m.content for m in msgs)
    return compressed, [app(m, contexts[m.metadata.dst_node_id]) for m in msgs]


def test_the_chain_sends_signed_compressed_updates_the_aggregator_accepts(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    contexts = _contexts(tmp_path, ca)
    strategy = _strategy(tmp_path, ca, ca.new_identity("aggregator", Role.AGGREGATOR))
    app = _app(mods.client_mods())
    arrays = ArrayRecord(get_weights(build_model("breast-cancer", seed=0)))
    for rnd in (1, 2):
        compressed, replies = _round(strategy, app, contexts, rnd, arrays)
        assert compressed
        for reply in replies:
            assert not reply.has_error()
            signed = SignedUpdate.from_bytes(reply.content[UPDATE_KEY]["signed"])
            blob = blob_of(reply.content)
            assert signed.manifest.size == len(blob)  # what is signed is what leaves
            assert list(reply.content["arrays"].keys()) == [BLOB_KEY]
        new, _ = strategy.aggregate_train(rnd, replies)
        rec = strategy.recorder._open[rnd]
        assert new is not None and rec.rejected_updates == 0
        assert sorted(rec.participants) == ["client-0", "client-1", "client-2"]
        arrays = new
    assert all(RESIDUAL_KEY in c.state for c in contexts.values())  # error feedback kept


def test_the_production_app_is_that_chain(tmp_path: Path, ca: CertificateAuthority) -> None:
    """clientapp.client_app answers byte for byte like ClientApp(mods=client_mods()) (local DP
    off: its noise is not seeded)."""
    ours, theirs = _contexts(tmp_path / "a", ca, NO_DP), _contexts(tmp_path / "b", ca, NO_DP)
    weights = get_weights(build_model("breast-cancer", seed=0))
    from pqfed.pqc.signing import sign_model

    signer = ca.new_identity("aggregator", Role.AGGREGATOR)
    sig = sign_model(signer, "job-m", b"\x01" * 8, 1, 1, downlink.weights_digest(weights))
    msg = Message(RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord(
        {"round": 1}), "pqfed-model-sig": ConfigRecord({"signed": sig.to_bytes()})}),
        dst_node_id=100, message_type=MessageType.TRAIN)
    a = clientapp.client_app(msg, ours[100])
    b = _app(mods.client_mods())(msg, theirs[100])
    assert blob_of(a.content) == blob_of(b.content)
    for reply in (a, b):
        assert SignedUpdate.from_bytes(reply.content[UPDATE_KEY]["signed"]).manifest.size == \
            len(blob_of(reply.content))


S, D, V, E, P = (mods.sign_update_mod, mods.decode_broadcast_mod, mods.verify_model_mod,
                 mods.encode_update_mod, mods.local_dp_mod)


@pytest.mark.parametrize(("chain", "culprit"), [
    ([D, E, S, V, P], "sign_update_mod"),  # would sign dense weights
    ([S, V, D, E, P], "verify_model_mod"),  # would check a signature over a broadcast
    ([S, D, V, P, E], "local_dp_mod"),  # would add noise to a compressed blob
    ([S, E, D, V, P], "encode_update_mod"),  # would diff against a broadcast
    ([S, D, V, E, P, S], "sign_update_mod"),  # signed twice
])
def test_a_misordered_chain_is_refused_naming_the_mod(
        tmp_path: Path, ca: CertificateAuthority, chain: list[mods.Mod], culprit: str) -> None:
    contexts = _contexts(tmp_path, ca)
    strategy = _strategy(tmp_path, ca, ca.new_identity("aggregator", Role.AGGREGATOR))
    msgs = list(strategy.configure_train(1, ArrayRecord(get_weights(build_model(
        "breast-cancer", seed=0))), ConfigRecord(), InProcessGrid(contexts)))
    with pytest.raises(mods.ModChainError, match=culprit) as err:
        _app(chain)(msgs[0], contexts[msgs[0].metadata.dst_node_id])
    assert err.value.mod == culprit and "client_mods()" in str(err.value)


def test_encode_update_mod_sends_the_delta_with_error_feedback(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    """Round 1's blob decodes to (trained - global) less what it left out, which is kept;
    round 2 sends its own difference plus that residual."""
    from pqfed.services import compression

    ctx = _contexts(tmp_path, ca)[100]
    weights = [np.asarray(w) for w in get_weights(build_model("breast-cancer", seed=0))]
    msg = Message(RecordDict({"arrays": ArrayRecord(weights),
                              "config": ConfigRecord({"round": 1})}),
                  dst_node_id=100, message_type=MessageType.TRAIN)
    trained = [w + np.float32(0.01) * (i + 1) for i, w in enumerate(weights)]

    def handler(m: Message, c: Context) -> Message:
        return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord(
            {"num-examples": 1})}), reply_to=m)

    delta = [t - w for t, w in zip(trained, weights, strict=True)]
    sent = compression.decode(blob_of(mods.encode_update_mod(msg, ctx, handler).content),
                              weights)
    residual = float_arrays(ctx.state[RESIDUAL_KEY])
    for d, s, r in zip(delta, sent, residual, strict=True):
        np.testing.assert_allclose(s + r, d, atol=1e-6)
    assert any(np.any(r != 0) for r in residual)  # top-k 20% left most of it out
    sent2 = compression.decode(blob_of(mods.encode_update_mod(msg, ctx, handler).content),
                               weights)
    expected, _ = compression.encode([d + r for d, r in zip(delta, residual, strict=True)],
                                     compression.Method.TOPK_INT8, 0.2)
    for a, b in zip(sent2, compression.decode(expected, weights), strict=True):
        np.testing.assert_array_equal(a, b)
