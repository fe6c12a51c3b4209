"""pqfed's Flower ClientApp (Flower 1.42 Message API, deployment mode).

The handlers only learn: `train` trains the job's model on this node's partition
(services/task.py), or, on an edge's upstream SuperNode, runs one edge round over the edge's
own clients (services/edge.py); `evaluate` scores a model on the node's test split.

Everything pqfed adds on the client runs as Flower mods around them, one job each
(services/mods.py, where the order and its reasons are documented):

    sign_update_mod -> decode_broadcast_mod -> verify_model_mod -> encode_update_mod
        -> local_dp_mod -> handler

i.e. a compressed broadcast is decoded, the central aggregator's model signature checked,
local differential privacy applied (Flower's LocalDpMod, when the job asks for it), the update
compressed with error feedback and, last on the way out, ML-DSA-signed with its aggregation
weight. Attack emulation for benchmarks is not part of this app: services/poisoning.py builds
its own ClientApp with a poisoning mod innermost.

The server side is services/serverapp.py. Flat modules rather than a services/apps/ package,
as Flower's quickstart splits client_app.py, server_app.py and task.py: they sit next to
edge.py and secagg.py, which build on them, and the Flower App's components stay plain
module attributes (`pqfed.services.clientapp:client_app`, which `flwr run` validates by
scanning the module for that assignment).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pqfed.services import task
from pqfed.services.edge import edge_train, request_edge_round
from pqfed.services.mods import client_mods
from pqfed.services.records import EDGE_SOCKET_KEY

client_app = ClientApp(mods=client_mods())


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    received = time.time()
    if EDGE_SOCKET_KEY in context.node_config:  # an edge trains nothing itself (no torch)
        path = Path(str(context.node_config[EDGE_SOCKET_KEY]))
        return edge_train(msg, context, functools.partial(request_edge_round, path), received)
    data = task.node_data(context)
    return task.fit(msg, context, data.x_train, data.y_train, received)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return task.evaluate(msg, context)
