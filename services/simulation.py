"""In-process federation for benchmarks: the real ServerApp strategy stack (VerifiedStrategy
around Flower's strategies and DP wrapper) and the real ClientApp (training, compression,
ML-DSA signing) exchanging real Flower messages in memory.

Only the transport is left out, so accuracy/privacy/robustness/compression studies run in
minutes; the transport (PQC sidecars vs plaintext, Flower's deployment runtime) is measured
separately by running whole federations with `pqfed run`.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from pqfed.pqc import CertificateAuthority, Role
from pqfed.services import downlink
from pqfed.services.clientapp import client_app as pqfed_client_app
from pqfed.services.models import build_model, get_weights
from pqfed.services.mods import client_mods
from pqfed.services.poisoning import ATTACK_KEY, poisoning_client_app
from pqfed.services.records import AGGREGATOR_NODE_ID, EDGE_SOCKET_KEY, MODEL_SIGNER_KEY
from pqfed.services.rounds import RoundRecorder
from pqfed.services.serverapp import VerifiedStrategy
from pqfed.services.spec import FederationJobSpec
from pqfed.services.strategies import build_strategy


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp contexts in this process."""

    def __init__(self, contexts: dict[int, Context],
                 client_apps: dict[int, ClientApp] | None = None) -> None:
        self.contexts = contexts
        self.client_apps = client_apps or {}  # per-node app; default: pqfed's ClientApp
        self._run = Run.create_empty(run_id=1)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            node = m.metadata.dst_node_id
            reply = self.client_apps.get(node, pqfed_client_app)(m, self.contexts[node])
            mid = f"{m.metadata.dst_node_id}-{len(self._replies)}"
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))


def _identity_dir(root: Path, ca: CertificateAuthority, node_id: str, role: Role) -> str:
    d = root / "identities" / node_id
    d.mkdir(parents=True, exist_ok=True)
    ca.new_identity(node_id, role).save(d / "tls.crt", d / "tls.key")
    (d / "ca.crt").write_text(ca.root.to_pem())
    return str(d)


def _edge_grid(spec: FederationJobSpec, job: str, ca: CertificateAuthority, root: Path,
               clients: dict[int, Context]) -> InProcessGrid:
    """The central grid of a hierarchical job: one node per edge aggregator, each running the
    real edge round (services/edge.py) over an in-process grid of its member clients."""
    from pqfed.services.edge import EdgeAggregator, edge_train
    from pqfed.services.hierarchy import edge_members, edge_node_id

    contexts: dict[int, Context] = {}
    client_apps: dict[int, ClientApp] = {}
    for e in range(spec.hierarchy.edges):
        node = edge_node_id(e)
        members = InProcessGrid({100 + i: clients[100 + i] for i in edge_members(spec, e)})
        edge = EdgeAggregator(members, spec, job, trust=ca.trust, audit=None,
                              recorder=RoundRecorder(root / "state" / node, job, spec))
        app = ClientApp(mods=client_mods())
        app.train()(functools.partial(edge_train, run_round=edge.run_round))
        contexts[10 + e] = Context(
            run_id=1, node_id=10 + e, state=RecordDict(), run_config=clients[100].run_config,
            node_config={"partition-id": e, EDGE_SOCKET_KEY: "in-process",
                         "identity-dir": _identity_dir(root, ca, node, Role.EDGE)})
        client_apps[10 + e] = app
    return InProcessGrid(contexts, client_apps)


def simulate(spec: FederationJobSpec, *, attackers: frozenset[int] = frozenset(),
             attack: str = "label-flip", job: str = "bench",
             workdir: Path | None = None,
             client_app: ClientApp | None = None) -> dict[str, Any]:
    """Runs the job in process; returns the status document (rounds, accuracy, bytes...).

    `client_app` replaces pqfed's ClientApp on every client node (a study that decides
    which samples each client holds, e.g. services/mia.py; it keeps `mods.client_mods()`).
    Clients in `attackers` run `poisoning.poisoning_client_app` with node_config `attack`."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    root = Path(tmp.name) if tmp else Path(workdir)  # type: ignore[arg-type]
    try:
        ca = CertificateAuthority.generate(job)
        spec_json = spec.model_dump_json(by_alias=True)
        run_config: dict[str, Any] = {"spec": spec_json, "job": job}
        contexts: dict[int, Context] = {}
        for i in range(spec.clients):
            node_config: dict[str, Any] = {
                "partition-id": i, "identity-dir": _identity_dir(root, ca, f"client-{i}",
                                                                 Role.CLIENT)}
            if spec.hierarchy.enabled:
                node_config[MODEL_SIGNER_KEY] = AGGREGATOR_NODE_ID
            if i in attackers:
                node_config[ATTACK_KEY] = attack
            contexts[100 + i] = Context(run_id=1, node_id=100 + i, node_config=node_config,
                                        state=RecordDict(), run_config=run_config)
        per_node = dict.fromkeys(contexts, client_app) if client_app is not None else {}
        per_node.update({100 + i: poisoning_client_app for i in attackers})
        grid = InProcessGrid(contexts, per_node)
        if spec.hierarchy.enabled:
            grid = _edge_grid(spec, job, ca, root, contexts)
        recorder = RoundRecorder(root / "state", job, spec)
        strategy = VerifiedStrategy(
            build_strategy(spec), trust=ca.trust, job=job, recorder=recorder, audit=None,
            round_offset=0, min_clients=spec.min_clients,
            roles=(Role.EDGE,) if spec.hierarchy.enabled else (Role.CLIENT,),
            downlink=downlink.for_spec(spec),
            model_signer=(ca.new_identity("aggregator", Role.AGGREGATOR)
                          if spec.hierarchy.enabled else None))
        initial = get_weights(build_model(spec.task, seed=spec.dataset.seed))
        t0 = time.time()
        strategy.start(grid, ArrayRecord(list(initial)),
                       num_rounds=recorder.rounds_allowed(), timeout=3600,
                       train_config=ConfigRecord(),
                       evaluate_fn=functools.partial(recorder.evaluate, offset=0))
        recorder.finish()
        status = dict(recorder.status)
        status["wallSeconds"] = time.time() - t0
        out: dict[str, Any] = json.loads(json.dumps(status))
        ckpt = root / "state" / "checkpoints" / f"round-{recorder.completed_rounds():05d}.npz"
        if ckpt.exists():
            import numpy as np

            with np.load(ckpt) as z:
                out["weights"] = [z[f"arr_{i}"] for i in range(len(z.files))]
        return out
    finally:
        if tmp:
            tmp.cleanup()
