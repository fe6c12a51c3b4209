"""The client mods of pqfed's ClientApp (Flower's Mod API): one job each.

A mod is `(Message, Context, call_next) -> Message`. `ClientApp(mods=[m0, m1, ...])` nests
them: m0 sees the instruction first and the reply last. `client_mods()` is the chain, outermost
first:

    sign_update_mod -> decode_broadcast_mod -> verify_model_mod -> encode_update_mod
        -> local_dp_mod [-> benchmark mods, e.g. poisoning.PoisoningMod] -> train handler

Why this order:
* `sign_update_mod` is outermost, so it signs (ML-DSA, pqc.signing.sign_update) exactly the
  bytes that leave the node, with their aggregation weight; no mod can change them afterwards.
* `decode_broadcast_mod` comes before every mod that reads the model: the central aggregator's
  signature covers the dense weights (`verify_model_mod`), the update is the difference to them
  (`encode_update_mod`) and Flower's LocalDpMod clips that difference.
* `verify_model_mod` rejects an unsigned, altered or replayed model before any training.
* `encode_update_mod` (delta, compression, error feedback) is outside `local_dp_mod`: it
  compresses what differential privacy already clipped and noised (post-processing keeps the
  guarantee), and its error-feedback residual is built from noised deltas only.
* benchmark mods sit innermost, so an emulated attacker's update passes through the same DP,
  compression and signing as an honest one.
Each mod checks what it needs from the mods around it and raises `ModChainError` naming the
misplaced mod, so a reordered chain fails on its first message instead of signing dense
weights or verifying a compressed broadcast.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from pqfed.pqc import ModelManifest, ModelRejected, SignedModel, sign_update, verify_model
from pqfed.pqc.signing import sign_update_x509
from pqfed.services import compression
from pqfed.services.downlink import Broadcast, Held, apply, weights_digest
from pqfed.services.identity_dir import is_site_directory, load_identity, load_site_key
from pqfed.services.records import (
    AGGREGATOR_NODE_ID,
    BLOB_KEY,
    BROADCAST_KEY,
    EDGE_SOCKET_KEY,
    MODEL_SEEN_KEY,
    MODEL_SIG_KEY,
    MODEL_SIGNER_KEY,
    PUBLIC_KEY,
    PUBLIC_META_KEY,
    RESIDUAL_KEY,
    SITE_SIGNED,
    UPDATE_KEY,
    Weights,
    array_record,
    blob_of,
    config_record,
    float_arrays,
    job_spec,
    metric_record,
    number,
    round_of,
)
from pqfed.services.rounds import local_dp_budget

Handler = Callable[[Message, Context], Message]
Mod = Callable[[Message, Context, Handler], Message]


class ModChainError(RuntimeError):
    """A client mod found a message another mod should have transformed first: the chain in
    `ClientApp(mods=[...])` is out of order (see `client_mods`)."""

    def __init__(self, mod: str, reason: str) -> None:
        super().__init__(f"{mod}: {reason}; build the chain with pqfed.services.mods."
                         "client_mods()")
        self.mod = mod
        self.reason = reason


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN


def _require_dense(msg: Message, mod: str) -> None:
    if BROADCAST_KEY in msg.content:
        raise ModChainError(mod, "got a compressed broadcast; decode_broadcast_mod must come "
                                 "before it")


# ---------------------------------------------------------------- decode_broadcast_mod --

def decode_broadcast_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Replaces a compressed model broadcast (services/downlink.py) by the dense weights it
    stands for, in every message type; other messages pass unchanged."""
    if BROADCAST_KEY in msg.content:
        # A new RecordDict: in-process grids share one content object between messages.
        fields = {k: v for k, v in msg.content.items() if k != BROADCAST_KEY}
        fields["arrays"] = ArrayRecord(receive_broadcast(msg, context))
        msg.content = RecordDict(fields)
    return call_next(msg, context)


def receive_broadcast(msg: Message, context: Context) -> Weights:
    """A compressed model broadcast: applies the steps this node lacks to the model it holds
    (kept in the node's state) and returns the published weights, checked against the
    broadcast's digest. Raises (-> an error reply) when anything does not match; the
    aggregator then sends the whole model next round. Authenticity is the central
    aggregator's model signature, checked after this (verify_model_mod)."""
    spec = job_spec(context)
    version = config_record(msg.content, BROADCAST_KEY)["version"]
    broadcast = Broadcast.from_bytes(blob_of(msg.content))
    if version != broadcast.target:
        raise ValueError(f"broadcast version {broadcast.target} != announced {version!r}")
    held = None
    if PUBLIC_KEY in context.state:
        meta = config_record(context.state, PUBLIC_META_KEY)
        epoch, held_version = meta["epoch"], meta["version"]
        if isinstance(epoch, bytes) and isinstance(held_version, int):
            held = Held(epoch, held_version, float_arrays(array_record(context.state,
                                                                       PUBLIC_KEY)))
    template: Weights | None = None
    if held is not None:
        template = held.weights
    elif EDGE_SOCKET_KEY not in context.node_config:  # an edge has no torch model to match
        from pqfed.services.models import build_model, get_weights

        template = get_weights(build_model(spec.task, seed=spec.dataset.seed))
    new = apply(broadcast, held, template)
    context.state[PUBLIC_KEY] = ArrayRecord(list(new.weights))
    context.state[PUBLIC_META_KEY] = ConfigRecord({"epoch": new.epoch, "version": new.version})
    return list(new.weights)


# ---------------------------------------------------------------- verify_model_mod ------

def verify_model_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Before training: checks the central aggregator's signature over the model, where the
    node requires one (node_config `model-signer`) or one is sent."""
    if _is_train(msg) and (MODEL_SIGNER_KEY in context.node_config
                           or MODEL_SIG_KEY in msg.content):
        _require_dense(msg, "verify_model_mod")
        check_model_signature(msg, context)  # raises (-> an error reply) before any training
    return call_next(msg, context)


def check_model_signature(msg: Message, context: Context) -> ModelManifest:
    """A node's check of the model it is asked to train: signed by the pinned central
    aggregator (node_config `model-signer`, default "aggregator", under the node's CA) for
    this job and the announced round, over exactly the weights received, and not older than
    what this node trained from before (same epoch: a later round and model version; another
    epoch, i.e. a restarted aggregator: not an earlier round). Raises ModelRejected.

    Required of nodes behind an edge (`model-signer` in their node config, set from their own
    job file by `pqfed fl client`); a node of a flat job talks to the aggregator itself over
    the channel pinned to it, and checks a signature only where one is sent."""
    _, trust = load_identity(str(context.node_config["identity-dir"]))
    signer = str(context.node_config.get(MODEL_SIGNER_KEY, AGGREGATOR_NODE_ID))
    if MODEL_SIG_KEY not in msg.content:
        raise ModelRejected(f"the model carries no signature of {signer!r}; nodes train only "
                            "on models the central aggregator signed")
    raw = config_record(msg.content, MODEL_SIG_KEY)["signed"]
    if not isinstance(raw, bytes):
        raise ModelRejected("the model signature is not bytes")
    m = verify_model(SignedModel.from_bytes(raw), trust, job=str(context.run_config["job"]),
                     signer=signer, round_number=round_of(msg),
                     digest=weights_digest(float_arrays(array_record(msg.content, "arrays"))))
    if MODEL_SEEN_KEY in context.state:
        seen = config_record(context.state, MODEL_SEEN_KEY)
        seen_round, seen_version = int(number(seen["round"])), int(number(seen["version"]))
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


# ---------------------------------------------------------------- local_dp_mod ----------

def local_dp_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Flower's LocalDpMod with the job's clipping norm and per-round (epsilon, delta), on
    training messages of jobs with `privacy.mode: local`. An edge forwards its clients'
    already-noised aggregate and adds nothing."""
    spec = job_spec(context)
    if (not _is_train(msg) or not (spec.privacy.enabled and spec.privacy.mode == "local")
            or EDGE_SOCKET_KEY in context.node_config):
        return call_next(msg, context)
    _require_dense(msg, "local_dp_mod")
    from flwr.clientapp.mod import LocalDpMod

    eps_round, delta_round = local_dp_budget(spec)
    dp = LocalDpMod(spec.privacy.clipping_norm, spec.privacy.clipping_norm, eps_round,
                    delta_round)

    def trained(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if not reply.has_error() and (UPDATE_KEY in reply.content
                                      or _is_blob(array_record(reply.content, "arrays"))):
            raise ModChainError("local_dp_mod", "got an encoded update, not trained weights; "
                                                "encode_update_mod must come before (outside) it")
        return reply

    return dp(msg, context, trained)


# ---------------------------------------------------------------- encode_update_mod -----

def encode_update_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Replaces the trained weights of a training reply by one blob: their difference to the
    instruction's model, compressed as the job says (services/compression.py). Sparse methods
    keep what they leave out in the node's state and add it to the next round's difference
    (error feedback)."""
    if not _is_train(msg):
        return call_next(msg, context)
    _require_dense(msg, "encode_update_mod")
    global_w = float_arrays(array_record(msg.content, "arrays"))
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if UPDATE_KEY in reply.content or _is_blob(array_record(reply.content, "arrays")):
        raise ModChainError("encode_update_mod", "got an encoded or signed reply; it must "
                                                 "come after (inside) sign_update_mod")
    spec = job_spec(context)
    local_w = float_arrays(array_record(reply.content, "arrays"))
    delta = [lw - gw for lw, gw in zip(local_w, global_w, strict=True)]
    method = compression.Method.parse(spec.compression.method)
    sparse = method in (compression.Method.TOPK, compression.Method.TOPK_INT8)
    if sparse and RESIDUAL_KEY in context.state:
        residual_prev = float_arrays(array_record(context.state, RESIDUAL_KEY))
        delta = [d + r for d, r in zip(delta, residual_prev, strict=True)]
    blob, residual = compression.encode(delta, method, spec.compression.topk_fraction)
    if sparse:
        context.state[RESIDUAL_KEY] = ArrayRecord(list(residual))
    return Message(RecordDict({
        "arrays": ArrayRecord({BLOB_KEY: Array(np.frombuffer(blob, dtype=np.uint8))}),
        "metrics": metric_record(reply.content),
    }), reply_to=msg)


def _is_blob(record: ArrayRecord) -> bool:
    return list(record.keys()) == [BLOB_KEY] and record[BLOB_KEY].dtype == "uint8"


# ---------------------------------------------------------------- sign_update_mod -------

def sign_update_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Signs a training reply's encoded update with the node's identity (ML-DSA over the
    blob, the job, the round and the aggregation weight: the examples and clients it stands
    for, which the aggregator takes from the signed manifest only): the pqfed-format identity
    of an operator-run node, or a site's own X.509 key (an external node)."""
    reply = call_next(msg, context)
    if not _is_train(msg) or reply.has_error():
        return reply
    if UPDATE_KEY in reply.content:
        raise ModChainError("sign_update_mod", "the reply is signed already; one "
                                               "sign_update_mod per chain")
    if not _is_blob(array_record(reply.content, "arrays")):
        raise ModChainError("sign_update_mod", "got dense weights, not an encoded update; "
                                               "encode_update_mod must come after (inside) it")
    directory = str(context.node_config["identity-dir"])
    metrics = metric_record(reply.content)
    job, rnd, blob = str(context.run_config["job"]), round_of(msg), blob_of(reply.content)
    weight = {"num_examples": int(number(metrics.get("num-examples", 0))),
              "contributors": int(number(metrics.get("clients", 1)))}
    t0 = time.perf_counter()
    if is_site_directory(directory):
        # An external node (spec.externalClients): its own key and the X.509 certificate the
        # job's CA issued for it; the aggregator checks it against that CA (pqc/signing.py).
        key, cert = load_site_key(directory)
        field, signed = SITE_SIGNED, sign_update_x509(key, cert, job, rnd, blob,
                                                      **weight).to_bytes()
    else:
        ident, _ = load_identity(directory)
        field, signed = "signed", sign_update(ident, job, rnd, blob, **weight).to_bytes()
    metrics["sign-seconds"] = time.perf_counter() - t0
    reply.content[UPDATE_KEY] = ConfigRecord({field: signed})
    return reply


def client_mods(*innermost: Mod) -> list[Mod]:
    """pqfed's client chain (module docstring), with `innermost` (benchmark mods only, e.g.
    poisoning.PoisoningMod) next to the handler."""
    return [sign_update_mod, decode_broadcast_mod, verify_model_mod, encode_update_mod,
            local_dp_mod, *innermost]


def handler_with(mod: Mod, handler: Handler) -> Handler:
    """`handler` behind `mod`, for code that calls a handler directly (SecAgg+'s client)."""
    return lambda msg, context: mod(msg, context, handler)

