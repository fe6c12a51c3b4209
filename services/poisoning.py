"""Poisoning emulation for robustness benchmarks, as a client mod (never in production).

`PoisoningMod` makes a node whose node_config `attack` names an attack train on poisoned data
instead of its own: "label-flip" trains on a consistent label permutation (y -> C-1-y),
"label-flip-boost" also scales the poisoned update (model replacement, Bagdasaryan et al.,
"How To Backdoor Federated Learning", AISTATS 2020) so it survives averaging with honest
ones. A mod may answer without calling the next handler (Flower's Mod contract); the poisoned
training is the task's own (services/task.py), so only the labels differ.

It is innermost (mods.client_mods(PoisoningMod())): the attacker's update passes through the
same local DP, compression and ML-DSA signing as an honest one; a valid signature does not
make an update honest, which is what the robust strategies are benchmarked against.

The production ClientApp (services/clientapp.py, the Flower App's component) has no such mod:
a node_config `attack` does nothing there. Benchmarks use `poisoning_client_app` (in process:
simulation.simulate(attackers=...)), or stage a Flower App with it (`pqfed run --attackers`:
the aggregator is started with `--poisoning`, see `stage_poisoning_app`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from pqfed.services import clientapp, secagg, task
from pqfed.services.mods import Handler, ModChainError, client_mods, handler_with
from pqfed.services.records import BROADCAST_KEY, array_record, float_arrays
from pqfed.services.spec import FederationJobSpec

ATTACK_KEY = "attack"  # node_config: the attack a benchmark node emulates
ATTACKS = ("label-flip", "label-flip-boost")
CLIENTAPP = "pqfed.services.poisoning:poisoning_client_app"
SECAGG_CLIENTAPP = "pqfed.services.poisoning:poisoning_secagg_client_app"
SERVERAPP = "pqfed.services.serverapp:server_app"


class PoisoningMod:
    """Benchmark mod: on training messages of a node with node_config `attack`, replies with
    an update trained on flipped labels (boosted by `boost` for "label-flip-boost") instead
    of calling the handler; other nodes and messages pass unchanged."""

    def __init__(self, boost: float = 5.0) -> None:
        if not boost > 1.0:
            raise ValueError(f"PoisoningMod boost={boost!r}: the boost factor of "
                             "label-flip-boost must be > 1 (1 is plain label-flip)")
        self.boost = boost

    def __call__(self, msg: Message, context: Context, call_next: Handler) -> Message:
        """The poisoned reply (attackers' training messages) or `call_next`'s."""
        attack = str(context.node_config.get(ATTACK_KEY, ""))
        if not attack or msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        if attack not in ATTACKS:
            raise ValueError(f"node_config {ATTACK_KEY}={attack!r}: use one of "
                             f"{', '.join(ATTACKS)}")
        if BROADCAST_KEY in msg.content:
            raise ModChainError("PoisoningMod", "got a compressed broadcast; it belongs "
                                "innermost (mods.client_mods(PoisoningMod()))")
        received = time.time()
        data = task.node_data(context)
        y = np.asarray(data.y_train)
        flipped = (int(np.max(y)) - y).astype(y.dtype)  # n_classes - 1 - y
        reply = task.fit(msg, context, data.x_train, flipped, received)
        if attack == "label-flip-boost":
            start = float_arrays(array_record(msg.content, "arrays"))
            weights = float_arrays(array_record(reply.content, "arrays"))
            reply.content["arrays"] = ArrayRecord(
                [g + self.boost * (w - g) for w, g in zip(weights, start, strict=True)])
        return reply


poisoning_client_app = ClientApp(mods=client_mods(PoisoningMod()))
poisoning_client_app.train()(clientapp.train)
poisoning_client_app.evaluate()(clientapp.evaluate)


def poisoning_secagg_client_fn(context: Context) -> Any:
    """SecAgg+'s client whose training goes through PoisoningMod."""
    return secagg.SecAggClient(
        context, train=handler_with(PoisoningMod(), clientapp.train)).to_client()


poisoning_secagg_client_app = ClientApp(client_fn=poisoning_secagg_client_fn,
                                        mods=[secagg.signing_mod, secaggplus_mod])


def stage_poisoning_app(dest: Path, spec: FederationJobSpec) -> Path:
    """The Flower App dir whose ClientApp emulates the attacks its nodes are started with
    (`pqfed fl client --attack`), for `flower.submit_run`."""
    from pqfed.services import flower as fr

    if spec.secure_aggregation.enabled:
        return fr.stage_app_dir(dest, serverapp=secagg.SERVERAPP, clientapp=SECAGG_CLIENTAPP)
    return fr.stage_app_dir(dest, serverapp=SERVERAPP, clientapp=CLIENTAPP)
