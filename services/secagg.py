"""Secure aggregation for pqfed with Flower's own SecAgg+ (Flower 1.42), signed end to end.

Protocol. SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova: "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", ACM CCS 2020), the k-regular-graph variant of SecAgg
(Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
ACM CCS 2017). It is NOT reimplemented here: the server runs Flower's
`SecAggPlusWorkflow` inside its legacy `DefaultWorkflow` (with a `LegacyContext` and the legacy
FedAvg/FedProx), each client runs Flower's `secaggplus_mod` around a `client_fn` ClientApp.
Per round and client: setup (two X25519 key pairs) -> share keys (Shamir shares of the mask seed
and of sk1, encrypted pairwise) -> collect masked vectors (local training, then the quantized,
example-weighted parameters plus a private mask and pairwise masks) -> unmask (shares that let
the server remove the masks of the survivors and of the dropped). The aggregator only learns
the weighted sum; it tolerates dropouts while every survivor keeps >= reconstructionThreshold
live neighbours.

What pqfed adds, as composition:
* `signing_mod` (client, placed OUTSIDE `secaggplus_mod`): every reply the client sends in every
  stage is signed with ML-DSA (pqc.signing.sign_update) over a canonical SHA3-256 digest of the
  reply's records, bound to (stage, Flower node id, job, round = the server round). The public
  keys of the setup stage are thus bound to the client's certified identity. The setup reply
  carries the certificate; later stages of the round carry only manifest + signature.
* `SignedReplyGrid` (server): wraps the Flower Grid and verifies every reply (certificate
  against the federation CA and its newest revocation list, job, round, stage, node binding,
  digest) BEFORE the SecAgg+ workflow sees it; one certificate may answer for only one
  Flower node per round (no Sybil nodes behind one identity). A failing reply is dropped,
  noted in the round record and appended to the signed audit log; to SecAgg+ it is a
  dropout, tolerated up to its threshold. The setup-stage signatures are forwarded with the
  public keys in the share-keys stage, and `signing_mod` verifies every neighbour's signature
  (its certificate against the CA and the node's newest revocation list) before
  `secaggplus_mod` uses a key, so the aggregator cannot substitute the Diffie-Hellman keys
  (the signed-key "active adversary" setting of Bonawitz et al. CCS 2017 section 6, with
  ML-DSA in place of the PKI signature scheme).
  Not covered: their ConsistencyCheck round (Flower's SecAgg+ has none), so a malicious server
  could still equivocate about which clients dropped; the threat model is a semi-honest
  aggregator plus an active network / impersonation adversary.
* `_DropoutSafeSecAggPlus`: Flower's workflow counts a client that stops before it has shared
  its key shares (stage 0 or 1) as "dead" in the unmask stage, where nobody holds its shares, and
  the round halts. Like Bonawitz's U2, such a client is removed from the round instead (its
  masks were never added by anyone); likewise a dropped client's masks are only removed for the
  neighbours that actually sent masked vectors. The cryptography stays Flower's.
* Round records, checkpoints, resume and central evaluation via RoundRecorder (status.json as in
  pqfed.services.serverapp); participants are the certified node ids whose masked vectors were
  summed.

Limits: differential privacy and update compression are not combined with SecAgg+ here
(`check_secagg_spec` refuses them); SecAgg+ sums full parameters, clipped to +-clippingRange.

Why one module of ~700 lines (past our ~500-line habit): the client's `signing_mod` and the
server's `SignedReplyGrid` are the two ends of one signed protocol over one canonical digest
(`reply_digest`) and one stage binding, and the workflow and strategy subclasses only adapt
Flower's SecAgg+ to it; split, each half would import the other's constants and digest. Its
in-process test harness lives in services/testing.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import (
    DEFAULT_TTL,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import make_message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import FedProx as LegacyFedProx
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from pqfed.pqc import (
    AuditLog,
    Certificate,
    PqcError,
    Role,
    SignedUpdate,
    TrustAnchor,
    TrustStore,
    UpdateManifest,
    sign_update,
    verify_update,
)
from pqfed.services import clientapp
from pqfed.services.identity_dir import identity_source, load_identity, trust_store
from pqfed.services.mods import Handler
from pqfed.services.records import (
    array_record,
    arrays_digest_bytes,
    config_record,
    float_arrays,
    job_spec,
    metric_record,
    number,
)
from pqfed.services.rounds import RoundRecorder
from pqfed.services.spec import FederationJobSpec, JobSpecError
from pqfed.services.strategies import clients_per_round

log = logging.getLogger("pqfed.services.secagg")

SERVERAPP = "pqfed.services.secagg:secagg_server_app"
CLIENTAPP = "pqfed.services.secagg:secagg_client_app"
SIGNATURE_KEY = "pqfed-signature"  # ConfigRecord added to every client reply
PEER_KEYS_KEY = "pqfed-peer-signatures"  # share-keys stage: signed setup replies of neighbours
REPLY_CONTEXT = b"pqfed/secagg-reply/v1"
SIGNER_ROLES = (Role.CLIENT, Role.EDGE)
# Stages answered under the identity a node proved in the setup stage of the same round.
BOUND_STAGES = (Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)


# ---------------------------------------------------------------- spec ----------------------

def check_secagg_spec(spec: FederationJobSpec, source: str = "spec") -> None:
    """Refuses (JobSpecError naming the field) what Flower's SecAgg+ or this module cannot run."""
    sa = spec.secure_aggregation
    problems: dict[str, str] = {}
    if not sa.enabled:
        problems["spec.secureAggregation.enabled"] = "the SecAgg+ apps need enabled: true"
    if sa.num_shares < 3:
        problems["spec.secureAggregation.numShares"] = (
            "Flower's SecAgg+ needs at least 3 shares; raise numShares")
    if sa.reconstruction_threshold < 2:
        problems["spec.secureAggregation.reconstructionThreshold"] = (
            "must be >= 2 (one share would reveal a client's mask seed)")
    elif sa.reconstruction_threshold >= sa.num_shares:
        problems["spec.secureAggregation.reconstructionThreshold"] = (
            "Flower's SecAgg+ needs reconstructionThreshold < numShares")
    if spec.privacy.enabled:
        problems["spec.privacy.enabled"] = (
            "differential privacy is not combined with secure aggregation in this release; "
            "disable one of them")
    if spec.compression.method != "none":
        problems["spec.compression.method"] = (
            "SecAgg+ masks dense quantized parameters; use method: none with secure aggregation")
    if problems:
        raise JobSpecError(source, problems)


def stage_secagg_app(dest: Path) -> Path:
    """The Flower App dir with the SecAgg+ components (for `flower.submit_run`)."""
    from pqfed.services import flower as fr

    return fr.stage_app_dir(dest, serverapp=SERVERAPP, clientapp=CLIENTAPP)


# ---------------------------------------------------------------- canonical digest ----------

def _feed(h: Any, tag: bytes, data: bytes) -> None:
    h.update(tag + len(data).to_bytes(8, "big") + data)


def _feed_value(h: Any, value: object) -> None:
    if isinstance(value, bool):
        _feed(h, b"?", b"\x01" if value else b"\x00")
    elif isinstance(value, int):
        _feed(h, b"i", str(value).encode())
    elif isinstance(value, float):
        _feed(h, b"f", struct.pack(">d", value))
    elif isinstance(value, str):
        _feed(h, b"s", value.encode())
    elif isinstance(value, bytes):
        _feed(h, b"y", value)
    elif isinstance(value, list):
        _feed(h, b"[", str(len(value)).encode())
        for item in value:
            _feed_value(h, item)
    else:
        raise TypeError(f"unsupported record value {type(value).__name__}")


def reply_digest(content: RecordDict, *, stage: str, node_id: int) -> bytes:
    """SHA3-256 over (stage, Flower node id, every record but the signature), keys sorted, values
    type-tagged: identical on both ends of a protobuf round trip."""
    h = hashlib.sha3_256(REPLY_CONTEXT)
    _feed(h, b"h", json.dumps([stage, node_id]).encode())
    for key in sorted(content.keys()):
        if key == SIGNATURE_KEY:
            continue
        record = content[key]
        if isinstance(record, ArrayRecord):
            _feed(h, b"A", key.encode())
            _feed(h, b"d", arrays_digest_bytes(record))
        elif isinstance(record, ConfigRecord | MetricRecord):
            _feed(h, b"C" if isinstance(record, ConfigRecord) else b"M", key.encode())
            items = sorted(record.items())
            _feed(h, b"n", str(len(items)).encode())
            for name, value in items:
                _feed(h, b"k", name.encode())
                _feed_value(h, value)
        else:
            raise TypeError(f"unsupported record {type(record).__name__}")
    return h.digest()


def _stage(msg: Message) -> str:
    """The SecAgg+ stage an instruction asks for, else its message type."""
    rec = msg.content.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    if isinstance(rec, ConfigRecord) and isinstance(rec.get(Key.STAGE), str):
        return cast(str, rec[Key.STAGE])
    return msg.metadata.message_type


def _group_round(msg: Message) -> int:
    try:
        return int(msg.metadata.group_id)
    except ValueError:
        return 0


def _setup_digest(node_id: int, keys: list[bytes]) -> bytes:
    """The digest a node signed for its setup reply (its two SecAgg+ public keys)."""
    pk1, pk2 = keys
    record = ConfigRecord({Key.PUBLIC_KEY_1: pk1, Key.PUBLIC_KEY_2: pk2}, False)
    return reply_digest(RecordDict({RECORD_KEY_CONFIGS: record}), stage=Stage.SETUP,
                        node_id=node_id)


# ---------------------------------------------------------------- client side ---------------

def _verify_peer_keys(msg: Message, peers: ConfigRecord, trust: TrustAnchor | TrustStore,
                      job: str, rnd: int) -> None:
    """Share-keys stage: every forwarded public key pair must carry its owner's signature,
    by a certificate not revoked by the newest list in force (`trust.anchor`)."""
    keys = msg.content[RECORD_KEY_CONFIGS]
    assert isinstance(keys, ConfigRecord)
    me = msg.metadata.dst_node_id
    owners: dict[str, str] = {}
    for nid_text, pair in keys.items():
        if nid_text == Key.STAGE:
            continue
        raw = peers.get(nid_text)
        if not isinstance(raw, bytes) or not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"public keys of node {nid_text} come without their signature")
        signed = SignedUpdate.from_bytes(raw)
        manifest = verify_update(signed, _setup_digest(int(nid_text), cast(list[bytes], pair)),
                                 trust.anchor, job=job, round_number=rnd, roles=SIGNER_ROLES)
        if manifest.node_id in owners.values():
            raise ValueError(f"identity {manifest.node_id} signed for two nodes")
        owners[nid_text] = manifest.node_id
    if str(me) not in owners:
        raise ValueError("own public keys missing from the share-keys stage")


def signing_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Outermost client mod: verifies neighbours' signed keys (share-keys stage), then signs
    whatever the inner mods (secaggplus_mod) reply, in every stage."""
    stage = _stage(msg)  # read now: secaggplus_mod pops the stage key
    rnd = _group_round(msg)
    job = str(context.run_config["job"])
    ident, _ = load_identity(str(context.node_config["identity-dir"]))
    trust = trust_store(str(context.node_config["identity-dir"]))
    peers = msg.content.get(PEER_KEYS_KEY) if msg.has_content() else None
    if peers is not None:
        del msg.content[PEER_KEYS_KEY]
    if stage == Stage.SHARE_KEYS:
        if not isinstance(peers, ConfigRecord):
            raise ValueError("share-keys stage without the neighbours' key signatures")
        _verify_peer_keys(msg, peers, trust, job, rnd)
    reply: Message = call_next(msg, context)
    if reply.has_error():
        return reply
    t0 = time.perf_counter()
    digest = reply_digest(reply.content, stage=stage, node_id=msg.metadata.dst_node_id)
    signed = sign_update(ident, job, rnd, digest)
    record: dict[str, bytes | float] = (
        # The setup reply carries the certificate; later stages of the round only manifest +
        # signature (the server verifies them against the certificate bound at setup).
        {"manifest": signed.manifest.to_bytes(), "signature": signed.signature}
        if stage in BOUND_STAGES else {"signed": signed.to_bytes()})
    record["sign-seconds"] = time.perf_counter() - t0
    reply.content[SIGNATURE_KEY] = ConfigRecord(record)  # type: ignore[arg-type]
    return reply


def _local_message(context: Context, content: RecordDict, rnd: int) -> Message:
    """A train instruction built inside the ClientApp for its train handler (no TaskIdentity
    needed)."""
    meta = Metadata(run_id=context.run_id, message_id="", src_node_id=0,
                    dst_node_id=context.node_id, reply_to_message_id="", group_id=str(rnd),
                    created_at=time.time(), ttl=DEFAULT_TTL, message_type=MessageType.TRAIN)
    return make_message(meta, content)


class SecAggClient(NumPyClient):
    """The legacy-API face of pqfed's ClientApp handlers (services/clientapp.py: same model,
    data, seeds and metrics): SecAgg+ needs a FitRes to mask. `train` and `evaluate` are the
    handlers it calls (benchmarks pass a poisoning one, services/poisoning.py)."""

    def __init__(self, context: Context, *, train: Handler = clientapp.train,
                 evaluate: Handler = clientapp.evaluate) -> None:
        self.pq_context = context
        self.train_handler = train
        self.evaluate_handler = evaluate

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]
            ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        rnd = int(number(config.get("round", 0)))
        content = RecordDict({
            "arrays": ArrayRecord([np.asarray(p) for p in parameters]),
            "config": ConfigRecord({"round": rnd, "proximal-mu": number(
                config.get("proximal_mu", 0.0))}),
        })
        reply = self.train_handler(_local_message(self.pq_context, content, rnd),
                                   self.pq_context)
        metrics = metric_record(reply.content)
        weights = float_arrays(array_record(reply.content, "arrays"))
        out: dict[str, Scalar] = {k: cast(Scalar, v) for k, v in metrics.items()}
        return weights, int(number(metrics["num-examples"])), out

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]
                 ) -> tuple[float, int, dict[str, Scalar]]:
        content = RecordDict({"arrays": ArrayRecord([np.asarray(p) for p in parameters])})
        reply = self.evaluate_handler(_local_message(self.pq_context, content, 0),
                                      self.pq_context)
        m = metric_record(reply.content)
        return (number(m["eval-loss"]), int(number(m["num-examples"])),
                {"accuracy": number(m["eval-acc"])})


def client_fn(context: Context) -> Any:
    return SecAggClient(context).to_client()


secagg_client_app = ClientApp(client_fn=client_fn, mods=[signing_mod, secaggplus_mod])


# ---------------------------------------------------------------- server side ---------------

class SecAggRecorder(RoundRecorder):
    """RoundRecorder plus byte counters for the four SecAgg+ exchanges of a round."""

    def add_sent(self, rnd: int, nbytes: int) -> None:
        self._rec(rnd).bytes_sent += nbytes

    def add_received(self, rnd: int, nbytes: int) -> None:
        self._rec(rnd).bytes_received += nbytes


def content_bytes(msg: Message) -> int:
    """Serialized size of the message's records (what crosses the wire, less framing)."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(msg.content).ByteSize()) if msg.has_content() else 0


class SignedReplyGrid(Grid):
    """Delegates to `inner`; verifies every reply's ML-DSA signature before the caller (the
    SecAgg+ workflow) sees it, and forwards the signed setup keys in the share-keys stage.

    Outgoing messages get group_id = the global round (workflow round + `round_offset` after a
    resume): the clients sign that round, so replies cannot be replayed across rounds or runs.
    """

    def __init__(self, inner: Grid, *, trust: TrustAnchor | TrustStore, job: str,
                 recorder: SecAggRecorder,
                 audit: AuditLog | None, round_offset: int = 0) -> None:
        self.inner = inner
        self.trust = trust
        self.job = job
        self.recorder = recorder
        self.audit = audit
        self.offset = round_offset
        self._expect: dict[int, tuple[int, str]] = {}  # Flower node -> (round, stage) asked
        self._round = -1
        self._bound: dict[int, str] = {}  # Flower node -> certified node id (this round)
        self._certs: dict[int, Certificate] = {}  # Flower node -> its certificate (this round)
        self._setup_signed: dict[int, bytes] = {}  # Flower node -> its signed setup reply
        self.rejected: list[tuple[int, int, str, str]] = []  # (round, node, stage, reason)

    # -- plain delegation
    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    # -- outgoing
    def _outgoing(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        for m in out:
            rnd = self.offset + _group_round(m)
            m.metadata.group_id = str(rnd)
            stage = _stage(m)
            if stage == Stage.SETUP and rnd != self._round:
                self._round, self._bound, self._certs, self._setup_signed = rnd, {}, {}, {}
            dst = m.metadata.dst_node_id
            self._expect[dst] = (rnd, stage)
            if stage == Stage.SHARE_KEYS:
                keys = m.content[RECORD_KEY_CONFIGS]
                assert isinstance(keys, ConfigRecord)
                m.content[PEER_KEYS_KEY] = ConfigRecord({
                    nid: self._setup_signed[int(nid)] for nid in keys
                    if nid != Key.STAGE and int(nid) in self._setup_signed})
            if rnd > self.offset:
                self.recorder.add_sent(rnd, content_bytes(m))
        return out

    # -- incoming
    def _reject(self, rnd: int, node: int, stage: str, reason: str) -> None:
        log.warning("round %d: rejected %s reply from node %d: %s", rnd, stage, node, reason)
        self.rejected.append((rnd, node, stage, reason))
        self.recorder.note_rejected(rnd, f"{stage} reply of node {node}: {reason}")
        if self.audit:
            self.audit.append("update-rejected", round=rnd, node=str(node), stage=stage,
                              reason=reason)

    def _check(self, reply: Message) -> Message | None:
        node = reply.metadata.src_node_id
        if node not in self._expect:
            log.warning("dropping a reply from node %d that was not asked for", node)
            return None
        rnd, stage = self._expect.pop(node)
        if reply.has_error():
            self.recorder.note_failure(rnd, f"node {node} ({stage}): {reply.error.reason}")
            return reply
        try:
            if SIGNATURE_KEY not in reply.content:
                raise ValueError(f"unsigned reply (no {SIGNATURE_KEY!r} record)")
            sig = config_record(reply.content, SIGNATURE_KEY)
            bound = self._bound.get(node)
            if stage in BOUND_STAGES:
                if bound is None:
                    raise ValueError("no verified setup reply from this node in this round")
                manifest_raw, signature = sig["manifest"], sig["signature"]
                if not isinstance(manifest_raw, bytes) or not isinstance(signature, bytes):
                    raise TypeError("signature record fields are not bytes")
                signed = SignedUpdate(UpdateManifest.from_bytes(manifest_raw), signature,
                                      self._certs[node])
                nsig = len(manifest_raw) + len(signature)
            else:
                raw = sig["signed"]
                if not isinstance(raw, bytes):
                    raise TypeError("signature record is not bytes")
                signed = SignedUpdate.from_bytes(raw)
                nsig = len(raw)
            t0 = time.perf_counter()
            digest = reply_digest(reply.content, stage=stage, node_id=node)
            # The newest revocation list in force (a TrustStore re-reads it mid-job).
            manifest: UpdateManifest = verify_update(
                signed, digest, self.trust.anchor, job=self.job, round_number=rnd,
                roles=SIGNER_ROLES, node_id=bound)
            if stage == Stage.SETUP:
                others = {v: k for k, v in self._bound.items() if k != node}
                if manifest.node_id in others:
                    raise ValueError(f"identity {manifest.node_id} already answers as node "
                                     f"{others[manifest.node_id]} in this round")
                self._bound[node] = manifest.node_id
                self._certs[node] = signed.certificate
                self._setup_signed[node] = signed.to_bytes()
            self.recorder.add_crypto(rnd, time.perf_counter() - t0)
        except (PqcError, KeyError, TypeError, ValueError) as exc:
            self._reject(rnd, node, stage, str(exc))
            return None
        self.recorder.add_crypto(rnd, number(sig.get("sign-seconds", 0.0)))
        del reply.content[SIGNATURE_KEY]
        nbytes = content_bytes(reply) + nsig
        if stage == Stage.COLLECT_MASKED_VECTORS:
            self.recorder.note_update(rnd, manifest.node_id, nbytes)
            if self.audit:
                self.audit.append("update-accepted", round=rnd, node=manifest.node_id,
                                  digest=manifest.digest.hex(), size=nbytes, stage=stage)
        elif rnd > self.offset:
            self.recorder.add_received(rnd, nbytes)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._outgoing(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [r for r in (self._check(m) for m in self.inner.pull_messages(message_ids))
                if r is not None]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        out = self._outgoing(messages)
        stages = {_stage(m) for m in out}
        replies = [r for r in (self._check(m) for m in
                               self.inner.send_and_receive(out, timeout=timeout))
                   if r is not None]
        for node in [m.metadata.dst_node_id for m in out]:
            self._expect.pop(node, None)  # no reply in time: a late one is not accepted
        if out and stages == {Stage.COLLECT_MASKED_VECTORS}:
            self.recorder.mark(_group_round(out[0]), "replies")
        return replies


class _DropoutSafeSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow with the dropout sets of Bonawitz et al. (U1..U3): a node that
    stops before its key shares reached anyone (setup / share-keys stage) leaves the round, and
    a node dropped before sending its masked vector only has masks with neighbours that did send
    theirs. Flower 1.42 otherwise halts the round in the unmask stage (nobody holds the shares of
    a node that dropped early; its neighbours fail looking them up)."""

    def _shrink_to_active(self, state: WorkflowState) -> bool:
        state.sampled_node_ids = set(state.active_node_ids)
        state.nid_to_neighbours = {
            nid: nbrs & state.active_node_ids
            for nid, nbrs in state.nid_to_neighbours.items() if nid in state.active_node_ids}
        return self._check_threshold(state)

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return bool(super().setup_stage(grid, context, state)) and self._shrink_to_active(state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState
                         ) -> bool:
        super().share_keys_stage(grid, context, state)
        return self._shrink_to_active(state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext,
                                     state: WorkflowState) -> bool:
        ok = bool(super().collect_masked_vectors_stage(grid, context, state))
        alive = state.active_node_ids
        for nid in state.sampled_node_ids - alive:
            state.nid_to_neighbours[nid] &= alive | {nid}
        return ok


class RecordingStrategy(LegacyStrategy):
    """Delegates to Flower's legacy FedAvg/FedProx; writes the round records (start, per-client
    timing, minClients) around it. Its `evaluate_fn` is the RoundRecorder's evaluation."""

    def __init__(self, inner: LegacyFedAvg, *, recorder: RoundRecorder, round_offset: int,
                 min_clients: int, dtypes: list[np.dtype[Any]]) -> None:
        self.inner = inner
        self.recorder = recorder
        self.offset = round_offset
        self.min_clients = min_clients
        self.dtypes = dtypes
        self.aggregated: set[int] = set()  # rounds with a new global model
        self.explained: set[int] = set()  # rounds without one, reason noted

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, Any]]:
        self.recorder.start_round(self.offset + server_round, bytes_sent=0)
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        rnd = self.offset + server_round
        for _, res in results:
            m = res.metrics
            self.recorder.note_compute(rnd, number(m.get("train-seconds", 0.0)))
            self.recorder.note_timeline(rnd, number(m.get("t-received", 0.0)),
                                        number(m.get("t-replied", 0.0)))
        if len(results) < self.min_clients:
            self._keep(rnd, f"{len(results)} masked updates, fewer than minClients="
                            f"{self.min_clients}; global model kept")
            return None, {}
        params, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if params is None:
            self._keep(rnd, "strategy returned no aggregate; global model kept")
            return None, metrics
        arrays = [np.asarray(a, dtype=d) for a, d in
                  zip(parameters_to_ndarrays(params), self.dtypes, strict=True)]
        self.aggregated.add(rnd)
        return ndarrays_to_parameters(arrays), metrics

    def _keep(self, rnd: int, reason: str) -> None:
        self.explained.add(rnd)
        self.recorder.note_failure(rnd, reason, model_kept=True)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, Any]]:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters
                 ) -> tuple[float, dict[str, Scalar]] | None:
        rnd = self.offset + server_round
        if server_round > 0 and rnd not in self.aggregated | self.explained:
            self._keep(rnd, "SecAgg+ halted (too few verified clients for the reconstruction "
                            "threshold); global model kept")
        return self.inner.evaluate(server_round, parameters)


def _max_weight(spec: FederationJobSpec) -> float:
    """Largest client training set: SecAgg+ scales each update by num_examples / max_weight
    before quantizing, so a tight bound keeps the quantization error small."""
    from pqfed.services.data import load_task

    data = load_task(spec.task, spec.clients, spec.dataset.partition, spec.dataset.seed)
    return float(max(len(y) for y in data.y_train))


def build_legacy_strategy(spec: FederationJobSpec, initial: NDArrays, *,
                          evaluate_fn: Callable[..., Any], round_offset: int) -> LegacyFedAvg:
    """Flower's legacy FedAvg/FedProx configured like strategies.build_strategy."""
    per_round = clients_per_round(spec)
    n = spec.min_clients

    def fit_config(server_round: int) -> dict[str, Scalar]:
        return {"round": round_offset + server_round}

    kwargs: dict[str, Any] = {
        "fraction_fit": per_round / spec.clients, "fraction_evaluate": 0.0,
        "min_fit_clients": n, "min_evaluate_clients": 0, "min_available_clients": n,
        "evaluate_fn": evaluate_fn, "on_fit_config_fn": fit_config,
        "initial_parameters": ndarrays_to_parameters(list(initial)),
        "fit_metrics_aggregation_fn": lambda _: {},
    }
    if spec.strategy.name == "FedProx":
        return LegacyFedProx(proximal_mu=spec.strategy.proximal_mu, **kwargs)
    return LegacyFedAvg(**kwargs)


secagg_server_app = ServerApp()


@secagg_server_app.main()
def secagg_main(grid: Grid, context: Context) -> None:
    from pqfed.services.models import build_model, get_weights

    spec = job_spec(context)
    check_secagg_spec(spec, "run_config.spec")
    job = str(context.run_config["job"])
    state_dir = Path(str(context.run_config["state-dir"]))
    ident, _ = load_identity(str(context.run_config["identity-dir"]))
    trust = trust_store(str(context.run_config["identity-dir"]))
    recorder = SecAggRecorder(state_dir, job, spec)
    done, checkpoint = recorder.resume()
    initial = [np.asarray(w) for w in (checkpoint if checkpoint is not None else get_weights(
        build_model(spec.task, seed=spec.dataset.seed)))]
    rounds = recorder.rounds_allowed() - done
    if rounds <= 0:
        recorder.finish()
        return
    audit = AuditLog.resume(state_dir / "audit.jsonl", ident, renewed=identity_source(
        str(context.run_config["identity-dir"])))
    audit.append("job-started" if done == 0 else "job-resumed", job=job, fromRound=done,
                 aggregation="SecAgg+")

    def evaluate_fn(server_round: int, ndarrays: NDArrays, _config: dict[str, Scalar]
                    ) -> tuple[float, dict[str, Scalar]]:
        out = recorder.evaluate(server_round, ArrayRecord(list(ndarrays)), offset=done)
        return float(out["loss"]), {"accuracy": float(out["accuracy"])}

    strategy = RecordingStrategy(
        build_legacy_strategy(spec, initial, evaluate_fn=evaluate_fn, round_offset=done),
        recorder=recorder, round_offset=done, min_clients=spec.min_clients,
        dtypes=[w.dtype for w in initial])
    sa = spec.secure_aggregation
    workflow = DefaultWorkflow(fit_workflow=_DropoutSafeSecAggPlus(
        sa.num_shares, sa.reconstruction_threshold, max_weight=_max_weight(spec),
        clipping_range=sa.clipping_range, quantization_range=sa.quantization_range,
        timeout=spec.timeouts.round_seconds))
    legacy = LegacyContext(context, config=ServerConfig(
        num_rounds=rounds, round_timeout=spec.timeouts.round_seconds), strategy=strategy)
    workflow(SignedReplyGrid(grid, trust=trust, job=job, recorder=recorder, audit=audit,
                             round_offset=done), legacy)
    audit.append("job-finished", job=job, rounds=recorder.completed_rounds())
    recorder.finish(audit_head=audit.head)
