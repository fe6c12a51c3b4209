"""Small CPU PyTorch models for the federated tasks and the local-training helpers.

The helpers are what a Flower client (or the centralized baseline) calls: ``train_epochs``
(with an optional FedProx proximal term), ``evaluate``, ``get_weights`` / ``set_weights``
(weights as a list of numpy arrays in ``state_dict`` order). Everything runs on CPU, works
with ``torch.set_num_threads(1)`` and is deterministic for a given seed. No model uses
batch normalization, so the weights are exactly the trainable parameters (nothing
FedAvg would have to treat specially).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = [
    "HPARAMS",
    "EcgCNN1D",
    "HarCNN1D",
    "TabularMLP",
    "TrainConfig",
    "build_model",
    "count_parameters",
    "evaluate",
    "get_weights",
    "set_weights",
    "train_epochs",
]

Weights = list[npt.NDArray[np.float32]]


class TabularMLP(nn.Module):
    """MLP for tabular features (breast-cancer: 30 -> 2)."""

    def __init__(self, n_features: int = 30, n_classes: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden // 2),
            nn.ReLU(),
            nn.Linear(hidden // 2, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def _conv(c_in: int, c_out: int, k: int) -> list[nn.Module]:
    return [nn.Conv1d(c_in, c_out, k, padding=k // 2), nn.ReLU()]


class HarCNN1D(nn.Module):
    """1D-CNN for HAPT windows (6 channels x 128 samples -> 6 activities), ~78k params."""

    def __init__(self, in_channels: int = 6, n_classes: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv(in_channels, 32, 7),
            nn.MaxPool1d(2),
            *_conv(32, 64, 5),
            nn.MaxPool1d(2),
            *_conv(64, 96, 5),
            nn.MaxPool1d(2),
            *_conv(96, 96, 3),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


class EcgCNN1D(nn.Module):
    """1D-CNN for 1 x 500 ECG windows -> 4 rhythm classes.

    Five conv/pool stages (receptive field ~1.7 s) followed by a dense layer over the
    remaining 15 time steps, so the head can compare beat positions (RR regularity).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 4, length: int = 500) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv(in_channels, 16, 7),
            nn.MaxPool1d(2),
            *_conv(16, 32, 7),
            nn.MaxPool1d(2),
            *_conv(32, 32, 7),
            nn.MaxPool1d(2),
            *_conv(32, 48, 5),
            nn.MaxPool1d(2),
            *_conv(48, 48, 5),
            nn.MaxPool1d(2),
            nn.Flatten(),
        )
        steps = length
        for _ in range(5):
            steps //= 2
        self.head = nn.Sequential(
            nn.Linear(48 * steps, 64), nn.ReLU(), nn.Linear(64, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


@dataclass(frozen=True)
class TrainConfig:
    """Default local-training hyperparameters per task (Adam)."""

    epochs: int
    batch_size: int
    lr: float


HPARAMS: Final[dict[str, TrainConfig]] = {
    "breast-cancer": TrainConfig(epochs=30, batch_size=32, lr=1e-3),
    "hapt": TrainConfig(epochs=15, batch_size=64, lr=1e-3),
    "ecg-sim": TrainConfig(epochs=20, batch_size=64, lr=1e-3),
}


def build_model(task: str, seed: int = 0) -> nn.Module:
    """Fresh model for ``task`` with initial weights determined by ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if task == "breast-cancer":
            return TabularMLP()
        if task == "hapt":
            return HarCNN1D()
        if task == "ecg-sim":
            return EcgCNN1D()
    raise ValueError(
        f"task: unknown task {task!r}; use one of breast-cancer, ecg-sim, hapt"
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tensors(x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    xt = torch.tensor(np.asarray(x, dtype=np.float32))
    yt = torch.tensor(np.asarray(y, dtype=np.int64))
    if xt.shape[0] != yt.shape[0]:
        raise ValueError(f"x/y: {xt.shape[0]} samples vs {yt.shape[0]} labels; pass aligned arrays")
    return xt, yt


def train_epochs(
    model: nn.Module,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    epochs: int,
    batch_size: int,
    lr: float,
    proximal_mu: float = 0.0,
    global_params: Sequence[npt.ArrayLike] | None = None,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
) -> float:
    """Train in place with Adam and cross-entropy; return the last epoch's mean data loss.

    With ``proximal_mu > 0`` the FedProx term ``mu/2 * ||w - w_global||^2`` is added to every
    mini-batch loss; ``w_global`` is ``global_params`` (``get_weights`` order) or, when None,
    the model's weights on entry (i.e. the global model the client just received). The
    returned loss excludes the proximal term. Shuffling is seeded by ``seed``. A fresh Adam
    optimizer is made per call (FL clients start every round afresh) unless ``optimizer``
    (built over ``model.parameters()``) is passed to keep its state across calls.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0 or proximal_mu < 0:
        raise ValueError(
            "epochs/batch_size/lr/proximal_mu: need epochs >= 1, batch_size >= 1, lr > 0, mu >= 0"
        )
    xt, yt = _tensors(x, y)
    if len(yt) == 0:
        raise ValueError("x: no training samples; give the client at least one sample")
    params = dict(model.named_parameters())
    anchors: list[tuple[torch.Tensor, torch.Tensor]] = []
    if proximal_mu > 0:
        if global_params is None:
            ref = {k: p.detach().clone() for k, p in params.items()}
        else:
            keys = list(model.state_dict().keys())
            if len(global_params) != len(keys):
                raise ValueError(
                    f"global_params: {len(global_params)} arrays, model has {len(keys)}; "
                    "pass get_weights() of the global model"
                )
            ref = {k: torch.tensor(np.asarray(a, dtype=np.float32))
                   for k, a in zip(keys, global_params, strict=True) if k in params}
        anchors = [(params[k], ref[k]) for k in params]
    opt = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    last = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=gen)
        total, seen = 0.0, 0
        for start in range(0, len(yt), batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad()
            data_loss = loss_fn(model(xt[idx]), yt[idx])
            loss = data_loss
            if anchors:
                prox = sum(((p - g) ** 2).sum() for p, g in anchors)
                loss = data_loss + 0.5 * proximal_mu * prox
            loss.backward()
            opt.step()
            total += float(data_loss.item()) * len(idx)
            seen += len(idx)
        last = total / seen
    return last


@torch.no_grad()
def evaluate(
    model: nn.Module, x: npt.ArrayLike, y: npt.ArrayLike, batch_size: int = 2048
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(x, y)``."""
    xt, yt = _tensors(x, y)
    if len(yt) == 0:
        raise ValueError("x: no evaluation samples")
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(yt), batch_size):
        logits = model(xt[start : start + batch_size])
        target = yt[start : start + batch_size]
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return loss_sum / len(yt), correct / len(yt)


def get_weights(model: nn.Module) -> Weights:
    """Model weights as float32 numpy copies, in ``state_dict`` order."""
    return [v.detach().cpu().numpy().astype(np.float32, copy=True)
            for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: Sequence[npt.ArrayLike]) -> None:
    """Load weights produced by :func:`get_weights` (same architecture) into ``model``."""
    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(
            f"weights: got {len(weights)} arrays, model expects {len(state)}; "
            "pass get_weights() output of the same task's model"
        )
    new: dict[str, torch.Tensor] = {}
    for (name, cur), w in zip(state.items(), weights, strict=True):
        arr = np.asarray(w)
        if tuple(arr.shape) != tuple(cur.shape):
            raise ValueError(
                f"weights: {name} has shape {tuple(arr.shape)}, expected {tuple(cur.shape)}"
            )
        new[name] = torch.tensor(arr, dtype=cur.dtype)
    model.load_state_dict(new, strict=True)
