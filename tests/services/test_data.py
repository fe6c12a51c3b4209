"""Tests for pqfed.services.data (federated datasets)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pqfed.services.data import (
    TASKS,
    DatasetError,
    FederatedDataset,
    default_partition,
    ecg_sim,
    hapt,
    load_task,
    parse_partition,
)


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Keep the HAPT .npz cache inside pytest's tmp dir (never touch the user's ~/.cache).
    mp = pytest.MonkeyPatch()
    mp.setenv("PQFED_CACHE", str(tmp_path_factory.mktemp("pqfed-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def hapt_natural() -> FederatedDataset:
    return load_task("hapt", 30, "natural", 0)


@pytest.fixture(scope="module")
def ecg() -> FederatedDataset:
    return load_task("ecg-sim", 5, "iid", 0)


def _check_common(ds: FederatedDataset, n_clients: int) -> None:
    assert ds.n_clients == n_clients
    assert len(ds.y_train) == len(ds.x_test) == len(ds.y_test) == n_clients
    parts = [*ds.x_train, *ds.x_test, ds.x_test_global]
    labels = [*ds.y_train, *ds.y_test, ds.y_test_global]
    for x, y in zip(parts, labels, strict=True):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape[1:] == ds.input_shape
        assert x.shape[0] == y.shape[0]
        assert y.min() >= 0 and y.max() < ds.n_classes
        assert np.isfinite(x).all()
        assert not x.flags.writeable
    for i in range(n_clients):
        assert len(ds.y_train[i]) > 0 and len(ds.y_test[i]) > 0
    assert set(np.unique(ds.y_test_global)) == set(range(ds.n_classes))
    assert len(ds.class_names) == ds.n_classes


def test_breast_cancer_shapes_and_counts() -> None:
    ds = load_task("breast-cancer", 4, "iid", 0)
    _check_common(ds, 4)
    assert ds.input_shape == (30,) and ds.n_classes == 2 and not ds.simulated
    total = sum(len(y) for y in ds.y_train) + sum(len(y) for y in ds.y_test)
    assert total + len(ds.y_test_global) == 569
    x, y = ds.union_train()
    # standardized with training statistics only
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-3)
    assert np.bincount(y).tolist() == pytest.approx([148, 250], abs=2)
    # iid: every client has both classes in about the global proportion
    for i in range(4):
        frac = ds.class_counts(i)[1] / len(ds.y_train[i])
        assert abs(frac - 0.627) < 0.05


def test_breast_cancer_union_independent_of_partition() -> None:
    a = load_task("breast-cancer", 5, "iid", 3).union_train()
    b = load_task("breast-cancer", 5, "dirichlet:0.3", 3).union_train()
    ka = sorted(map(bytes, a[0]))
    kb = sorted(map(bytes, b[0]))
    assert ka == kb


def test_dirichlet_is_non_iid_and_deterministic() -> None:
    a = load_task("breast-cancer", 5, "dirichlet:0.1", 7)
    b = load_task("breast-cancer", 5, "dirichlet:0.1", 7)
    c = load_task("breast-cancer", 5, "dirichlet:0.1", 8)
    for i in range(5):
        np.testing.assert_array_equal(a.x_train[i], b.x_train[i])
        np.testing.assert_array_equal(a.y_test[i], b.y_test[i])
    assert any(not np.array_equal(a.y_train[i], c.y_train[i]) for i in range(5))
    iid = load_task("breast-cancer", 5, "iid", 7)

    def skew(ds: FederatedDataset) -> float:
        fr = [ds.class_counts(i)[1] / len(ds.y_train[i]) for i in range(ds.n_clients)]
        return float(np.std(fr))

    assert skew(a) > 0.2 > 0.05 > skew(iid)
    assert a.partition == "dirichlet:0.1"


def test_dirichlet_on_hapt_gives_label_skew() -> None:
    ds = load_task("hapt", 6, "dirichlet:0.3", 1)
    _check_common(ds, 6)
    props = np.stack([ds.class_counts(i) / ds.class_counts(i).sum() for i in range(6)])
    assert props.max() > 0.4  # some client dominated by one activity (iid would be ~1/6)
    assert ds.client_groups == ()


def test_hapt_natural_split(hapt_natural: FederatedDataset) -> None:
    ds = hapt_natural
    _check_common(ds, 30)
    assert ds.input_shape == (6, 128) and ds.n_classes == 6 and not ds.simulated
    groups = [g for gs in ds.client_groups for g in gs]
    assert sorted(groups) == list(range(1, 31))  # 30 distinct subjects, one per client
    assert all(len(gs) == 1 for gs in ds.client_groups)
    x, _ = ds.union_train()
    # per-channel normalization from training data
    np.testing.assert_allclose(x.mean(axis=(0, 2)), 0, atol=1e-3)
    np.testing.assert_allclose(x.std(axis=(0, 2)), 1, atol=1e-3)
    n = sum(len(y) for y in ds.y_train) + sum(len(y) for y in ds.y_test)
    n += len(ds.y_test_global)
    assert 8000 < n <= 10017
    assert np.bincount(np.concatenate(ds.y_train), minlength=6).min() > 500


def test_hapt_grouped_onto_fewer_clients(hapt_natural: FederatedDataset) -> None:
    ds = load_task("hapt", 7, "natural", 0)
    sizes = [len(gs) for gs in ds.client_groups]
    assert sum(sizes) == 30 and max(sizes) - min(sizes) <= 1
    assert sorted(g for gs in ds.client_groups for g in gs) == list(range(1, 31))
    assert sum(map(len, ds.y_train)) == sum(map(len, hapt_natural.y_train))


def test_hapt_cache_written_and_reused() -> None:
    w = hapt.load_windows()
    path = hapt.cache_path()
    assert path.is_file() and path.suffix == ".npz"
    assert path.parent.name == "data"
    assert path.is_relative_to(Path(os.environ["PQFED_CACHE"]))
    assert w["x"].shape[1:] == (6, 128) and len(w["y"]) == len(w["subject"])
    assert len(np.unique(w["subject"])) == 30


def test_hapt_splits_do_not_overlap_in_time() -> None:
    w = hapt.load_windows()
    split = hapt.blocked_split(w["y"], w["subject"], w["experiment"], w["start"], 0)
    keep = split >= 0
    order = np.lexsort((w["start"][keep], w["experiment"][keep]))
    exp, start, sp = w["experiment"][keep][order], w["start"][keep][order], split[keep][order]
    overlap = (exp[1:] == exp[:-1]) & (start[1:] - start[:-1] < hapt.WINDOW)
    assert not (overlap & (sp[1:] != sp[:-1])).any()


def test_ecg_sim_shapes_labels(ecg: FederatedDataset) -> None:
    _check_common(ecg, 5)
    assert ecg.simulated is True
    assert ecg.input_shape == (1, ecg_sim.N_SAMPLES) == (1, 500)
    assert ecg.class_names == ("normal", "bradycardia", "tachycardia", "irregular")
    counts = np.bincount(np.concatenate([*ecg.y_train, *ecg.y_test, ecg.y_test_global]))
    assert counts.tolist() == [ecg_sim.N_PER_CLASS] * 4
    assert "SIMULATED" in (ecg_sim.__doc__ or "")


def test_ecg_sim_deterministic_and_rates() -> None:
    x1, y1 = ecg_sim.generate(5, n_per_class=10)
    x2, y2 = ecg_sim.generate(5, n_per_class=10)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, ecg_sim.generate(6, n_per_class=10)[0])
    rng = np.random.default_rng(0)
    for label, (lo, hi) in ecg_sim.HR_RANGES.items():
        for _ in range(50):
            rr = np.array(ecg_sim.rr_intervals(label, rng, 5.0))
            hr = 60 / np.median(rr)
            cv = rr.std() / rr.mean()
            if label == 3:
                assert cv > 0.08  # irregular
            else:
                assert lo * 0.9 < hr < hi * 1.1 and cv < 0.08


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"task": "mnist"}, "task"),
        ({"task": 3}, "task"),
        ({"n_clients": 0}, "n_clients"),
        ({"n_clients": 21}, "n_clients"),
        ({"n_clients": 2.5}, "n_clients"),
        ({"n_clients": True}, "n_clients"),
        ({"partition": "dirichlet"}, "partition"),
        ({"partition": "dirichlet:abc"}, "partition"),
        ({"partition": "dirichlet:0"}, "partition"),
        ({"partition": "dirichlet:-1"}, "partition"),
        ({"partition": "dirichlet:nan"}, "partition"),
        ({"partition": "natural"}, "partition"),  # breast-cancer has no natural groups
        ({"partition": "shards"}, "partition"),
        ({"seed": -1}, "seed"),
    ],
)
def test_validation_errors_name_field(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"task": "breast-cancer", "n_clients": 3, "partition": "iid",
                               "seed": 0}
    args.update(kwargs)
    with pytest.raises(DatasetError) as ei:
        load_task(**args)  # type: ignore[arg-type]
    assert ei.value.field == field
    assert str(ei.value).startswith(f"{field}:")
    assert isinstance(ei.value, ValueError)
    assert "use" in ei.value.fix or "raise" in ei.value.fix


def test_hapt_too_many_clients_and_extreme_dirichlet() -> None:
    with pytest.raises(DatasetError, match=r"^n_clients: .*<= 30"):
        load_task("hapt", 31, "natural", 0)
    with pytest.raises(DatasetError, match=r"^partition: .*raise the Dirichlet alpha"):
        load_task("breast-cancer", 20, "dirichlet:0.01", 0)


def test_parse_partition_and_registry() -> None:
    assert str(parse_partition(" Dirichlet:0.50 ", allow_natural=False)) == "dirichlet:0.5"
    assert parse_partition("IID", allow_natural=False).kind == "iid"
    assert set(TASKS) == {"breast-cancer", "hapt", "ecg-sim"}
    assert default_partition("hapt") == "natural"
    assert default_partition("ecg-sim") == "iid"
    ds = load_task("breast-cancer", 2, "iid", 0)
    with pytest.raises(DatasetError, match=r"^client:"):
        ds.client(2)
    c = ds.client(1)
    assert c.client_id == 1 and c.x_train is ds.x_train[1]
