"""Wisconsin diagnostic breast cancer (569 patients, 30 features, benign vs malignant).

Shipped with scikit-learn, so it loads offline in milliseconds: this is the fast CI task.
Rows are split (stratified, seeded) into 70 % client training, 15 % client local test and
15 % server global test; the client rows are then spread over hospital silos by the
requested partition. Features are standardized with statistics of the training rows only.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from sklearn.datasets import load_breast_cancer

from .base import (
    FederatedDataset,
    Partition,
    assemble,
    rng_for,
    stratified_split_labels,
)

NAME: Final = "breast-cancer"
MAX_CLIENTS: Final = 20
FRACTIONS: Final = (0.70, 0.15, 0.15)
MIN_TRAIN_PER_CLIENT: Final = 4


def load(n_clients: int, partition: Partition, seed: int) -> FederatedDataset:
    bunch = load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    split = stratified_split_labels(y, FRACTIONS, rng_for(seed, 1))
    return assemble(
        name=NAME,
        x=x,
        y=y,
        split=split,
        groups=None,
        n_classes=2,
        n_clients=n_clients,
        partition=partition,
        seed=seed,
        simulated=False,
        class_names=tuple(str(c) for c in bunch.target_names),
        min_train=MIN_TRAIN_PER_CLIENT,
        norm_axes=(0,),
        description="UCI/sklearn Wisconsin diagnostic breast cancer, hospital silos",
    )
