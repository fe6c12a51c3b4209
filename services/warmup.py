"""Imported by the warm ClientApp process before it forks one child per Flower message.

A fresh process pays ~1.4 s for PyTorch's first training step (lazy kernel and allocator
set-up); a child forked after this warm-up trains in ~25 ms (docs/BENCHMARKS.md). Threads are
pinned to 1 *before* any torch op, so no intra-op/OpenMP pool exists at fork time (forking a
process with live pool threads can deadlock the child). If PQFED_WARM_SPEC/PQFED_WARM_PARTITION
name this node's job, its data partition is loaded too, so children inherit it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pqfed.services.models import HPARAMS, build_model, train_epochs


def warm_up() -> None:
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    for task in HPARAMS:
        model = build_model(task)
        shape = (4, *_input_shape(task))
        x = np.zeros(shape, dtype=np.float32)
        y = np.zeros(4, dtype=np.int64)
        train_epochs(model, x, y, 1, 4, 1e-3)
    spec_path, partition = os.environ.get("PQFED_WARM_SPEC"), os.environ.get(
        "PQFED_WARM_PARTITION")
    if spec_path and partition is not None:
        from pathlib import Path

        from pqfed.services.spec import load_spec
        from pqfed.services.task import client_data

        _, spec = load_spec(Path(spec_path))
        client_data(spec.model_dump_json(by_alias=True), int(partition))


def _input_shape(task: str) -> tuple[int, ...]:
    return {"breast-cancer": (30,), "hapt": (6, 128), "ecg-sim": (1, 500)}[task]


warm_up()
