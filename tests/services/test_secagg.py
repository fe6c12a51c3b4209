"""Secure aggregation with Flower's SecAgg+ and ML-DSA-signed stage replies (services/secagg.py):
real ClientApp/ServerApp, real training, real Flower SecAgg+ and real ML-DSA, every message
crossing a protobuf round trip in process (testing.LoopbackGrid).

* the SecAgg+ aggregate equals plain FedAvg of the same (captured, unmasked) updates, within
  the quantization error, and the server only ever receives masked vectors;
* a tampered or unsigned reply in any stage is dropped before the workflow sees it, audited,
  and SecAgg+ finishes the round with the remaining (>= threshold) clients;
* clients refuse a share-keys stage whose public keys are not signed by their owners;
* too few verified clients halt the round: the global model is kept and recorded as such.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from pqfed.pqc.audit import verify_audit_log
from pqfed.pqc.errors import PqcError
from pqfed.pqc.identity import Certificate, CertificateAuthority, Identity, Role, TrustAnchor
from pqfed.pqc.signing import sign_update
from pqfed.services import secagg, testing
from pqfed.services.spec import JobSpecError, parse_spec

SPEC = parse_spec({"task": "breast-cancer", "clients": 3, "minClients": 2, "rounds": 2,
                   "secureAggregation": {"enabled": True, "numShares": 3,
                                         "reconstructionThreshold": 2}})
# SecAgg+ quantizes each (example-weighted) parameter with step 2 * clippingRange /
# quantizationRange (3.8e-6 here, stochastic rounding); allow a few steps.
TOLERANCE = 5 * 2 * SPEC.secure_aggregation.clipping_range / SPEC.secure_aggregation.quantization_range


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


class Harness:
    """ClientApp = signing_mod + Flower's secaggplus_mod + a capture mod (inside secaggplus_mod,
    so it sees the plain update the client is about to mask); the intercept sees (and may
    alter) every reply on its way to the server."""

    def __init__(self, tamper: dict[tuple[int, int, str], str] | None = None) -> None:
        self.plain: dict[tuple[int, int], tuple[list[np.ndarray], int]] = {}
        self.seen: list[tuple[int, int, str, Message]] = []  # (round, node, stage, reply)
        self.tamper = tamper or {}
        self.app = ClientApp(client_fn=secagg.client_fn,
                             mods=[secagg.signing_mod, secaggplus_mod, self.capture])

    def capture(self, msg: Message, context: Context, call_next: Any) -> Message:
        reply: Message = call_next(msg, context)
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        self.plain[(int(msg.metadata.group_id), msg.metadata.dst_node_id)] = (
            [np.array(a) for a in parameters_to_ndarrays(fitres.parameters)],
            fitres.num_examples)
        return reply

    def intercept(self, instruction: Message, reply: Message) -> Message | None:
        rnd, node = int(instruction.metadata.group_id), instruction.metadata.dst_node_id
        stage = secagg._stage(instruction)
        how = self.tamper.get((rnd, node, stage))
        if how == "flip":  # flip one bit of the first array/bytes value of the stage reply
            rec = reply.content[RECORD_KEY_CONFIGS]
            assert isinstance(rec, ConfigRecord)
            key = next(k for k, v in rec.items() if isinstance(v, list) and v
                       and isinstance(v[0], bytes))
            values = list(rec[key])  # type: ignore[arg-type]
            values[0] = bytes([values[0][0] ^ 1]) + values[0][1:]
            rec[key] = values
        elif how == "unsigned":
            del reply.content[secagg.SIGNATURE_KEY]
        elif how == "sybil":  # signed by another client's (valid) identity
            d = self.workdir / "identities" / "client-1"
            other = Identity.load_files(d / "tls.crt", d / "tls.key")
            digest = secagg.reply_digest(reply.content, stage=stage, node_id=node)
            reply.content[secagg.SIGNATURE_KEY] = ConfigRecord(
                {"signed": sign_update(other, "job-sa", rnd, digest).to_bytes()})
        self.seen.append((rnd, node, stage, reply))
        return reply

    def run(self, spec: Any, workdir: Path, revoked: frozenset[int] = frozenset()
            ) -> dict[str, Any]:
        self.workdir = workdir
        return testing.simulate_secagg(spec, job="job-sa", workdir=workdir, app=self.app,
                               intercept=self.intercept, revoked=revoked)

    def fedavg(self, rnd: int, nodes: list[int]) -> list[np.ndarray]:
        ups = [self.plain[(rnd, n)] for n in nodes]
        total = sum(n for _, n in ups)
        return [sum(w[i].astype(np.float64) * n for w, n in ups) / total
                for i in range(len(ups[0][0]))]


def _checkpoint(workdir: Path, rnd: int) -> list[np.ndarray]:
    with np.load(workdir / "state" / "checkpoints" / f"round-{rnd:05d}.npz") as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def _audit(workdir: Path) -> Any:
    ca = TrustAnchor(Certificate.from_pem(
        (workdir / "identities" / "aggregator" / "ca.crt").read_text()))
    return verify_audit_log(workdir / "state" / "audit.jsonl", ca)


def test_secagg_aggregate_is_fedavg_and_server_sees_only_masked_vectors(tmp_path: Path) -> None:
    h = Harness()
    st = h.run(SPEC, tmp_path)
    assert st["phase"] == "Succeeded" and st["currentRound"] == 2
    assert st["accuracy"] > 0.85
    for r in st["rounds"]:
        assert sorted(r["participants"]) == ["client-0", "client-1", "client-2"]
        assert r["aggregated"] and r["rejectedUpdates"] == 0
        assert r["bytesSent"] > 0 and r["bytesReceived"] > 0 and r["cryptoSeconds"] > 0
    # The aggregate equals plain FedAvg of the unmasked updates, within quantization error.
    for rnd in (1, 2):
        expected = h.fedavg(rnd, [100, 101, 102])
        assert _max_diff(_checkpoint(tmp_path, rnd), expected) < TOLERANCE
    # What reached the server: no parameters in clear, only vectors masked mod 2**32.
    masked = [(rnd, node, rep) for rnd, node, stage, rep in h.seen
              if stage == Stage.COLLECT_MASKED_VECTORS]
    assert len(masked) == 6
    for rnd, node, rep in masked:
        assert all(len(rec) == 0 for rec in rep.content.array_records.values())
        vec = np.concatenate([bytes_to_ndarray(b).ravel() for b in
                              rep.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]])
        # Quantized but unmasked entries would all lie in [0, quantizationRange = 2**22).
        assert np.mean(vec >= SPEC.secure_aggregation.quantization_range) > 0.9
        wire = testing.wire(rep)
        raw = b"".join(v for rec in wire.content.config_records.values()
                       for vals in rec.values() if isinstance(vals, list)
                       for v in vals if isinstance(v, bytes))
        for arr in h.plain[(rnd, node)][0]:
            if arr.size >= 4:
                assert arr.astype(np.float32).tobytes()[:16] not in raw
    events = _audit(tmp_path).events
    assert events["update-accepted"] == 6 and "update-rejected" not in events


def test_tampered_and_unsigned_stage_replies_are_dropped_and_audited(tmp_path: Path) -> None:
    h = Harness(tamper={
        (1, 101, Stage.COLLECT_MASKED_VECTORS): "flip",  # masked vector changed in transit
        (2, 102, Stage.SHARE_KEYS): "unsigned",  # encrypted key shares without a signature
    })
    st = h.run(SPEC, tmp_path)
    assert st["phase"] == "Succeeded" and st["currentRound"] == 2
    r1, r2 = st["rounds"]
    assert sorted(r1["participants"]) == ["client-0", "client-2"]
    assert sorted(r2["participants"]) == ["client-0", "client-1"]
    for r, stage in ((r1, Stage.COLLECT_MASKED_VECTORS), (r2, Stage.SHARE_KEYS)):
        assert r["aggregated"] and r["rejectedUpdates"] == 1
        assert any(stage in n for n in r["notes"])
    assert "tampered" in " ".join(r1["notes"])
    # SecAgg+ removed the masks of the dropped client: the result is FedAvg of the others.
    assert _max_diff(_checkpoint(tmp_path, 1), h.fedavg(1, [100, 102])) < TOLERANCE
    assert _max_diff(_checkpoint(tmp_path, 2), h.fedavg(2, [100, 101])) < TOLERANCE
    audit = _audit(tmp_path)
    assert audit.events["update-rejected"] == 2 and audit.events["update-accepted"] == 4
    assert audit.head == st["auditHead"]


def test_too_few_verified_clients_halt_the_round_and_keep_the_model(tmp_path: Path) -> None:
    # Node 102 answers the setup stage with client-1's identity (a second Flower node for one
    # certified client), node 100's masked vector arrives unsigned: one client is left.
    spec = SPEC.model_copy(update={"rounds": 1})
    h = Harness(tamper={(1, 102, Stage.SETUP): "sybil",
                        (1, 100, Stage.COLLECT_MASKED_VECTORS): "unsigned"})
    st = h.run(spec, tmp_path)
    assert st["phase"] == "Succeeded" and st["currentRound"] == 1
    (r1,) = st["rounds"]
    assert not r1["aggregated"] and r1["rejectedUpdates"] == 2
    notes = " ".join(r1["notes"])
    assert "already answers as node" in notes and "unsigned reply" in notes
    assert "halted" in notes
    assert _audit(tmp_path).events["update-rejected"] == 2
    from pqfed.services.models import build_model, get_weights

    initial = get_weights(build_model("breast-cancer", seed=0))
    assert _max_diff(_checkpoint(tmp_path, 1), initial) == 0.0


def test_resumed_job_signs_and_records_global_round_numbers(tmp_path: Path) -> None:
    first = Harness().run(SPEC.model_copy(update={"rounds": 1}), tmp_path)
    assert first["currentRound"] == 1
    h = Harness()  # a restarted aggregator: resumes from the round-1 checkpoint
    st = h.run(SPEC, tmp_path)
    assert st["currentRound"] == 2 and [r["round"] for r in st["rounds"]] == [1, 2]
    assert st["rounds"][1]["rejectedUpdates"] == 0 and len(st["rounds"][1]["participants"]) == 3
    assert sorted(h.plain) == [(2, 100), (2, 101), (2, 102)]  # clients trained round 2 only
    assert {rnd for rnd, *_ in h.seen} == {2}  # and signed every reply for round 2
    assert _max_diff(_checkpoint(tmp_path, 2), h.fedavg(2, [100, 101, 102])) < TOLERANCE


def _share_keys_message(ca: CertificateAuthority, tmp: Path, *, substitute: bool = False,
                        drop_signature: bool = False, same_signer: bool = False,
                        revoke: str | None = None) -> tuple[Message, Context]:
    keys: dict[str, list[bytes]] = {str(n): [os.urandom(32), os.urandom(32)]
                                    for n in (100, 101, 102)}
    signed: dict[str, bytes] = {}
    for n, pair in keys.items():
        who = "client-1" if same_signer and n == "102" else f"client-{int(n) - 100}"
        ident = ca.new_identity(who, Role.CLIENT)
        if who == revoke:  # the CA revoked this neighbour; client-0 holds the list
            (tmp / "client-0").mkdir(parents=True, exist_ok=True)
            (tmp / "client-0" / "crl.pem").write_text(
                ca.revoke(None, ident.certificate.serial).to_pem())
        signed[n] = sign_update(ident, "job-k", 4, secagg._setup_digest(int(n), pair)).to_bytes()
    if substitute:  # the aggregator swaps in its own key for node 101
        keys["101"] = [os.urandom(32), keys["101"][1]]
    if drop_signature:
        del signed["102"]
    d = tmp / "client-0"
    d.mkdir(parents=True, exist_ok=True)
    ca.new_identity("client-0", Role.CLIENT).save(d / "tls.crt", d / "tls.key")
    (d / "ca.crt").write_text(ca.root.to_pem())
    rec = ConfigRecord({**keys, Key.STAGE: Stage.SHARE_KEYS})  # type: ignore[dict-item]
    msg = Message(RecordDict({RECORD_KEY_CONFIGS: rec,
                              secagg.PEER_KEYS_KEY: ConfigRecord(signed)}),  # type: ignore[arg-type]
                  dst_node_id=100, message_type=MessageType.TRAIN, group_id="4")
    ctx = Context(run_id=1, node_id=100, node_config={"identity-dir": str(d)},
                  state=RecordDict(), run_config={"job": "job-k"})
    return msg, ctx


def test_clients_refuse_public_keys_not_signed_by_their_owner(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    def inner(m: Message, _c: Context) -> Message:
        assert secagg.PEER_KEYS_KEY not in m.content  # stripped before secaggplus_mod
        return Message(RecordDict({"x": ConfigRecord({"ok": True})}), reply_to=m)

    msg, ctx = _share_keys_message(ca, tmp_path)
    reply = secagg.signing_mod(msg, ctx, inner)
    assert secagg.SIGNATURE_KEY in reply.content
    with pytest.raises(PqcError, match="tampered"):
        secagg.signing_mod(*_share_keys_message(ca, tmp_path, substitute=True), inner)
    with pytest.raises(ValueError, match="without their signature"):
        secagg.signing_mod(*_share_keys_message(ca, tmp_path, drop_signature=True), inner)
    with pytest.raises(ValueError, match="signed for two nodes"):
        secagg.signing_mod(*_share_keys_message(ca, tmp_path, same_signer=True), inner)


def test_clients_refuse_public_keys_of_a_revoked_neighbour(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    """Client-0 holds a list revoking client-1: client-1's (validly signed) SecAgg+ keys are
    refused before secaggplus_mod could encrypt a share to them."""
    def inner(m: Message, _c: Context) -> Message:
        raise AssertionError("secaggplus_mod must not see the keys")

    with pytest.raises(PqcError, match="revoked"):
        secagg.signing_mod(*_share_keys_message(ca, tmp_path / "r", revoke="client-1"), inner)


def test_a_revoked_clients_stage_replies_are_refused(tmp_path: Path) -> None:
    """The CA revoked client-1 (its list is in the aggregator's identity directory): its
    signed setup reply is refused and audited, SecAgg+ runs with the two others."""
    st = Harness().run(SPEC, tmp_path, revoked=frozenset({1}))
    assert st["phase"] == "Succeeded" and st["currentRound"] == 2
    for r in st["rounds"]:
        assert r["aggregated"] and sorted(r["participants"]) == ["client-0", "client-2"]
        assert r["rejectedUpdates"] == 1
        assert "revoked" in " ".join(r["notes"]) and Stage.SETUP in " ".join(r["notes"])
    assert _audit(tmp_path).events["update-rejected"] == 2


def test_reply_digest_survives_the_wire_and_binds_stage_and_node() -> None:
    content = RecordDict({
        RECORD_KEY_CONFIGS: ConfigRecord({"a": [b"x", b"y"], "b": 3, "c": 0.25, "d": [],
                                          "e": True, "f": "s"}),
    })
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN, group_id="1")
    again = testing.wire(msg).content
    d = secagg.reply_digest(content, stage="setup", node_id=7)
    assert secagg.reply_digest(again, stage="setup", node_id=7) == d
    assert secagg.reply_digest(again, stage="unmask", node_id=7) != d
    assert secagg.reply_digest(again, stage="setup", node_id=8) != d


@pytest.mark.parametrize(("update", "field"), [
    ({"numShares": 2, "reconstructionThreshold": 2}, "spec.secureAggregation.numShares"),
    ({"reconstructionThreshold": 3}, "spec.secureAggregation.reconstructionThreshold"),
    ({"reconstructionThreshold": 1}, "spec.secureAggregation.reconstructionThreshold"),
    ({"privacy": {"enabled": True}}, "spec.privacy.enabled"),
    ({"compression": {"method": "int8"}}, "spec.compression.method"),
])
def test_unsupported_secagg_jobs_are_refused(update: dict[str, Any], field: str) -> None:
    doc = SPEC.model_dump(by_alias=True)
    for k, v in update.items():
        if k in ("privacy", "compression"):
            doc[k].update(v)
        else:
            doc["secureAggregation"][k] = v
    with pytest.raises(JobSpecError) as err:
        secagg.check_secagg_spec(parse_spec(doc))
    assert field in err.value.problems
    secagg.check_secagg_spec(SPEC)  # the default SecAgg+ job is accepted


@pytest.mark.slow
def test_deployment_secagg_through_superlink_supernodes_and_pqc_sidecars(tmp_path: Path) -> None:
    """`pqfed run` (SuperLink + 3 SuperNodes via `pqfed fl`, PQC sidecars): fl_node stages the
    Flower App with the SecAgg+ components when secureAggregation.enabled (~50 s)."""
    from pqfed.services.runner import run_local

    job = tmp_path / "job.yaml"
    job.write_text("""apiVersion: pqfed.io/v1alpha1
kind: FederationJob
metadata: {name: e2e-secagg}
spec:
  task: breast-cancer
  clients: 3
  minClients: 2
  rounds: 2
  training: {localEpochs: 2}
  secureAggregation: {enabled: true, numShares: 3, reconstructionThreshold: 2}
""")
    res = run_local(job, tmp_path / "runs", show=False, timeout=400)
    st = res["status"]
    assert st["phase"] == "Succeeded" and st["currentRound"] == 2 and st["accuracy"] > 0.9
    for r in st["rounds"]:
        assert sorted(r["participants"]) == ["client-0", "client-1", "client-2"]
        assert r["rejectedUpdates"] == 0 and r["aggregated"] and r["cryptoSeconds"] > 0
    run = Path(res["runDir"])
    flower = run / "state" / "aggregator" / "flower"
    assert secagg.SERVERAPP in (flower / "app-secagg" / "pyproject.toml").read_text()
    assert (flower / "logs" / "serverapp.log").read_text().count(
        "Secure aggregation completed") == 2
    ca = TrustAnchor(Certificate.from_pem((run / "identities/aggregator/ca.crt").read_text()))
    audit = verify_audit_log(run / "state/aggregator/audit.jsonl", ca)
    assert audit.events["update-accepted"] == 6 and audit.head == st["auditHead"]
