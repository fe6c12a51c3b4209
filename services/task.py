"""The learning task of a client node (as in Flower's quickstart `task.py`): its data
partition, local training and evaluation, on the job's model. No signing, compression or
privacy here: those are the client mods around the handlers (services/mods.py).

torch is imported inside the functions: an edge's upstream ClientApp trains nothing and runs
without it.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import numpy.typing as npt
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from pqfed.services.records import (
    array_record,
    config_record,
    float_arrays,
    job_spec,
    number,
    round_of,
    spec_from_json,
)


@functools.lru_cache(maxsize=2)
def client_data(spec_json: str, partition_id: int) -> Any:
    """Partition `partition_id` of the job's dataset (a `data.ClientData`), loaded once per
    process (the warm ClientApp process loads it before it forks; services/warmup.py)."""
    from pqfed.services.data import load_task

    spec = spec_from_json(spec_json)
    data = load_task(spec.task, spec.clients, spec.dataset.partition, spec.dataset.seed)
    return data.client(partition_id)


def node_data(context: Context) -> Any:
    """This node's partition (node_config `partition-id`)."""
    return client_data(str(context.run_config["spec"]),
                       int(number(context.node_config["partition-id"])))


def fit(msg: Message, context: Context, x: npt.NDArray[Any], y: npt.NDArray[Any],
        received: float) -> Message:
    """Trains the job's model from the instruction's weights on (x, y) and replies with the
    trained weights and metrics (train-loss, num-examples, train-seconds, t-received,
    t-replied). The seed depends on the job, the partition and the round only."""
    import torch

    from pqfed.services.models import build_model, get_weights, set_weights, train_epochs

    torch.set_num_threads(int(os.environ.get("PQFED_TORCH_THREADS", "1")))
    spec = job_spec(context)
    pid = int(number(context.node_config["partition-id"]))
    model = build_model(spec.task, seed=spec.dataset.seed)
    set_weights(model, float_arrays(array_record(msg.content, "arrays")))
    t0 = time.perf_counter()
    loss = train_epochs(model, x, y, spec.training.local_epochs, spec.training.batch_size,
                        spec.training.learning_rate,
                        proximal_mu=number(config_record(msg.content, "config").get(
                            "proximal-mu", 0.0)),
                        seed=spec.dataset.seed + pid * 1000 + round_of(msg))
    metrics = MetricRecord({"train-loss": float(loss), "num-examples": len(y),
                            "train-seconds": time.perf_counter() - t0,
                            "t-received": received, "t-replied": time.time()})
    return Message(RecordDict({"arrays": ArrayRecord(get_weights(model)),
                               "metrics": metrics}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """The instruction's model on this node's test split: eval-loss, eval-acc, num-examples."""
    from pqfed.services.models import build_model, set_weights
    from pqfed.services.models import evaluate as eval_model

    spec = job_spec(context)
    data = node_data(context)
    model = build_model(spec.task, seed=spec.dataset.seed)
    set_weights(model, float_arrays(array_record(msg.content, "arrays")))
    loss, acc = eval_model(model, data.x_test, data.y_test)
    return Message(RecordDict({"metrics": MetricRecord(
        {"eval-loss": loss, "eval-acc": acc, "num-examples": len(data.y_test)})}),
        reply_to=msg)

