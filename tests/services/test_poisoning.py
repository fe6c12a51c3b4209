"""Poisoning emulation is a benchmark mod (services/poisoning.py): the production ClientApp
trains honestly whatever the node config says; `poisoning_client_app` trains an attacker on
flipped labels (boosted for label-flip-boost) and still signs the update, which the
aggregator accepts as validly signed (robust strategies, not signatures, deal with it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

from pqfed.pqc.identity import CertificateAuthority, Role
from pqfed.services import clientapp, compression, poisoning, task
from pqfed.services.mods import ModChainError
from pqfed.services.records import BROADCAST_KEY, blob_of, float_arrays
from pqfed.services.rounds import RoundRecorder
from pqfed.services.serverapp import VerifiedStrategy
from pqfed.services.spec import parse_spec

SPEC = parse_spec({"task": "breast-cancer", "clients": 3, "minClients": 1, "rounds": 1,
                   "compression": {"method": "none"}})


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _context(tmp: Path, ca: CertificateAuthority, attack: str | None) -> Context:
    d = tmp / f"client-0-{attack}"
    d.mkdir(parents=True, exist_ok=True)
    ca.new_identity("client-0", Role.CLIENT).save(d / "tls.crt", d / "tls.key")
    (d / "ca.crt").write_text(ca.root.to_pem())
    node_config: dict[str, str | int] = {"partition-id": 0, "identity-dir": str(d)}
    if attack is not None:
        node_config[poisoning.ATTACK_KEY] = attack
    return Context(run_id=1, node_id=100, state=RecordDict(), node_config=node_config,
                   run_config={"spec": SPEC.model_dump_json(by_alias=True), "job": "job-p"})


def _weights() -> list[np.ndarray]:
    from pqfed.services.models import build_model, get_weights

    return [np.asarray(w) for w in get_weights(build_model("breast-cancer", seed=0))]


def _msg() -> Message:
    return Message(RecordDict({"arrays": ArrayRecord(_weights()),
                               "config": ConfigRecord({"round": 1})}),
                   dst_node_id=100, message_type=MessageType.TRAIN)


def _delta(reply: Message) -> list[np.ndarray]:
    return compression.decode(blob_of(reply.content), _weights())


def _flipped_delta(ctx: Context) -> list[np.ndarray]:
    """What training on y -> C-1-y gives, with the task's own code."""
    data = task.node_data(ctx)
    y = np.asarray(data.y_train)
    reply = task.fit(_msg(), ctx, data.x_train, (y.max() - y).astype(y.dtype), 0.0)
    return [t - w for t, w in zip(float_arrays(reply.content["arrays"]), _weights(),
                                  strict=True)]


def test_the_production_client_app_ignores_an_attack_setting(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    honest = clientapp.client_app(_msg(), _context(tmp_path, ca, None))
    told = clientapp.client_app(_msg(), _context(tmp_path, ca, "label-flip"))
    assert blob_of(told.content) == blob_of(honest.content)


def test_the_benchmark_app_poisons_attackers_only_and_still_signs(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    honest = clientapp.client_app(_msg(), _context(tmp_path, ca, None))
    same = poisoning.poisoning_client_app(_msg(), _context(tmp_path, ca, None))
    assert blob_of(same.content) == blob_of(honest.content)  # no attack: honest training
    flip_ctx = _context(tmp_path, ca, "label-flip")
    flipped = poisoning.poisoning_client_app(_msg(), flip_ctx)
    expected = _flipped_delta(flip_ctx)
    for a, b in zip(_delta(flipped), expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(_delta(flipped), _delta(honest),
                                                     strict=True))
    boosted = poisoning.poisoning_client_app(_msg(), _context(tmp_path, ca, "label-flip-boost"))
    for a, b in zip(_delta(boosted), expected, strict=True):
        np.testing.assert_allclose(a, 5.0 * b, atol=1e-5)
    # a valid signature, a poisoned update: the aggregator accepts it as signed
    strategy = VerifiedStrategy(FedAvg(), trust=ca.trust, job="job-p", audit=None,
                                round_offset=0, min_clients=1,
                                recorder=RoundRecorder(tmp_path / "state", "job-p", SPEC))
    strategy._global = _weights()
    arrays, _ = strategy.aggregate_train(1, [boosted])
    assert arrays is not None and strategy.recorder._open[1].rejected_updates == 0


def test_bad_attacks_and_placements_are_refused(tmp_path: Path,
                                                ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="boost"):
        poisoning.PoisoningMod(boost=1.0)
    with pytest.raises(ValueError, match="node_config attack='sign-flip'"):
        poisoning.poisoning_client_app(_msg(), _context(tmp_path, ca, "sign-flip"))
    msg = _msg()
    msg.content[BROADCAST_KEY] = ConfigRecord({"version": 1})
    with pytest.raises(ModChainError, match="PoisoningMod"):
        poisoning.PoisoningMod()(msg, _context(tmp_path, ca, "label-flip"),
                                 clientapp.train)


def test_the_staged_benchmark_app_names_the_poisoning_components(tmp_path: Path) -> None:
    import tomllib

    for spec, client in ((SPEC, poisoning.CLIENTAPP), (parse_spec({
            "clients": 3, "minClients": 3, "secureAggregation": {
                "enabled": True, "numShares": 3, "reconstructionThreshold": 2}}),
            poisoning.SECAGG_CLIENTAPP)):
        d = poisoning.stage_poisoning_app(tmp_path / client.rsplit(":")[-1], spec)
        comp = tomllib.loads((d / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
            "components"]
        assert comp["clientapp"] == client
        module, name = client.split(":")
        import importlib

        assert getattr(importlib.import_module(module), name) is not None
