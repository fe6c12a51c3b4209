"""Tests for pqfed.services.models and pqfed.services.centralized."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from pqfed.services import centralized
from pqfed.services.centralized import train_centralized
from pqfed.services.data import load_task
from pqfed.services.models import (
    EcgCNN1D,
    HarCNN1D,
    TabularMLP,
    build_model,
    count_parameters,
    evaluate,
    get_weights,
    set_weights,
    train_epochs,
)

SHAPES = {"breast-cancer": ((30,), 2), "hapt": ((6, 128), 6), "ecg-sim": ((1, 500), 4)}


@pytest.fixture(autouse=True)
def _one_thread(tmp_path_factory: pytest.TempPathFactory,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("PQFED_CACHE", str(tmp_path_factory.getbasetemp() / "pqfed-cache"))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _toy(task: str, n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic data: the class shifts the mean of the input."""
    shape, k = SHAPES[task]
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n).astype(np.int64)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x += (y.reshape(-1, *([1] * len(shape))) - k / 2).astype(np.float32)
    return x, y


@pytest.mark.parametrize("task", sorted(SHAPES))
def test_build_model_shapes(task: str) -> None:
    shape, k = SHAPES[task]
    model = build_model(task)
    out = model(torch.zeros(3, *shape))
    assert out.shape == (3, k)


def test_model_classes_and_sizes() -> None:
    assert isinstance(build_model("breast-cancer"), TabularMLP)
    assert isinstance(build_model("hapt"), HarCNN1D)
    assert isinstance(build_model("ecg-sim"), EcgCNN1D)
    assert 50_000 <= count_parameters(build_model("hapt")) <= 100_000
    with pytest.raises(ValueError, match=r"^task:"):
        build_model("mnist")


def test_build_model_deterministic_and_isolated() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = get_weights(build_model("hapt", seed=1))  # must not disturb the global RNG
    assert torch.equal(torch.rand(1), before)
    b = get_weights(build_model("hapt", seed=1))
    c = get_weights(build_model("hapt", seed=2))
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c, strict=True))


@pytest.mark.parametrize("task", sorted(SHAPES))
def test_loss_decreases(task: str) -> None:
    x, y = _toy(task)
    model = build_model(task)
    loss0, _ = evaluate(model, x, y)
    last = train_epochs(model, x, y, epochs=5, batch_size=16, lr=3e-3)
    loss1, acc1 = evaluate(model, x, y)
    assert loss1 < loss0 and last < loss0
    assert acc1 > 1.0 / SHAPES[task][1]


def test_train_is_deterministic() -> None:
    x, y = _toy("breast-cancer")
    runs = []
    for _ in range(2):
        m = build_model("breast-cancer", seed=4)
        train_epochs(m, x, y, 3, 8, 1e-2, seed=9)
        runs.append(get_weights(m))
    assert all(np.array_equal(u, v) for u, v in zip(*runs, strict=True))


def test_weights_round_trip() -> None:
    src, dst = build_model("ecg-sim", seed=1), build_model("ecg-sim", seed=2)
    w = get_weights(src)
    assert all(a.dtype == np.float32 for a in w)
    set_weights(dst, w)
    assert all(np.array_equal(u, v) for u, v in zip(w, get_weights(dst), strict=True))
    x = torch.randn(4, 1, 500)
    assert torch.equal(src(x), dst(x))
    w[0][...] = 0  # get_weights returns copies
    assert not np.array_equal(get_weights(src)[0], w[0])
    with pytest.raises(ValueError, match=r"^weights:"):
        set_weights(dst, w[:-1])
    with pytest.raises(ValueError, match=r"^weights: .*shape"):
        set_weights(dst, [np.zeros((1,), np.float32)] * len(w))


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(sum(((u - v) ** 2).sum() for u, v in zip(a, b, strict=True)))


def test_fedprox_keeps_weights_near_global() -> None:
    x, y = _toy("breast-cancer", n=128)
    start = build_model("breast-cancer", seed=0)
    global_w = get_weights(start)
    dists = {}
    for mu in (0.0, 10.0):
        m = build_model("breast-cancer", seed=0)
        train_epochs(m, x, y, 5, 16, 1e-2, proximal_mu=mu, global_params=global_w)
        dists[mu] = _distance(get_weights(m), global_w)
    assert dists[10.0] < 0.5 * dists[0.0]
    # global_params=None anchors to the weights on entry: same result here
    m = build_model("breast-cancer", seed=0)
    train_epochs(m, x, y, 5, 16, 1e-2, proximal_mu=10.0)
    assert _distance(get_weights(m), global_w) == pytest.approx(dists[10.0])


def test_train_validation() -> None:
    m = build_model("breast-cancer")
    x, y = _toy("breast-cancer", n=8)
    with pytest.raises(ValueError):
        train_epochs(m, x, y, 0, 8, 1e-3)
    with pytest.raises(ValueError, match=r"^x/y:"):
        train_epochs(m, x, y[:4], 1, 8, 1e-3)
    with pytest.raises(ValueError, match=r"^global_params:"):
        train_epochs(m, x, y, 1, 8, 1e-3, proximal_mu=0.1, global_params=[np.zeros(1)])


def test_trains_on_federated_client_data() -> None:
    ds = load_task("breast-cancer", 3, "iid", 0)
    m = build_model("breast-cancer")
    train_epochs(m, ds.x_train[0], ds.y_train[0], 20, 16, 1e-3)
    _, acc = evaluate(m, ds.x_test_global, ds.y_test_global)
    assert acc > 0.85


def test_centralized_breast_cancer() -> None:
    r = train_centralized("breast-cancer", epochs=30, seed=0)
    assert r["final_test_accuracy"] > 0.93
    assert len(r["history"]) == r["epochs"] == 30
    assert r["n_train"] + r["n_test"] < 569 and r["simulated"] is False
    json.dumps(r)  # JSON-serializable


def test_centralized_main_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert centralized.main(["--task", "breast-cancer", "--epochs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "breast-cancer" and len(out["history"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize(("task", "epochs", "floor"), [("hapt", 15, 0.90), ("ecg-sim", 20, 0.90)])
def test_centralized_slow_tasks(task: str, epochs: int, floor: float) -> None:
    r = train_centralized(task, epochs=epochs, seed=0)
    assert r["best_test_accuracy"] > floor
