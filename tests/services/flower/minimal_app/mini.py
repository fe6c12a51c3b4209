"""Numpy-only stand-in Flower App used by the deployment-runtime tests.

FedAvg over a single 10-float array. Each ClientApp adds ``scale * (partition_id + 1)`` to
every element and reports ``num-examples = partition_id + 1``, so one weighted FedAvg round
moves the global model by ``scale * sum((i+1)**2) / sum(i+1)``. The ServerApp writes the final
array plus per-round wall-clock timestamps to ``result-path`` (run config) as JSON.

Component strings: ``mini:server_app`` / ``mini:client_app`` (this folder must be importable,
e.g. on PYTHONPATH of the SuperExec processes and of ``flwr run``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

NUM_PARAMS = 10

# NB: plain assignments (not annotated) -- `flwr run` validates component strings by
# statically scanning the module AST for `name = ...`.
client_app = ClientApp()
server_app = ServerApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    params = arrays.to_numpy_ndarrays()
    pid = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    scale = float(context.run_config["client-scale"])
    new_params = [p + np.float32(scale * (pid + 1)) for p in params]
    metrics = MetricRecord(
        {
            "num-examples": pid + 1,
            "partition-id": pid,
            "num-partitions": num_partitions,
            "pid": os.getpid(),
        }
    )
    content = RecordDict({"arrays": ArrayRecord(new_params), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    params = arrays.to_numpy_ndarrays()
    pid = int(context.node_config["partition-id"])
    metrics = MetricRecord({"num-examples": pid + 1, "mean": float(np.mean(params[0]))})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    num_rounds = int(cfg["num-server-rounds"])
    min_nodes = int(cfg["min-nodes"])
    fraction_evaluate = float(cfg["fraction-evaluate"])
    result_path = Path(str(cfg["result-path"]))

    seen: list[list[float]] = []

    def train_aggr(records: list[RecordDict], weighting_key: str) -> MetricRecord:
        pids: list[float] = []
        for rec in records:
            mrec = rec["metrics"]
            assert isinstance(mrec, MetricRecord)
            pids.append(float(mrec["partition-id"]))  # type: ignore[arg-type]
        seen.append(sorted(pids))
        return MetricRecord({"clients": len(records)})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
        train_metrics_aggr_fn=train_aggr,
    )

    stamps: list[float] = []

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        stamps.append(time.time())  # called before round 1 and after every round
        return MetricRecord({"round": server_round})

    initial = ArrayRecord([np.zeros(NUM_PARAMS, dtype=np.float32)])
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=num_rounds,
        timeout=float(cfg["round-timeout"]),
        evaluate_fn=central_eval,
    )
    final = result.arrays.to_numpy_ndarrays()[0]
    payload = {
        "final": [float(x) for x in final],
        "round_stamps": stamps,
        "train_partition_ids": seen,
        "run_config": dict(cfg),
        "run_id": context.run_id,
    }
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    tmp.replace(result_path)
