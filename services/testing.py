"""In-process harnesses for tests and benchmarks; no production path imports this module.

SecAgg+ over a loopback wire: `LoopbackGrid` runs the ClientApp of every node in this process
and sends each instruction and reply through a protobuf round trip (`wire`), as SuperLink and
SuperNode deliver them, so server and clients share no objects; `simulate_secagg` runs a whole
SecAgg+ job that way (services/secagg.py's apps, Flower's SecAgg+, ML-DSA, round records).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from pqfed.pqc import Certificate, Role
from pqfed.pqc.truststore import CRL_FILE
from pqfed.services.node_defaults import STATUS_FILE
from pqfed.services.poisoning import ATTACK_KEY, poisoning_secagg_client_app
from pqfed.services.secagg import secagg_client_app, secagg_server_app
from pqfed.services.simulation import InProcessGrid
from pqfed.services.spec import FederationJobSpec


def wire(msg: Message) -> Message:
    """The message after a protobuf round trip, as SuperLink/SuperNode deliver it."""
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    proto = ProtoMessage.FromString(message_to_proto(msg).SerializeToString())
    return message_from_proto(proto)


Intercept = Callable[[Message, Message], Message | None]


class LoopbackGrid(InProcessGrid):
    """simulation.InProcessGrid with a wire: each instruction and reply crosses a protobuf round
    trip (no shared objects between server and clients), the ClientApp is `app`, a ClientApp
    exception becomes an error reply, and `intercept(instruction, reply)` may alter or drop a
    reply on its way to the server (tests: tampering, eavesdropping)."""

    def __init__(self, contexts: dict[int, Context], app: ClientApp | None = None,
                 intercept: Intercept | None = None) -> None:
        super().__init__(contexts)
        self.app = app or secagg_client_app
        self.intercept = intercept

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            instruction = wire(m)
            try:
                reply = self.app(instruction, self.contexts[m.metadata.dst_node_id])
            except Exception as exc:  # what the SuperNode reports for a failing ClientApp
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, repr(exc)),
                                reply_to=instruction)
            delivered = self.intercept(m, wire(reply)) if self.intercept else wire(reply)
            mid = f"{m.metadata.dst_node_id}-{len(self._replies)}-{time.monotonic_ns()}"
            if delivered is not None:
                self._replies[mid] = delivered
            ids.append(mid)
        return ids


def simulate_secagg(spec: FederationJobSpec, *, job: str = "bench", workdir: Path | None = None,
             app: ClientApp | None = None, intercept: Intercept | None = None,
             attackers: frozenset[int] = frozenset(),
             revoked: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Runs the SecAgg+ job in process (real apps, Flower's SecAgg+, ML-DSA, protobuf wire);
    returns the status document plus "weights" (last checkpoint) and "workdir". The CA
    revokes the certificates of the clients in `revoked` (partition ids) before the job
    starts: its list is in every identity directory (crl.pem). Clients in `attackers` flip
    their labels (services/poisoning.py; `app` defaults to its SecAgg+ client then)."""
    from flwr.supercore.task_identity import TaskIdentity

    from pqfed.pqc import CertificateAuthority

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    root = Path(tmp.name) if tmp else cast(Path, workdir)
    try:
        ca = CertificateAuthority.generate(job)
        spec_json = spec.model_dump_json(by_alias=True)
        contexts: dict[int, Context] = {}

        def identity_dir(name: str, role: Role) -> Path:
            d = root / "identities" / name
            d.mkdir(parents=True, exist_ok=True)
            ca.new_identity(name, role).save(d / "tls.crt", d / "tls.key")
            (d / "ca.crt").write_text(ca.root.to_pem())
            return d

        for i in range(spec.clients):
            node_config: dict[str, Any] = {
                "partition-id": i, "identity-dir": str(identity_dir(f"client-{i}", Role.CLIENT))}
            if i in attackers:
                node_config[ATTACK_KEY] = "label-flip"
            contexts[100 + i] = Context(run_id=1, node_id=100 + i, node_config=node_config,
                                        state=RecordDict(),
                                        run_config={"spec": spec_json, "job": job})
        server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={
            "spec": spec_json, "job": job, "state-dir": str(root / "state"),
            "identity-dir": str(identity_dir("aggregator", Role.AGGREGATOR))})
        if revoked:
            crl = None
            for i in sorted(revoked):
                cert = Certificate.from_pem(
                    (root / "identities" / f"client-{i}" / "tls.crt").read_text())
                crl = ca.revoke(crl, cert.serial)
            assert crl is not None
            for d in (root / "identities").iterdir():
                (d / CRL_FILE).write_text(crl.to_pem())
        t0 = time.time()
        if app is None and attackers:
            app = poisoning_secagg_client_app
        secagg_server_app(LoopbackGrid(contexts, app, intercept), server)
        status: dict[str, Any] = json.loads((root / "state" / STATUS_FILE).read_text())
        status["wallSeconds"] = time.time() - t0
        ckpt = root / "state" / "checkpoints" / f"round-{status['currentRound']:05d}.npz"
        if ckpt.exists():
            with np.load(ckpt) as z:
                status["weights"] = [z[f"arr_{i}"] for i in range(len(z.files))]
        status["workdir"] = str(root)
        return status
    finally:
        if tmp:
            tmp.cleanup()
