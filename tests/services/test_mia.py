"""Membership-inference study (services/mia.py, services/mia_attack.py): thresholds come from
the shadow split only, the attack finds a memorising model and not a model that never saw
the members, and the study's federations are the product's training path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pqfed.services import mia
from pqfed.services.data import load_task
from pqfed.services.mia_attack import (
    AttackInputError,
    balanced_accuracy,
    fit_threshold,
    logit_confidence,
    loss_scores,
    roc_auc,
    threshold_attack,
    tpr_at_fpr,
)
from pqfed.services.models import build_model, get_weights, train_epochs
from pqfed.services.simulation import simulate
from pqfed.services.spec import parse_spec


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1


# ---------------------------------------------------------------- the split --------------

@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_parts_are_disjoint_balanced_and_seeded(seed: int) -> None:
    split = mia.split_pool(500, 60, seed)
    parts = split.parts()
    assert [len(p) for p in parts.values()] == [60] * 4
    union = np.concatenate(list(parts.values()))
    assert len(np.unique(union)) == 240, "a sample sits in two parts"
    assert union.min() >= 0 and union.max() < 500
    again = mia.split_pool(500, 60, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts.values(), again.parts().values(),
                                                    strict=True))


def test_split_refuses_a_pool_too_small() -> None:
    with pytest.raises(mia.MiaConfigError) as err:
        mia.split_pool(100, 30, 0)
    assert err.value.field == "per_split"


# ---------------------------------------------------------------- the threshold ----------

def test_threshold_comes_from_the_shadow_split_only() -> None:
    # On the shadow split members score 10..12 and non-members 7..9: the fitted cut lies in
    # (9, 10]. The target split is separable too, but at a cut near 2: at the shadow's cut
    # every target sample reads "non-member" (balanced accuracy exactly 0.5). An attack
    # that fitted on (or peeked at) the evaluated samples would score 1.0 here.
    shadow_in, shadow_out = [10.0, 11.0, 12.0], [7.0, 8.0, 9.0]
    target_in, target_out = [2.0, 3.0, 2.5], [0.0, 1.0, 0.5]
    res = threshold_attack(shadow_in, shadow_out, target_in, target_out)
    assert 9.0 < res.threshold <= 10.0
    assert res.shadow_accuracy == 1.0
    assert res.accuracy == 0.5
    assert fit_threshold(target_in, target_out) <= 2.0  # what peeking would have chosen
    assert res.auc == 1.0  # the threshold-free metric still sees the target separation


def _outputs(margins: dict[str, float], n: int = 20) -> mia.SplitOutputs:
    """A model whose logit margin (true class minus the other) on each part is fixed."""
    return mia.SplitOutputs(
        {k: np.tile([[m, 0.0]], (n, 1)) for k, m in margins.items()},
        {k: np.zeros(n, dtype=np.int64) for k in margins})


def test_both_attacks_fit_on_the_shadow_model_and_split_only() -> None:
    # Injected models: the target separates its members perfectly (margin 5 vs -5), while
    # on the shadow split the shadow model ranks members *below* non-members. Fitted where
    # they must be (shadow model, shadow split), both attacks learn nothing usable and
    # score exactly 0.5 on the target; wired to the target split, they would score 1.0.
    target = _outputs({"target_in": 5.0, "target_out": -5.0,
                       "shadow_in": 0.0, "shadow_out": 0.0})
    shadow = _outputs({"target_in": 0.0, "target_out": 0.0,
                       "shadow_in": -5.0, "shadow_out": 5.0})
    for name, res in mia.attacks(target, shadow, fpr=0.05).items():
        assert res.accuracy == 0.5, name
        assert res.auc == 1.0, name  # the target split itself is separable


def test_fit_threshold_maximises_balanced_accuracy() -> None:
    rng = np.random.default_rng(3)
    m, n = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 300)
    t = fit_threshold(m, n)
    best = max(balanced_accuracy(c, m, n) for c in np.concatenate([m, n]))
    assert balanced_accuracy(t, m, n) == pytest.approx(best)


def test_auc_and_tpr_match_their_definitions() -> None:
    rng = np.random.default_rng(4)
    m = np.round(rng.normal(0.5, 1.0, 150), 1)  # rounded: ties on purpose
    n = np.round(rng.normal(0.0, 1.0, 170), 1)
    labels = np.r_[np.ones(len(m)), np.zeros(len(n))]
    assert roc_auc(m, n) == pytest.approx(roc_auc_score(labels, np.r_[m, n]))
    tpr = tpr_at_fpr(m, n, 0.05)
    cut = np.sort(n)[::-1][int(0.05 * len(n))]
    assert (n > cut).mean() <= 0.05
    assert tpr == pytest.approx((m > cut).mean())


def test_scores_from_logits() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    labels = np.array([0, 2])
    p = torch.softmax(torch.tensor(logits), dim=1).numpy()
    py = p[[0, 1], labels]
    assert np.allclose(loss_scores(logits, labels), np.log(py))
    assert np.allclose(logit_confidence(logits, labels), np.log(py / (1 - py)))


def test_bad_scores_name_the_argument() -> None:
    with pytest.raises(AttackInputError) as err:
        threshold_attack([], [1.0], [1.0], [0.0])
    assert err.value.field == "members"
    with pytest.raises(AttackInputError) as err:
        roc_auc([1.0], [np.nan])
    assert err.value.field == "non_members"
    with pytest.raises(AttackInputError):
        tpr_at_fpr([1.0], [0.0], 1.5)


# ---------------------------------------------------------------- the attack on models ---

def _random_label_models() -> tuple[mia.MiaSplit, np.ndarray, np.ndarray,
                                    dict[str, list[np.ndarray]]]:
    """The product's breast-cancer MLP trained centrally on random labels (nothing to learn
    but the samples themselves): on the target members, on the shadow members, and on a
    third disjoint set (a model that never saw the target members)."""
    x, _ = mia.load_pool("breast-cancer")
    y = np.random.default_rng(11).integers(0, 2, len(x)).astype(np.int64)
    split = mia.split_pool(len(x), 60, seed=5)
    used = np.concatenate(list(split.parts().values()))
    unseen = np.setdiff1d(np.arange(len(x)), used)[:60]
    models = {}
    for name, idx, seed in (("target", split.target_in, 1), ("shadow", split.shadow_in, 2),
                            ("unseen", unseen, 3)):
        model = build_model("breast-cancer", seed=seed)
        train_epochs(model, x[idx], y[idx], epochs=200, batch_size=30, lr=1e-2, seed=seed)
        models[name] = get_weights(model)
    return split, x, y, models


@pytest.fixture(scope="module")
def random_label_models() -> tuple[mia.MiaSplit, np.ndarray, np.ndarray,
                                   dict[str, list[np.ndarray]]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the product's clients train (clientapp.train)
    try:
        return _random_label_models()
    finally:
        torch.set_num_threads(threads)


def test_attack_finds_a_memorising_model(random_label_models: tuple) -> None:
    split, x, y, models = random_label_models
    target = mia.outputs("breast-cancer", models["target"], x, y, split)
    shadow = mia.outputs("breast-cancer", models["shadow"], x, y, split)
    assert target.accuracy("target_in") > 0.95  # it memorised its members
    for name, res in mia.attacks(target, shadow, fpr=0.05).items():
        assert res.accuracy > 0.65, name  # measured: 0.86 loss threshold, 0.72 calibrated
        assert res.auc > 0.7, name


def test_attack_is_chance_on_a_model_that_never_saw_the_members(
        random_label_models: tuple) -> None:
    split, x, y, models = random_label_models
    target = mia.outputs("breast-cancer", models["unseen"], x, y, split)
    shadow = mia.outputs("breast-cancer", models["shadow"], x, y, split)
    assert target.accuracy("target_in") < 0.65  # random labels: nothing to generalise
    for name, res in mia.attacks(target, shadow, fpr=0.05).items():
        assert abs(res.accuracy - 0.5) < 0.12, name  # measured: 0.46 and 0.51
        assert abs(res.auc - 0.5) < 0.12, name


# ---------------------------------------------------------------- the federations --------

def test_shard_client_app_reproduces_the_product_client_app() -> None:
    # The study's ClientApp differs from clientapp.client_app only in where its samples come
    # from: given the product's own partition it must produce the same global model.
    spec = parse_spec({"task": "breast-cancer", "clients": 2, "minClients": 2, "rounds": 2,
                       "dataset": {"seed": 3},
                       "training": {"localEpochs": 2, "batchSize": 16}})
    data = load_task("breast-cancer", 2, "iid", 3)
    shards = [(data.x_train[i], data.y_train[i]) for i in range(2)]
    product = simulate(spec)
    study = simulate(spec, client_app=mia.shard_client_app(shards))
    assert [r["accuracy"] for r in study["rounds"]] == [r["accuracy"] for r in product["rounds"]]
    for a, b in zip(product["weights"], study["weights"], strict=True):
        assert np.array_equal(a, b)
    # ...and it really trains on the shards it is given
    other = simulate(spec, client_app=mia.shard_client_app(shards[::-1]))
    assert not all(np.array_equal(a, b) for a, b in zip(product["weights"],
                                                        other["weights"], strict=True))


def test_study_runs_every_setting_with_the_products_accounting() -> None:
    cfg = mia.MiaConfig(task="breast-cancer", per_split=20, clients=2, rounds=2,
                        local_epochs=1, epsilons=(8.0,), modes=("central", "local"),
                        seeds=(0,))
    res = mia.study(cfg)
    assert list(res["settings"]) == ["no-dp", "central-eps-8", "local-eps-8"]
    no_dp, central, local = (res["settings"][k]["runs"][0] for k in res["settings"])
    assert no_dp["epsilon"] is None
    assert central["epsilon"] == pytest.approx(8.0, rel=1e-3)  # RDP, noise solved for it
    assert central["noise_multiplier"] > 0
    assert local["epsilon"] == pytest.approx(8.0)  # basic composition of per-round budgets
    for run in (no_dp, central, local):
        assert run["rounds_run"] == 2
        for attack in run["attacks"].values():
            assert 0.0 <= attack["accuracy"] <= 1.0
    table = "\n".join(mia.report_lines(res))
    assert "central-eps-8" in table and "8.00 (1e-05)" in table


def test_config_errors_name_the_field() -> None:
    with pytest.raises(mia.MiaConfigError) as err:
        mia.MiaConfig(per_split=1, clients=2)
    assert err.value.field == "per_split"
    with pytest.raises(mia.MiaConfigError) as err:
        mia.MiaConfig(modes=("sideways",))  # type: ignore[arg-type]
    assert err.value.field == "modes"
    with pytest.raises(mia.MiaConfigError) as err:
        mia.load_pool("mnist")
    assert err.value.field == "task"
    assert mia.parse_modes("central,local") == ("central", "local")
    with pytest.raises(mia.MiaConfigError) as err:
        mia.parse_modes("central,sideways")  # the CLI's --mia-dp
    assert err.value.field == "modes"
