"""pqfed's Flower ServerApp (Flower 1.42 Message API, deployment mode) and `VerifiedStrategy`.

`VerifiedStrategy` wraps any Flower strategy (FedAvg, FedProx, FedTrimmedAvg, Krum, MultiKrum,
optionally inside Flower's central-DP wrapper) and overrides only what pqfed adds: it signs
(central aggregator) or relays (edge) the model signature of each round; verifies every
reply's signature before anything else touches it and accepts at most one update per
certified node id and round (Flower node ids are not bound to certificates, so this is what
stops one enrolled node from voting twice through several SuperNodes); takes each update's
weight from its signed manifest only; records rejections in the signed audit log, decodes
compressed deltas, and records each round (accuracy, bytes, crypto time, participants) with a
checkpoint so a restarted aggregator resumes after the last completed round.

The client side is services/clientapp.py; the records both exchange, services/records.py.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from pqfed.pqc import (
    EPOCH_LEN,
    AuditLog,
    Identity,
    PqcError,
    Role,
    SignedUpdate,
    TrustAnchor,
    TrustStore,
    UpdateManifest,
    UpdateRejected,
    sign_model,
    verify_update,
)
from pqfed.pqc.signing import X509SignedUpdate, X509Verifier, verify_update_x509
from pqfed.services import compression, downlink
from pqfed.services.downlink import Broadcaster, weights_digest
from pqfed.services.identity_dir import (
    identity_source,
    load_identity,
    trust_store,
    x509_trust_store,
)
from pqfed.services.records import (
    BLOB_KEY,
    BROADCAST_KEY,
    MODEL_SIG_KEY,
    SITE_SIGNED,
    UPDATE_KEY,
    blob_of,
    config_record,
    float_arrays,
    job_spec,
    metric_record,
    number,
)
from pqfed.services.rounds import RoundRecorder
from pqfed.services.strategies import build_strategy

log = logging.getLogger("pqfed.services")


class VerifiedStrategy(Strategy):
    """Signs (or relays) the round's model, then verifies, audits and decodes every training
    reply, and delegates to `inner` with at most one update per certified node.

    `model_signer`: the central aggregator's identity, which signs each model version it
    sends (pqc.signing.sign_model). An edge has none: it sets `relay_model_sig` each round to
    the central aggregator's signature of the model it forwards, unchanged; `renewed` gives
    the model signer's current identity after a certificate renewal.

    `sites` (tls13 jobs with spec.externalClients): the job's X.509 CA and CRL and the
    external node ids; updates signed with a site-held X.509 key are verified against them
    (pqc.signing.verify_update_x509). Without it such an update is refused."""

    def __init__(self, inner: Strategy, *, trust: TrustAnchor | TrustStore, job: str,
                 recorder: RoundRecorder, audit: AuditLog | None, round_offset: int,
                 min_clients: int, roles: tuple[Role, ...] = (Role.CLIENT,),
                 downlink: Broadcaster | None = None,
                 model_signer: Identity | None = None,
                 renewed: Callable[[], Identity] | None = None,
                 sites: tuple[X509Verifier, tuple[str, ...]] | None = None) -> None:
        self.inner = inner
        self.sites = sites
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
        self._target = float_arrays(arrays)
        if self.downlink is not None:
            # Nodes train from the public model; the inner strategy (and a DP wrapper's
            # clipping) must see that same model as the round's starting point.
            arrays = ArrayRecord(list(self.downlink.advance(self._target)))
        self._global = float_arrays(arrays)
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
            record = config_record(reply.content, UPDATE_KEY)
            blob = blob_of(reply.content)
            t0 = time.perf_counter()
            if SITE_SIGNED in record:
                manifest = self._verify_site(record[SITE_SIGNED], blob, rnd)
            else:
                raw = record["signed"]
                if not isinstance(raw, bytes):
                    raise TypeError("signed manifest is not bytes")
                # The newest revocation list in force (a TrustStore re-reads it mid-job).
                manifest = verify_update(SignedUpdate.from_bytes(raw), blob, self.trust.anchor,
                                         job=self.job, round_number=rnd, roles=self.roles)
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
        metrics = metric_record(reply.content)
        # The weight the inner strategy uses (FedAvg's "num-examples") is the signed one.
        metrics["num-examples"] = manifest.num_examples
        self.recorder.add_crypto(rnd, number(metrics.get("sign-seconds", 0.0)))
        self.recorder.note_compute(rnd, number(metrics.get("train-seconds", 0.0)))
        self.recorder.note_timeline(rnd, number(metrics.get("t-received", 0.0)),
                                    number(metrics.get("t-replied", 0.0)))
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

    def _verify_site(self, raw: object, blob: bytes, rnd: int) -> UpdateManifest:
        """An external node's update, signed with its site-held X.509 key."""
        if not isinstance(raw, bytes):
            raise TypeError("site-signed manifest is not bytes")
        signed = X509SignedUpdate.from_bytes(raw)
        if self.sites is None:
            raise UpdateRejected(signed.manifest.node_id, "signed with an X.509 site key, "
                                 "but this job has no externalClients")
        trust, node_ids = self.sites
        return verify_update_x509(signed, blob, trust, job=self.job, round_number=rnd,
                                  node_ids=node_ids, roles=self.roles)

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
                float_arrays(arrays), self._target, self._global, strict=True)])
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
    ident, _ = load_identity(str(context.run_config["identity-dir"]))
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
    # External nodes sign with their site-held X.509 keys: checked against the job's X.509 CA
    # and CRL, which every pod of a tls13 job holds (re-read when the CRL changes).
    sites = ((x509_trust_store(str(context.run_config["identity-dir"])),
              spec.external_node_ids) if spec.external_clients else None)
    strategy = VerifiedStrategy(build_strategy(spec), trust=trust, job=job, recorder=recorder,
                                audit=audit, round_offset=done, min_clients=spec.min_clients,
                                roles=roles, downlink=downlink.for_spec(spec),
                                # edges forward the model: sign it for their clients
                                model_signer=ident if spec.hierarchy.enabled else None,
                                renewed=renewed, sites=sites)
    train_config = ConfigRecord()  # FedProx adds "proximal-mu" itself
    strategy.start(grid, ArrayRecord(list(initial)), num_rounds=rounds,
                   timeout=spec.timeouts.round_seconds, train_config=train_config,
                   evaluate_fn=functools.partial(recorder.evaluate, offset=done))
    audit.append("job-finished", job=job, rounds=recorder.completed_rounds())
    recorder.finish(audit_head=audit.head)
