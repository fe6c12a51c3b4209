"""Core types and partitioning helpers shared by every federated task.

Every task loader produces one pool of samples with a *split label* per row
(``SPLIT_TRAIN``, ``SPLIT_LOCAL_TEST`` or ``SPLIT_GLOBAL_TEST``). The global test rows are
held out for the server; the other rows are distributed over the clients by a partitioner
(``natural`` per-group, ``iid`` or ``dirichlet:<alpha>`` label skew). A client's training
set is its rows labelled ``SPLIT_TRAIN``, its local test set its rows labelled
``SPLIT_LOCAL_TEST``. Because the partitioner distributes *all* pool rows, the union of the
clients' training sets is the same for every partition and seed-independent given the
task seed, which is what the centralized baseline trains on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]
IntArray = npt.NDArray[np.int64]

_T = TypeVar("_T", bound=np.generic)

SPLIT_TRAIN: Final = 0
SPLIT_LOCAL_TEST: Final = 1
SPLIT_GLOBAL_TEST: Final = 2

PARTITION_HELP: Final = "use 'iid', 'dirichlet:<alpha>' with alpha > 0 (e.g. 'dirichlet:0.5')"


class DatasetError(ValueError):
    """Invalid dataset request. The message names the offending field and how to fix it."""

    def __init__(self, field_name: str, problem: str, fix: str) -> None:
        self.field = field_name
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field_name}: {problem}; {fix}")


@dataclass(frozen=True)
class ClientData:
    """One client's (hospital silo / patient device) local data."""

    client_id: int
    x_train: FloatArray
    y_train: LabelArray
    x_test: FloatArray
    y_test: LabelArray
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class FederatedDataset:
    """A task split over ``n_clients`` clients plus a server-side global test set.

    ``x_train[i]`` / ``y_train[i]`` / ``x_test[i]`` / ``y_test[i]`` belong to client ``i``.
    Features are ``float32`` of shape ``(n, *input_shape)``; labels are ``int64`` in
    ``[0, n_classes)``. ``simulated`` is True when the data are synthetic (not from
    patients or volunteers) and must never be presented as clinical evidence.
    ``client_groups[i]`` lists the natural groups (e.g. HAPT subject ids) that client ``i``
    holds; it is empty for partitions that ignore groups.
    """

    name: str
    x_train: tuple[FloatArray, ...]
    y_train: tuple[LabelArray, ...]
    x_test: tuple[FloatArray, ...]
    y_test: tuple[LabelArray, ...]
    x_test_global: FloatArray
    y_test_global: LabelArray
    n_classes: int
    input_shape: tuple[int, ...]
    simulated: bool
    partition: str
    seed: int
    class_names: tuple[str, ...]
    client_groups: tuple[tuple[int, ...], ...] = field(default=())
    description: str = ""

    @property
    def n_clients(self) -> int:
        return len(self.x_train)

    def client(self, i: int) -> ClientData:
        if not 0 <= i < self.n_clients:
            raise DatasetError(
                "client", f"index {i} out of range", f"use 0 <= client < {self.n_clients}"
            )
        groups = self.client_groups[i] if self.client_groups else ()
        return ClientData(
            i, self.x_train[i], self.y_train[i], self.x_test[i], self.y_test[i], groups
        )

    def union_train(self) -> tuple[FloatArray, LabelArray]:
        """All clients' training data concatenated (the centralized baseline's data)."""
        return np.concatenate(self.x_train), np.concatenate(self.y_train)

    def class_counts(self, i: int) -> IntArray:
        """Per-class training-sample counts of client ``i``."""
        return np.bincount(self.y_train[i], minlength=self.n_classes).astype(np.int64)

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "partition": self.partition,
            "seed": self.seed,
            "simulated": self.simulated,
            "n_clients": self.n_clients,
            "n_classes": self.n_classes,
            "input_shape": list(self.input_shape),
            "train_sizes": [len(y) for y in self.y_train],
            "test_sizes": [len(y) for y in self.y_test],
            "global_test_size": len(self.y_test_global),
        }


@dataclass(frozen=True)
class Partition:
    """A parsed partition spec."""

    kind: str  # "natural" | "iid" | "dirichlet"
    alpha: float = math.inf

    def __str__(self) -> str:
        return f"dirichlet:{self.alpha:g}" if self.kind == "dirichlet" else self.kind


def parse_partition(spec: str, allow_natural: bool) -> Partition:
    """Parse ``'iid'``, ``'natural'`` or ``'dirichlet:<alpha>'`` (case-insensitive)."""
    helptext = PARTITION_HELP + (" or 'natural'" if allow_natural else "")
    if not isinstance(spec, str):
        raise DatasetError("partition", f"expected a string, got {type(spec).__name__}", helptext)
    s = spec.strip().lower()
    if s == "iid":
        return Partition("iid")
    if s == "natural":
        if not allow_natural:
            raise DatasetError(
                "partition", "'natural' needs a task with natural groups (hapt)", helptext
            )
        return Partition("natural")
    if s.startswith("dirichlet:"):
        raw = s.split(":", 1)[1]
        try:
            alpha = float(raw)
        except ValueError:
            raise DatasetError("partition", f"alpha {raw!r} is not a number", helptext) from None
        if not math.isfinite(alpha) or alpha <= 0:
            raise DatasetError("partition", f"alpha must be finite and > 0, got {raw}", helptext)
        return Partition("dirichlet", alpha)
    raise DatasetError("partition", f"unknown partition {spec!r}", helptext)


def rng_for(seed: int, purpose: int) -> np.random.Generator:
    """Independent deterministic stream per (seed, purpose)."""
    return np.random.default_rng([purpose, seed])


def stratified_split_labels(
    y: LabelArray, fractions: tuple[float, float, float], rng: np.random.Generator
) -> IntArray:
    """Assign each row a split label, stratified by class (train / local test / global test)."""
    split = np.full(len(y), SPLIT_TRAIN, dtype=np.int64)
    for k in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == k))
        n_local = round(fractions[SPLIT_LOCAL_TEST] * len(idx))
        n_global = round(fractions[SPLIT_GLOBAL_TEST] * len(idx))
        split[idx[:n_global]] = SPLIT_GLOBAL_TEST
        split[idx[n_global : n_global + n_local]] = SPLIT_LOCAL_TEST
    return split


def _assign_by_proportions(
    y: LabelArray, rows: IntArray, props: npt.NDArray[np.float64], rng: np.random.Generator
) -> IntArray:
    """Client index for each of ``rows``: class ``k`` rows split by ``props[k]`` (sums to 1)."""
    owner = np.empty(len(rows), dtype=np.int64)
    labels = y[rows]
    for k in range(props.shape[0]):
        pos = rng.permutation(np.flatnonzero(labels == k))
        cuts = (np.cumsum(props[k])[:-1] * len(pos)).round().astype(np.int64)
        for client, chunk in enumerate(np.split(pos, cuts)):
            owner[chunk] = client
    return owner


def partition_pool(
    y: LabelArray,
    split: IntArray,
    groups: IntArray | None,
    n_classes: int,
    n_clients: int,
    partition: Partition,
    seed: int,
    min_train: int,
    min_test: int = 1,
) -> tuple[list[IntArray], list[IntArray], list[tuple[int, ...]]]:
    """Distribute pool rows (split != global test) over clients.

    Returns per-client train row indices, local-test row indices and natural groups.
    ``dirichlet`` draws, for every class, client proportions from Dir(alpha) (Hsu et al.
    2019) and redraws (deterministically) until every client has ``min_train`` training and
    ``min_test`` test rows.
    """
    rng = rng_for(seed, 101)
    train_rows = np.flatnonzero(split == SPLIT_TRAIN)
    test_rows = np.flatnonzero(split == SPLIT_LOCAL_TEST)
    if partition.kind == "natural":
        if groups is None:
            raise DatasetError("partition", "this task has no natural groups", PARTITION_HELP)
        uniq = np.unique(groups)
        if n_clients > len(uniq):
            raise DatasetError(
                "n_clients",
                f"{n_clients} clients but only {len(uniq)} natural groups",
                f"use n_clients <= {len(uniq)} with partition 'natural'",
            )
        order = rng.permutation(uniq)
        client_sets = [tuple(sorted(int(g) for g in c)) for c in np.array_split(order, n_clients)]
        tr = [train_rows[np.isin(groups[train_rows], gs)] for gs in client_sets]
        te = [test_rows[np.isin(groups[test_rows], gs)] for gs in client_sets]
        return tr, te, client_sets
    for _attempt in range(200):
        if partition.kind == "iid":
            props = np.full((n_classes, n_clients), 1.0 / n_clients)
        else:
            props = rng.dirichlet(np.full(n_clients, partition.alpha), size=n_classes)
        tr_owner = _assign_by_proportions(y, train_rows, props, rng)
        te_owner = _assign_by_proportions(y, test_rows, props, rng)
        tr_n = np.bincount(tr_owner, minlength=n_clients)
        te_n = np.bincount(te_owner, minlength=n_clients)
        if tr_n.min() >= min_train and te_n.min() >= min_test:
            tr = [np.sort(train_rows[tr_owner == c]) for c in range(n_clients)]
            te = [np.sort(test_rows[te_owner == c]) for c in range(n_clients)]
            return tr, te, [() for _ in range(n_clients)]
        if partition.kind == "iid":
            break
    raise DatasetError(
        "partition" if partition.kind == "dirichlet" else "n_clients",
        f"{partition} over {n_clients} clients leaves a client with fewer than {min_train} "
        f"training or {min_test} test samples",
        "raise the Dirichlet alpha or lower n_clients",
    )


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise DatasetError(name, f"expected an int, got {type(value).__name__}",
                           f"use an integer in [{lo}, {hi}]")
    v = int(value)
    if not lo <= v <= hi:
        raise DatasetError(name, f"{v} is out of range", f"use {lo} <= {name} <= {hi}")
    return v


def assemble(
    *,
    name: str,
    x: FloatArray,
    y: LabelArray,
    split: IntArray,
    groups: IntArray | None,
    n_classes: int,
    n_clients: int,
    partition: Partition,
    seed: int,
    simulated: bool,
    class_names: tuple[str, ...],
    min_train: int,
    norm_axes: tuple[int, ...],
    description: str = "",
) -> FederatedDataset:
    """Partition a pool, normalize with training-only statistics and build the dataset.

    ``norm_axes`` are the axes reduced when computing mean/std over the training rows:
    ``(0,)`` gives per-feature statistics for tabular data, ``(0, 2)`` per-channel ones for
    ``(n, channels, time)`` windows.
    """
    tr, te, client_groups = partition_pool(
        y, split, groups, n_classes, n_clients, partition, seed, min_train
    )
    train_all = x[split == SPLIT_TRAIN].astype(np.float64)
    mean = train_all.mean(axis=norm_axes, keepdims=True)
    std = train_all.std(axis=norm_axes, keepdims=True)
    std[std < 1e-8] = 1.0
    xn = ((x - mean[0]) / std[0]).astype(np.float32)
    glob = np.flatnonzero(split == SPLIT_GLOBAL_TEST)
    return FederatedDataset(
        name=name,
        x_train=tuple(_readonly(xn[r]) for r in tr),
        y_train=tuple(_readonly(y[r]) for r in tr),
        x_test=tuple(_readonly(xn[r]) for r in te),
        y_test=tuple(_readonly(y[r]) for r in te),
        x_test_global=_readonly(xn[glob]),
        y_test_global=_readonly(y[glob]),
        n_classes=n_classes,
        input_shape=tuple(int(d) for d in x.shape[1:]),
        simulated=simulated,
        partition=str(partition),
        seed=seed,
        class_names=class_names,
        client_groups=tuple(client_groups) if partition.kind == "natural" else (),
        description=description,
    )


def _readonly(a: npt.NDArray[_T]) -> npt.NDArray[_T]:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a
