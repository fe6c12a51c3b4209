"""The Flower ServerApp and ClientApp of pqfed (Flower 1.42 Message API, deployment mode).

What pqfed adds to Flower, as composition rather than rewrites:
* ClientApp `pqfed_mod` (a Flower mod): first checks the central aggregator's signature over
  the model it is asked to train (pqc.signing.verify_model: pinned signer, job, round,
  digest, no older version), then optional Flower LocalDpMod, then update compression with
  error feedback, then an ML-DSA signature over the exact bytes sent and their aggregation
  weight (pqc.signing.sign_update).
* ServerApp `VerifiedStrategy`: wraps any Flower strategy (FedAvg, FedProx, FedTrimmedAvg,
  Krum, MultiKrum, optionally inside Flower's central-DP wrapper); signs (central aggregator)
  or relays (edge) the model signature of each round; verifies every reply's signature
  before anything else touches it and accepts at most one update per certified node id and
  round (Flower node ids are not bound to certificates, so this is what stops one enrolled
  node from voting twice through several SuperNodes); takes each update's weight from its
  signed manifest only; records rejections in the signed audit log, decodes compressed
  deltas, and records each round (accuracy, bytes, crypto time, participants) with a
  checkpoint so a restarted aggregator resumes after the last completed round.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from pqfed.pqc.audit import AuditLog
from pqfed.pqc.errors import PqcError, UpdateRejected
from pqfed.pqc.identity import Certificate, Identity, Role, TrustAnchor
from pqfed.pqc.signing import (
    EPOCH_LEN,
    ModelManifest,
    ModelRejected,
    SignedModel,
    SignedUpdate,
    UpdateManifest,
    sign_model,
    sign_update,
    verify_model,
    verify_update,
)
from pqfed.pqc.truststore import TrustStore
from pqfed.services import compression, downlink
from pqfed.services.downlink import Broadcast, Broadcaster, Held, apply, weights_digest
from pqfed.services.edge import (
    AGGREGATOR_NODE_ID,
    EDGE_SOCKET_KEY,
    MODEL_SIGNER_KEY,
    EdgeRoundError,
    EdgeRunner,
    request_edge_round,
)
from pqfed.services.rounds import RoundRecorder, local_dp_budget
from pqfed.services.spec import FederationJobSpec, parse_spec
from pqfed.services.strategies import build_strategy

log = logging.getLogger("pqfed.services")
UPDATE_KEY = "pqfed-update"  # ConfigRecord carrying the signed manifest and blob
BLOB_KEY = "blob"
BROADCAST_KEY = "pqfed-broadcast"  # ConfigRecord marking a compressed model broadcast
MODEL_SIG_KEY = "pqfed-model-sig"  # ConfigRecord: the central aggregator's SignedModel
MODEL_SEEN_KEY = "pqfed-model-seen"  # node state: (epoch, round, version) last trained from


# ---------------------------------------------------------------- shared helpers --------

def job_spec(context: Context) -> FederationJobSpec:
    return _spec_from_json(str(context.run_config["spec"]))


@functools.lru_cache(maxsize=4)
def _spec_from_json(text: str) -> FederationJobSpec:
    return parse_spec(json.loads(text), "run_config.spec")


def identity_source(directory: str) -> Callable[[], Identity]:
    """The current (possibly renewed) identity of `directory`, read on each call; what an
    audit log follows to hand over to a renewed certificate (pqc/audit.py)."""
    return lambda: _identity(directory)[0]


def _identity(directory: str) -> tuple[Identity, TrustAnchor]:
    """The node identity in `directory`, re-read when the operator renewed it (the kubelet
    swaps tls.crt and tls.key together; the cache key is their modification times)."""
    d = Path(directory)
    stamp = tuple((d / f).stat().st_mtime_ns for f in ("tls.crt", "tls.key"))
    return _load_identity(directory, stamp)


@functools.lru_cache(maxsize=4)
def _load_identity(directory: str, _stamp: tuple[int, ...]) -> tuple[Identity, TrustAnchor]:
    d = Path(directory)
    ident = Identity.load_files(d / "tls.crt", d / "tls.key")
    trust = TrustAnchor(Certificate.from_pem((d / "ca.crt").read_text()))
    return ident, trust


def trust_store(directory: str) -> TrustStore:
    """The node's CA root and the newest revocation list in `directory` (ca.crt, crl.pem):
    one store per directory and CA file (a replaced ca.crt is another federation: a new store)
    and process; its `anchor` re-reads the list when it changes."""
    ca = (Path(directory) / "ca.crt").stat()
    return _trust_store(directory, (ca.st_ino, ca.st_mtime_ns, ca.st_size))


@functools.lru_cache(maxsize=8)
def _trust_store(directory: str, _stamp: tuple[int, ...]) -> TrustStore:
    return TrustStore.from_identity_dir(Path(directory))


def arrays_digest_bytes(record: ArrayRecord) -> bytes:
    """Canonical bytes of an ArrayRecord (names, dtypes, shapes, data in order)."""
    h = hashlib.sha3_256()
    for name, arr in record.items():
        h.update(json.dumps([name, arr.dtype, list(arr.shape), arr.stype]).encode())
        h.update(arr.data)
    return h.digest()


def _arrays(record: ArrayRecord) -> list[np.ndarray[Any, Any]]:
    return [np.asarray(a, dtype=np.float32) for a in record.to_numpy_ndarrays()]


# Typed access to message records: a reply of the wrong shape raises TypeError and is
# rejected like any other bad update.
def _record(content: RecordDict, key: str) -> ArrayRecord:
    rec = content[key]
    if not isinstance(rec, ArrayRecord):
        raise TypeError(f"{key!r} is not an ArrayRecord")
    return rec


def _config(content: RecordDict, key: str) -> ConfigRecord:
    rec = content[key]
    if not isinstance(rec, ConfigRecord):
        raise TypeError(f"{key!r} is not a ConfigRecord")
    return rec


def _metrics(content: RecordDict, key: str = "metrics") -> MetricRecord:
    rec = content[key]
    if not isinstance(rec, MetricRecord):
        raise TypeError(f"{key!r} is not a MetricRecord")
    return rec


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def _round_of(msg: Message) -> int:
    return int(_number(_config(msg.content, "config")["round"]))


# ---------------------------------------------------------------- client side -----------

def pqfed_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Client-side pipeline around the train handler: [LocalDpMod] -> compress -> sign."""
    if BROADCAST_KEY in msg.content:
        # A new RecordDict: in-process grids share one content object between messages.
        fields = {k: v for k, v in msg.content.items() if k != BROADCAST_KEY}
        fields["arrays"] = ArrayRecord(receive_broadcast(msg, context))
        msg.content = RecordDict(fields)
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)  # type: ignore[no-any-return]
    if MODEL_SIGNER_KEY in context.node_config or MODEL_SIG_KEY in msg.content:
        check_model_signature(msg, context)  # raises (-> an error reply) before any training
    spec = job_spec(context)
    global_record = _record(msg.content, "arrays")
    edge = EDGE_SOCKET_KEY in context.node_config
    if spec.privacy.enabled and spec.privacy.mode == "local" and not edge:
        # (an edge forwards its clients' already-noised aggregate)
        from flwr.clientapp.mod import LocalDpMod

        eps_round, delta_round = local_dp_budget(spec)
        reply: Message = LocalDpMod(spec.privacy.clipping_norm, spec.privacy.clipping_norm,
                                    eps_round, delta_round)(msg, context, call_next)
    else:
        reply = call_next(msg, context)
    if reply.has_error():
        return reply
    global_w = _arrays(global_record)
    local_w = _arrays(_record(reply.content, "arrays"))
    delta = [lw - gw for lw, gw in zip(local_w, global_w, strict=True)]
    method = compression.Method.parse(spec.compression.method)
    sparse = method in (compression.Method.TOPK, compression.Method.TOPK_INT8)
    if sparse and "residual" in context.state:
        # Error feedback: add what earlier rounds did not send (kept in the node's state).
        residual_prev = _arrays(_record(context.state, "residual"))
        delta = [d + r for d, r in zip(delta, residual_prev, strict=True)]
    blob, residual = compression.encode(delta, method, spec.compression.topk_fraction)
    if sparse:
        context.state["residual"] = ArrayRecord(list(residual))
    ident, _ = _identity(str(context.node_config["identity-dir"]))
    round_number = _round_of(msg)
    metrics = _metrics(reply.content)
    t0 = time.perf_counter()
    # The aggregation weight travels inside the signed manifest (the metric is a copy).
    signed = sign_update(ident, str(context.run_config["job"]), round_number, blob,
                         num_examples=int(_number(metrics.get("num-examples", 0))),
                         contributors=int(_number(metrics.get("clients", 1))))
    metrics["sign-seconds"] = time.perf_counter() - t0
    content = RecordDict({
        "arrays": ArrayRecord({BLOB_KEY: Array(np.frombuffer(blob, dtype=np.uint8))}),
        "metrics": metrics,
        UPDATE_KEY: ConfigRecord({"signed": signed.to_bytes()}),
    })
    return Message(content, reply_to=msg)


def check_model_signature(msg: Message, context: Context) -> ModelManifest:
    """A node's check of the model it is asked to train: signed by the pinned central
    aggregator (node_config `model-signer`, default "aggregator", under the node's CA) for
    this job and the announced round, over exactly the weights received, and not older than
    what this node trained from before (same epoch: a later round and model version; another
    epoch, i.e. a restarted aggregator: not an earlier round). Raises ModelRejected.

    Required of nodes behind an edge (`model-signer` in their node config, set from their own
    job file by `pqfed fl client`); a node of a flat job talks to the aggregator itself over
    the channel pinned to it, and checks a signature only where one is sent."""
    _, trust = _identity(str(context.node_config["identity-dir"]))
    signer = str(context.node_config.get(MODEL_SIGNER_KEY, AGGREGATOR_NODE_ID))
    if MODEL_SIG_KEY not in msg.content:
        raise ModelRejected(f"the model carries no signature of {signer!r}; nodes train only "
                            "on models the central aggregator signed")
    raw = _config(msg.content, MODEL_SIG_KEY)["signed"]
    if not isinstance(raw, bytes):
        raise ModelRejected("the model signature is not bytes")
    m = verify_model(SignedModel.from_bytes(raw), trust, job=str(context.run_config["job"]),
                     signer=signer, round_number=_round_of(msg),
                     digest=weights_digest(_arrays(_record(msg.content, "arrays"))))
    if MODEL_SEEN_KEY in context.state:
        seen = _config(context.state, MODEL_SEEN_KEY)
        seen_round, seen_version = int(_number(seen["round"])), int(_number(seen["version"]))
        if seen["epoch"] == m.epoch and (m.round <= seen_round or m.version <= seen_version):
            raise ModelRejected(f"round {m.round} version {m.version} is not newer than round "
                                f"{seen_round} version {seen_version} already trained from "
                                "(replayed model)")
        if seen["epoch"] != m.epoch and m.round < seen_round:
            raise ModelRejected(f"round {m.round} is older than round {seen_round} already "
                                "trained from (replayed model of an earlier epoch)")
    context.state[MODEL_SEEN_KEY] = ConfigRecord({"epoch": m.epoch, "round": m.round,
                                                  "version": m.version})
    return m


def receive_broadcast(msg: Message, context: Context) -> list[np.ndarray[Any, Any]]:
    """A compressed model broadcast (services/downlink.py): applies the steps this node lacks
    to the model it holds (kept in the node's state) and returns the published weights,
    checked against the broadcast's digest. Raises (-> an error reply) when anything does not
    match; the aggregator then sends the whole model next round. Authenticity is the central
    aggregator's model signature, checked after this (check_model_signature)."""
    spec = job_spec(context)
    version = _config(msg.content, BROADCAST_KEY)["version"]
    broadcast = Broadcast.from_bytes(_record(msg.content, "arrays")[BLOB_KEY].numpy().tobytes())
    if version != broadcast.target:
        raise ValueError(f"broadcast version {broadcast.target} != announced {version!r}")
    held = None
    if "public" in context.state:
        meta = _config(context.state, "public-meta")
        epoch, held_version = meta["epoch"], meta["version"]
        if isinstance(epoch, bytes) and isinstance(held_version, int):
            held = Held(epoch, held_version, _arrays(_record(context.state, "public")))
    template: list[np.ndarray[Any, Any]] | None = None
    if held is not None:
        template = held.weights
    elif EDGE_SOCKET_KEY not in context.node_config:  # an edge has no torch model to match
        from pqfed.services.models import build_model, get_weights

        template = get_weights(build_model(spec.task, seed=spec.dataset.seed))
    new = apply(broadcast, held, template)
    context.state["public"] = ArrayRecord(list(new.weights))
    context.state["public-meta"] = ConfigRecord({"epoch": new.epoch, "version": new.version})
    return list(new.weights)


client_app = ClientApp(mods=[pqfed_mod])


@functools.lru_cache(maxsize=2)
def _client_data(spec_json: str, partition_id: int) -> Any:
    from pqfed.services.data import load_task

    spec = _spec_from_json(spec_json)
    data = load_task(spec.task, spec.clients, spec.dataset.partition, spec.dataset.seed)
    return data.client(partition_id)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    received = time.time()
    if EDGE_SOCKET_KEY in context.node_config:  # an edge trains nothing itself (no torch)
        path = Path(str(context.node_config[EDGE_SOCKET_KEY]))
        return edge_train(msg, context, functools.partial(request_edge_round, path), received)
    import torch

    from pqfed.services.models import build_model, get_weights, set_weights, train_epochs

    torch.set_num_threads(int(os.environ.get("PQFED_TORCH_THREADS", "1")))
    spec = job_spec(context)
    pid = int(_number(context.node_config["partition-id"]))
    data = _client_data(str(context.run_config["spec"]), pid)
    x, y = data.x_train, data.y_train
    attack = str(context.node_config.get("attack", ""))
    if attack.startswith("label-flip"):
        # Poisoning emulation for robustness benchmarks: a consistent label permutation.
        n_classes = int(np.max(y)) + 1
        y = (n_classes - 1 - np.asarray(y)).astype(y.dtype)
    model = build_model(spec.task, seed=spec.dataset.seed)
    set_weights(model, _arrays(_record(msg.content, "arrays")))
    t0 = time.perf_counter()
    loss = train_epochs(model, x, y, spec.training.local_epochs, spec.training.batch_size,
                        spec.training.learning_rate,
                        proximal_mu=_number(_config(msg.content, "config").get("proximal-mu", 0.0)),
                        seed=spec.dataset.seed + pid * 1000 + _round_of(msg))
    metrics = MetricRecord({"train-loss": float(loss), "num-examples": len(y),
                            "train-seconds": time.perf_counter() - t0,
                            "t-received": received, "t-replied": time.time()})
    weights = get_weights(model)
    if attack == "label-flip-boost":
        # Model-replacement style boosting (Bagdasaryan et al., 2020): scale the poisoned
        # delta so it survives averaging with honest updates.
        start = _arrays(_record(msg.content, "arrays"))
        weights = [g + 5.0 * (w - g) for w, g in zip(weights, start, strict=True)]
    return Message(RecordDict({"arrays": ArrayRecord(weights),
                               "metrics": metrics}), reply_to=msg)


def edge_train(msg: Message, context: Context, run_round: EdgeRunner,
               received: float | None = None) -> Message:
    """An edge's upstream train handler: one edge round over the edge's own clients
    (`run_round(round, global weights, config, timeout, model_sig)`; services/edge.py). The
    central aggregator's model signature (checked by pqfed_mod) goes to the clients as is."""
    received = time.time() if received is None else received
    spec = job_spec(context)
    config = {k: v for k, v in _config(msg.content, "config").items()
              if isinstance(v, int | float | str | bool)}
    sig = _config(msg.content, MODEL_SIG_KEY)["signed"]
    if not isinstance(sig, bytes):
        raise TypeError("the model signature is not bytes")
    try:
        weights, edge_metrics = run_round(_round_of(msg), _arrays(_record(msg.content, "arrays")),
                                          config, float(spec.timeouts.round_seconds), sig)
    except EdgeRoundError as exc:
        raise RuntimeError(str(exc)) from None  # Flower turns it into an error reply
    metrics = MetricRecord({**edge_metrics, "t-received": received, "t-replied": time.time()})
    return Message(RecordDict({"arrays": ArrayRecord(list(weights)), "metrics": metrics}),
                   reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from pqfed.services.models import build_model, set_weights
    from pqfed.services.models import evaluate as eval_model

    spec = job_spec(context)
    data = _client_data(str(context.run_config["spec"]),
                        int(_number(context.node_config["partition-id"])))
    model = build_model(spec.task, seed=spec.dataset.seed)
    set_weights(model, _arrays(_record(msg.content, "arrays")))
    loss, acc = eval_model(model, data.x_test, data.y_test)
    return Message(RecordDict({"metrics": MetricRecord(
        {"eval-loss": loss, "eval-acc": acc, "num-examples": len(data.y_test)})}),
        reply_to=msg)




# ---------------------------------------------------------------- server side -----------

class VerifiedStrategy(Strategy):
    """Signs (or relays) the round's model, then verifies, audits and decodes every training
    reply, and delegates to `inner` with at most one update per certified node.

    `model_signer`: the central aggregator's identity, which signs each model version it
    sends (pqc.signing.sign_model). An edge has none: it sets `relay_model_sig` each round to
    the central aggregator's signature of the model it forwards, unchanged; `renewed` gives
    the model signer's current identity after a certificate renewal."""

    def __init__(self, inner: Strategy, *, trust: TrustAnchor | TrustStore, job: str,
                 recorder: RoundRecorder, audit: AuditLog | None, round_offset: int,
                 min_clients: int, roles: tuple[Role, ...] = (Role.CLIENT,),
                 downlink: Broadcaster | None = None,
                 model_signer: Identity | None = None,
                 renewed: Callable[[], Identity] | None = None) -> None:
        self.inner = inner
        self.downlink = downlink
        self.model_signer = model_signer
        # Where a renewed model-signer identity comes from (the identity directory).
        self.renewed = renewed
        self.relay_model_sig: bytes | None = None
        # Model versions are (epoch, version): the broadcaster's, or this strategy's own
        # epoch with the round as version when broadcasts stay dense.
        self._epoch = downlink.epoch if downlink is not None else os.urandom(EPOCH_LEN)
        self._voted: dict[int, set[str]] = {}  # round -> certified node ids accepted
        self._target: list[np.ndarray[Any, Any]] = []
        self.roles = roles  # who may sign updates here: clients, or edges in hierarchical mode
        self.trust = trust
        self.job = job
        self.recorder = recorder
        self.audit = audit
        self.offset = round_offset
        self.min_clients = min_clients
        self._global: list[np.ndarray[Any, Any]] = []
        # What the accepted updates of the current round stand for (an edge's update counts
        # its clients and their examples).
        self.accepted_clients = 0
        self.accepted_examples = 0.0

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = self.offset + server_round
        self._target = _arrays(arrays)
        if self.downlink is not None:
            # Nodes train from the public model; the inner strategy (and a DP wrapper's
            # clipping) must see that same model as the round's starting point.
            arrays = ArrayRecord(list(self.downlink.advance(self._target)))
        self._global = _arrays(arrays)
        self.accepted_clients, self.accepted_examples = 0, 0.0
        self._voted = {rnd: set()}
        config["round"] = rnd
        msgs = list(self.inner.configure_train(server_round, arrays, config, grid))
        model_sig = self._model_signature(rnd)
        sent = 0
        for msg in msgs:
            # A new RecordDict per message: Flower strategies share one content object between
            # the round's messages, and nodes may be at different versions.
            content = dict(msg.content.items())
            if self.downlink is None:
                sent += arrays.count_bytes()
            else:
                sent += self._attach_broadcast(msg.metadata.dst_node_id, content)
            if model_sig is not None:
                content[MODEL_SIG_KEY] = ConfigRecord({"signed": model_sig})
                sent += len(model_sig)
            msg.content = RecordDict(content)
        self.recorder.start_round(rnd, bytes_sent=sent)
        return msgs

    def _model_signature(self, rnd: int) -> bytes | None:
        """The round's model signature: made here once per model version (central
        aggregator), or the relayed one (edge)."""
        if self.model_signer is None:
            return self.relay_model_sig
        if self.renewed is not None:
            try:
                self.model_signer = self.renewed()
            except (PqcError, OSError) as exc:
                log.warning("renewed identity not used for model signatures: %s", exc)
        version = self.downlink.version if self.downlink is not None else rnd
        t0 = time.perf_counter()
        signed = sign_model(self.model_signer, self.job, self._epoch, rnd, version,
                            weights_digest(self._global))
        self.recorder.add_crypto(rnd, time.perf_counter() - t0)
        return signed.to_bytes()

    def _attach_broadcast(self, node: int, content: dict[str, Any]) -> int:
        """Replaces the dense model in `content` by a compressed broadcast; returns its size."""
        assert self.downlink is not None
        data = self.downlink.broadcast_for(node).to_bytes()
        content["arrays"] = ArrayRecord({BLOB_KEY: Array(np.frombuffer(data, np.uint8))})
        content[BROADCAST_KEY] = ConfigRecord({"version": self.downlink.version})
        return len(data)

    def _check_vote(self, rnd: int, manifest: UpdateManifest) -> None:
        """One update per (round, certified node id), whichever Flower node carried it, and a
        client update stands for one client. Raises UpdateRejected."""
        if manifest.node_id in self._voted.setdefault(rnd, set()):
            raise UpdateRejected(manifest.node_id, f"a second update in round {rnd} (one update "
                                 "per node and round; the first one counts)")
        if self.roles == (Role.CLIENT,) and manifest.contributors != 1:
            raise UpdateRejected(manifest.node_id, f"a client update claims to stand for "
                                 f"{manifest.contributors} clients")

    def _verify(self, server_round: int, reply: Message) -> Message | None:
        rnd = self.offset + server_round
        node = reply.metadata.src_node_id
        if reply.has_error():
            self.recorder.note_failure(rnd, f"node {node}: {reply.error.reason}")
            if self.downlink is not None:
                self.downlink.forget(node)  # it may not hold the public model: send it whole
            return None
        try:
            raw = _config(reply.content, UPDATE_KEY)["signed"]
            if not isinstance(raw, bytes):
                raise TypeError("signed manifest is not bytes")
            signed = SignedUpdate.from_bytes(raw)
            blob = _record(reply.content, "arrays")[BLOB_KEY].numpy().tobytes()
            t0 = time.perf_counter()
            # The newest revocation list in force (a TrustStore re-reads it mid-job).
            manifest = verify_update(signed, blob, self.trust.anchor, job=self.job,
                                     round_number=rnd,
                                     roles=self.roles)
            self.recorder.add_crypto(rnd, time.perf_counter() - t0)
            self._check_vote(rnd, manifest)
            delta = compression.decode(blob, self._global)
        except (PqcError, KeyError, TypeError, ValueError) as exc:
            reason = str(exc)
            log.warning("round %d: rejected update from node %s: %s", rnd,
                        reply.metadata.src_node_id, reason)
            self.recorder.note_rejected(rnd, reason)
            if self.downlink is not None:
                self.downlink.forget(node)
            if self.audit:
                self.audit.append("update-rejected", round=rnd,
                                  node=str(reply.metadata.src_node_id), reason=reason)
            return None
        self._voted[rnd].add(manifest.node_id)
        metrics = _metrics(reply.content)
        # The weight the inner strategy uses (FedAvg's "num-examples") is the signed one.
        metrics["num-examples"] = manifest.num_examples
        self.recorder.add_crypto(rnd, _number(metrics.get("sign-seconds", 0.0)))
        self.recorder.note_compute(rnd, _number(metrics.get("train-seconds", 0.0)))
        self.recorder.note_timeline(rnd, _number(metrics.get("t-received", 0.0)),
                                    _number(metrics.get("t-replied", 0.0)))
        self.recorder.note_update(rnd, manifest.node_id, len(blob))
        self.accepted_clients += manifest.contributors
        self.accepted_examples += manifest.num_examples
        if self.audit:
            self.audit.append("update-accepted", round=rnd, node=manifest.node_id,
                              digest=manifest.digest.hex(), size=manifest.size,
                              examples=manifest.num_examples)
        if self.downlink is not None:
            self.downlink.ack(node)
        weights = [g + d for g, d in zip(self._global, delta, strict=True)]
        reply.content = RecordDict({"arrays": ArrayRecord(list(weights)), "metrics": metrics})
        return reply

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.recorder.mark(self.offset + server_round, "replies")
        valid = [m for m in (self._verify(server_round, r) for r in replies) if m is not None]
        rnd = self.offset + server_round
        if self.accepted_clients < self.min_clients:
            self.recorder.note_failure(
                rnd, f"{self.accepted_clients} valid client updates, fewer than "
                     f"minClients={self.min_clients}; global model kept", model_kept=True)
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        if arrays is not None and self.downlink is not None:
            # Server-side error feedback: what the broadcast left out of the model stays in
            # the server's model and goes out in later broadcasts.
            arrays = ArrayRecord([a + (t - g) for a, t, g in zip(
                _arrays(arrays), self._target, self._global, strict=True)])
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from pqfed.services.models import build_model, get_weights

    spec = job_spec(context)
    job = str(context.run_config["job"])
    state_dir = Path(str(context.run_config["state-dir"]))
    ident, _ = _identity(str(context.run_config["identity-dir"]))
    recorder = RoundRecorder(state_dir, job, spec)
    done, checkpoint = recorder.resume()
    initial = checkpoint if checkpoint is not None else get_weights(
        build_model(spec.task, seed=spec.dataset.seed))
    rounds = recorder.rounds_allowed() - done
    if rounds <= 0:
        recorder.finish()
        return
    # The log follows certificate renewals (a signed hand-over to each renewed identity).
    renewed = identity_source(str(context.run_config["identity-dir"]))
    audit = AuditLog.resume(state_dir / "audit.jsonl", ident, renewed=renewed)
    audit.append("job-started" if done == 0 else "job-resumed", job=job, fromRound=done)
    # In hierarchical mode only edge aggregators may send updates here (services/edge.py).
    roles = (Role.EDGE,) if spec.hierarchy.enabled else (Role.CLIENT,)
    trust = trust_store(str(context.run_config["identity-dir"]))
    strategy = VerifiedStrategy(build_strategy(spec), trust=trust, job=job, recorder=recorder,
                                audit=audit, round_offset=done, min_clients=spec.min_clients,
                                roles=roles, downlink=downlink.for_spec(spec),
                                # edges forward the model: sign it for their clients
                                model_signer=ident if spec.hierarchy.enabled else None,
                                renewed=renewed)
    train_config = ConfigRecord()  # FedProx adds "proximal-mu" itself
    strategy.start(grid, ArrayRecord(list(initial)), num_rounds=rounds,
                   timeout=spec.timeouts.round_seconds, train_config=train_config,
                   evaluate_fn=functools.partial(recorder.evaluate, offset=done))
    audit.append("job-finished", job=job, rounds=recorder.completed_rounds())
    recorder.finish(audit_head=audit.head)
