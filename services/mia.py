"""Membership-inference study of pqfed's federated training (`pqfed bench-fl --only mia`).

Question: what does an attacker who can query the final global model learn about whether a
given sample was in some client's training data, without DP and under the product's central
and local DP at a given epsilon?

Setting (docs/BENCHMARKS.md says why): UCI HAPT windows (real data), the product's HAPT
1D-CNN (~78k parameters, the largest model pqfed ships), few samples per client and many
local epochs, so the non-private model overfits the way small cross-silo federations do.
HAPT's raw windows overlap by 50 %; the pool keeps only windows that overlap no other kept
window, so a non-member is never half of a member.

Split (`split_pool`): four disjoint, equally sized random subsets of the pool:
target members (the target federation's clients hold them), target non-members, shadow
members (the attacker's shadow federation holds them) and shadow non-members. Every
threshold is fitted on the shadow pair and only then applied to the target pair
(services/mia_attack.py), and the target pair is balanced, so 0.5 is chance.

Training is the product's federated path (services/simulation.py): Flower's strategies in
`VerifiedStrategy`, Flower's `DifferentialPrivacyServerSideFixedClipping` (central DP) or
`LocalDpMod` (local DP) with the spec's clipping norm, ML-DSA-signed updates, and the
epsilon reported by `RoundRecorder` (Flower's RDP accountant for central DP, basic
composition for local DP). Only which samples a client holds differs from `clientapp.train`:
`shard_client_app` trains on the study's shards with the same model, optimiser, seeds and
client mods (tests/services/test_mia.py checks it reproduces `clientapp.client_app`
bit for bit on the product's own partition).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from pqfed.services.mia_attack import (
    AttackResult,
    logit_confidence,
    loss_scores,
    threshold_attack,
)
from pqfed.services.spec import FederationJobSpec, parse_spec

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]
IndexArray = npt.NDArray[np.int64]
Mode = Literal["none", "central", "local"]


class MiaConfigError(ValueError):
    """A study configuration that cannot run. The message names the field and the fix."""

    def __init__(self, field_name: str, reason: str) -> None:
        self.field = field_name
        self.reason = reason
        super().__init__(f"{field_name}: {reason}")


@dataclass(frozen=True)
class MiaConfig:
    """One membership-inference study; defaults are the documented full run."""

    task: str = "hapt"
    per_split: int = 60  # samples in each of target in/out, shadow in/out
    clients: int = 2
    rounds: int = 4
    local_epochs: int = 30
    batch_size: int = 10
    learning_rate: float = 1e-3
    epsilons: tuple[float, ...] = (8.0, 2.0, 1.0)
    modes: tuple[Mode, ...] = ("central",)  # DP modes studied besides no DP
    seeds: tuple[int, ...] = (0, 1, 2)
    clipping_norm: float = 1.0
    delta: float = 1e-5
    fpr: float = 0.05  # ROC point reported as TPR at this FPR

    def __post_init__(self) -> None:
        if self.per_split < self.clients:
            raise MiaConfigError("per_split", f"{self.per_split} samples cannot give each of "
                                              f"{self.clients} clients one; raise per_split")
        if not self.seeds:
            raise MiaConfigError("seeds", "no seeds; give at least one (three for a spread)")
        for mode in self.modes:
            if mode not in ("central", "local"):
                raise MiaConfigError("modes", f"unknown DP mode {mode!r}; use central, local")
        if any(e <= 0 for e in self.epsilons):
            raise MiaConfigError("epsilons", "every epsilon must be > 0")


_DP_MODES: dict[str, Mode] = {"central": "central", "local": "local"}


def parse_modes(text: str) -> tuple[Mode, ...]:
    """`central`, `local` or `central,local` (the CLI's --mia-dp)."""
    modes: list[Mode] = []
    for part in text.split(","):
        if part in _DP_MODES:
            modes.append(_DP_MODES[part])
        elif part:
            raise MiaConfigError("modes", f"unknown DP mode {part!r}; use central, local or "
                                          "central,local")
    return tuple(modes)


@dataclass(frozen=True)
class PrivacySetting:
    mode: Mode
    epsilon: float | None = None

    @property
    def name(self) -> str:
        return "no-dp" if self.mode == "none" else f"{self.mode}-eps-{self.epsilon:g}"


def settings(cfg: MiaConfig) -> list[PrivacySetting]:
    return [PrivacySetting("none")] + [PrivacySetting(m, e) for m in cfg.modes
                                       for e in cfg.epsilons]


# ---------------------------------------------------------------- data ------------------

def load_pool(task: str) -> tuple[FloatArray, LabelArray]:
    """The samples the study draws from, standardised. HAPT: only windows that overlap no
    other kept window (the raw windows overlap by half; a member's neighbour would
    otherwise be a near-copy posing as a non-member)."""
    if task == "hapt":
        from pqfed.services.data.hapt import WINDOW, load_windows

        w = load_windows()
        order = np.lexsort((w["start"], w["experiment"]))
        keep: list[int] = []
        last_exp, last_start = -1, 0
        for i in order:
            exp, start = int(w["experiment"][i]), int(w["start"][i])
            if exp != last_exp or start - last_start >= WINDOW:
                keep.append(int(i))
                last_exp, last_start = exp, start
        idx = np.asarray(keep, dtype=np.int64)
        x = w["x"][idx].astype(np.float32)
        y = w["y"][idx].astype(np.int64)
        axes: tuple[int, ...] = (0, 2)
    elif task == "breast-cancer":
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        x = np.asarray(bunch.data, dtype=np.float32)
        y = np.asarray(bunch.target, dtype=np.int64)
        axes = (0,)
    else:
        raise MiaConfigError("task", f"{task!r} has no study pool; use hapt or breast-cancer")
    mean = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True) + 1e-6
    return ((x - mean) / std).astype(np.float32), y


@dataclass(frozen=True)
class MiaSplit:
    """Indices into the pool; four disjoint sets of equal size."""

    target_in: IndexArray
    target_out: IndexArray
    shadow_in: IndexArray
    shadow_out: IndexArray

    def parts(self) -> dict[str, IndexArray]:
        return {"target_in": self.target_in, "target_out": self.target_out,
                "shadow_in": self.shadow_in, "shadow_out": self.shadow_out}


def split_pool(n_pool: int, per_split: int, seed: int) -> MiaSplit:
    """Four disjoint random subsets of `per_split` pool indices each."""
    if per_split < 1 or 4 * per_split > n_pool:
        raise MiaConfigError("per_split", f"need 1 <= 4 x per_split <= {n_pool} samples in "
                                          f"the pool, got per_split={per_split}")
    perm = np.random.default_rng([seed, 0x4D4941]).permutation(n_pool)[: 4 * per_split]
    ti, to, si, so = (np.sort(p).astype(np.int64) for p in np.split(perm, 4))
    return MiaSplit(ti, to, si, so)


# ---------------------------------------------------------------- federated training ----

def shard_client_app(shards: Sequence[tuple[FloatArray, LabelArray]]) -> Any:
    """pqfed's ClientApp (same mods: LocalDpMod, compression, ML-DSA signing) whose
    train handler trains client `partition-id` on `shards[partition-id]`, exactly as
    `clientapp.train` trains on the product's partition."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from pqfed.services.mods import client_mods
    from pqfed.services.records import job_spec

    app = ClientApp(mods=client_mods())

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        from pqfed.services.models import build_model, get_weights, set_weights, train_epochs

        torch.set_num_threads(int(os.environ.get("PQFED_TORCH_THREADS", "1")))
        spec = job_spec(context)
        pid = int(str(context.node_config["partition-id"]))
        x, y = shards[pid]
        arrays, config = msg.content["arrays"], msg.content["config"]
        if not isinstance(arrays, ArrayRecord) or not isinstance(config, ConfigRecord):
            raise TypeError("train message without an ArrayRecord 'arrays' and a "
                            "ConfigRecord 'config'")
        model = build_model(spec.task, seed=spec.dataset.seed)
        set_weights(model, [np.asarray(a, dtype=np.float32) for a in arrays.to_numpy_ndarrays()])
        rnd = config["round"]
        if not isinstance(rnd, int):
            raise TypeError(f"config['round'] is {rnd!r}, not an int")
        t0 = time.perf_counter()
        loss = train_epochs(model, x, y, spec.training.local_epochs, spec.training.batch_size,
                            spec.training.learning_rate,
                            seed=spec.dataset.seed + pid * 1000 + rnd)
        metrics = MetricRecord({"train-loss": float(loss), "num-examples": len(y),
                                "train-seconds": time.perf_counter() - t0})
        return Message(RecordDict({"arrays": ArrayRecord(get_weights(model)),
                                   "metrics": metrics}), reply_to=msg)

    return app


def noise_multiplier_for(spec: FederationJobSpec, target_epsilon: float) -> float:
    """The smallest central-DP noise multiplier (to 1e-6 relative) with which `spec.rounds`
    rounds spend at most `target_epsilon` by the product's accountant (`epsilon_after`)."""
    from pqfed.services.rounds import epsilon_after

    lo, hi = 0.05, 200.0
    for _ in range(60):
        mid = (lo + hi) / 2
        p = spec.privacy.model_copy(update={"noise_multiplier": mid, "enabled": True,
                                            "mode": "central"})
        eps = epsilon_after(spec.model_copy(update={"privacy": p}), spec.rounds)
        if eps is not None and eps > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class TrainedModel:
    weights: list[npt.NDArray[Any]]
    rounds_run: int
    epsilon: float | None  # as the product reports it (status.epsilonSpent)
    noise_multiplier: float | None
    seconds: float


def job_spec(cfg: MiaConfig, setting: PrivacySetting, seed: int) -> FederationJobSpec:
    """The FederationJob spec of one study federation (target or shadow)."""
    doc: dict[str, Any] = {
        "task": cfg.task, "clients": cfg.clients, "minClients": cfg.clients,
        "rounds": cfg.rounds, "dataset": {"partition": "iid", "seed": seed},
        "training": {"localEpochs": cfg.local_epochs, "batchSize": cfg.batch_size,
                     "learningRate": cfg.learning_rate}}
    if setting.mode != "none":
        assert setting.epsilon is not None
        doc["privacy"] = {"enabled": True, "mode": setting.mode, "delta": cfg.delta,
                          "clippingNorm": cfg.clipping_norm,
                          "targetEpsilon": setting.epsilon}
    spec = parse_spec(doc)
    if setting.mode == "central":
        assert setting.epsilon is not None
        z = noise_multiplier_for(spec, setting.epsilon)
        spec = parse_spec({**doc, "privacy": {**doc["privacy"], "noiseMultiplier": z}})
    return spec


def train_federation(spec: FederationJobSpec, x: FloatArray, y: LabelArray) -> TrainedModel:
    """Runs the federation in process, the clients holding equal shards of (x, y)."""
    from pqfed.services.simulation import simulate

    for name in ("flwr", "flower"):
        logging.getLogger(name).setLevel(logging.ERROR)
    shards = [(x[i], y[i]) for i in np.array_split(np.arange(len(y)), spec.clients)]
    t0 = time.perf_counter()
    status = simulate(spec, client_app=shard_client_app(shards), job="mia")
    if "weights" not in status:
        raise RuntimeError(f"the federation completed no round: {status.get('message')}")
    p = spec.privacy
    return TrainedModel(
        weights=list(status["weights"]), rounds_run=len(status["rounds"]),
        epsilon=status.get("epsilonSpent"),
        noise_multiplier=p.noise_multiplier if p.enabled and p.mode == "central" else None,
        seconds=time.perf_counter() - t0)


def logits_of(task: str, weights: Sequence[npt.ArrayLike], x: FloatArray,
              batch: int = 1024) -> npt.NDArray[np.float64]:
    import torch

    from pqfed.services.models import build_model, set_weights

    model = build_model(task)
    set_weights(model, weights)
    model.eval()
    with torch.no_grad():
        out = [model(torch.from_numpy(x[i:i + batch])).double().numpy()
               for i in range(0, len(x), batch)]
    return np.concatenate(out)


# ---------------------------------------------------------------- the attack ------------

@dataclass(frozen=True)
class SplitOutputs:
    """The logits of one model on each part of the split, with the labels."""

    logits: dict[str, npt.NDArray[np.float64]]
    labels: dict[str, LabelArray]

    def loss(self, part: str) -> npt.NDArray[np.float64]:
        return loss_scores(self.logits[part], self.labels[part])

    def phi(self, part: str) -> npt.NDArray[np.float64]:
        return logit_confidence(self.logits[part], self.labels[part])

    def accuracy(self, part: str) -> float:
        return float((self.logits[part].argmax(axis=1) == self.labels[part]).mean())


def outputs(task: str, weights: Sequence[npt.ArrayLike], x: FloatArray, y: LabelArray,
            split: MiaSplit) -> SplitOutputs:
    return SplitOutputs({k: logits_of(task, weights, x[v]) for k, v in split.parts().items()},
                        {k: y[v] for k, v in split.parts().items()})


def attacks(target: SplitOutputs, shadow: SplitOutputs, fpr: float) -> dict[str, AttackResult]:
    """Both attacks on the target model, each calibrated on the shadow model's split only.

    Reference-calibrated: on the shadow split the shadow model is scored against the target
    model as reference (the target never trained on shadow samples); on the target split
    the roles swap (the shadow never trained on target samples). Either way the reference
    is a model of the same training procedure that is OUT for every scored sample."""
    loss = threshold_attack(shadow.loss("shadow_in"), shadow.loss("shadow_out"),
                            target.loss("target_in"), target.loss("target_out"), fpr)
    cal = threshold_attack(
        shadow.phi("shadow_in") - target.phi("shadow_in"),
        shadow.phi("shadow_out") - target.phi("shadow_out"),
        target.phi("target_in") - shadow.phi("target_in"),
        target.phi("target_out") - shadow.phi("target_out"), fpr)
    return {"loss-threshold": loss, "calibrated": cal}


# ---------------------------------------------------------------- the study -------------

@dataclass
class SettingRuns:
    setting: PrivacySetting
    runs: list[dict[str, Any]] = field(default_factory=list)


def run_one(cfg: MiaConfig, setting: PrivacySetting, seed: int, x: FloatArray,
            y: LabelArray) -> dict[str, Any]:
    """Target and shadow federation of one setting and seed, and both attacks."""
    split = split_pool(len(y), cfg.per_split, seed)
    # The shadow imitates the target's training (same spec, privacy included) on its own
    # data, with its own initialisation and shuffling seeds.
    target_spec = job_spec(cfg, setting, seed)
    target = train_federation(target_spec, x[split.target_in], y[split.target_in])
    shadow = train_federation(job_spec(cfg, setting, seed + 10_000),
                              x[split.shadow_in], y[split.shadow_in])
    t_out = outputs(cfg.task, target.weights, x, y, split)
    s_out = outputs(cfg.task, shadow.weights, x, y, split)
    return {
        "seed": seed,
        "test_accuracy": t_out.accuracy("target_out"),
        "train_accuracy": t_out.accuracy("target_in"),
        "epsilon": target.epsilon, "delta": cfg.delta if setting.mode != "none" else None,
        "noise_multiplier": target.noise_multiplier, "rounds_run": target.rounds_run,
        "seconds": target.seconds + shadow.seconds,
        "attacks": {k: v.to_json() for k, v in attacks(t_out, s_out, cfg.fpr).items()},
    }


def _spread(xs: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: _spread([r[k] for r in runs])
                           for k in ("test_accuracy", "train_accuracy")}
    for attack in runs[0]["attacks"]:
        out[attack] = {m: _spread([r["attacks"][attack][m] for r in runs])
                       for m in ("accuracy", "auc", "tpr_at_fpr", "shadow_accuracy")}
    return out


def study(cfg: MiaConfig, progress: Callable[[dict[str, Any]], None] | None = None
          ) -> dict[str, Any]:
    """Every setting x seed; settings alternate within a seed so host drift hits all.
    `progress` gets the partial result after every run (the bench writes it to disk)."""
    x, y = load_pool(cfg.task)
    per: dict[str, list[dict[str, Any]]] = {s.name: [] for s in settings(cfg)}
    t0 = time.perf_counter()

    def result() -> dict[str, Any]:
        return {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                "pool": len(y), "seconds": time.perf_counter() - t0,
                "settings": {name: {"runs": runs, "summary": summarise(runs)}
                             for name, runs in per.items() if runs}}

    for seed in cfg.seeds:
        for s in settings(cfg):
            per[s.name].append(run_one(cfg, s, seed, x, y))
            if progress is not None:
                progress(result())
    return result()


def report_lines(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    fpr = 100 * c["fpr"]
    lines = [f"### Membership inference, {c['task']}, {c['clients']} clients x "
             f"{c['per_split'] // c['clients']} samples, {c['rounds']} rounds x "
             f"{c['local_epochs']} local epochs, {len(c['seeds'])} seeds", "",
             "| setting | epsilon (delta) | noise mult. | test acc | train acc "
             f"| loss-threshold acc | AUC | TPR@{fpr:g}%FPR "
             f"| calibrated acc | AUC | TPR@{fpr:g}%FPR |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(d: dict[str, float]) -> str:
        return f"{d['mean']:.3f} ± {d['std']:.3f}"

    for name, s in r["settings"].items():
        run0, sm = s["runs"][0], s["summary"]
        eps = run0["epsilon"]
        eps_s = "-" if eps is None else f"{eps:.2f} ({run0['delta']:g})"
        z = run0["noise_multiplier"]
        cells = [name, eps_s, "-" if z is None else f"{z:.2f}",
                 ms(sm["test_accuracy"]), ms(sm["train_accuracy"])]
        for attack in ("loss-threshold", "calibrated"):
            cells += [ms(sm[attack][m]) for m in ("accuracy", "auc", "tpr_at_fpr")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def quick_config() -> MiaConfig:
    """A smoke-test sized study (`pqfed bench-fl --quick --only mia`)."""
    return MiaConfig(per_split=40, clients=2, rounds=2, local_epochs=5, epsilons=(8.0,),
                     seeds=(0, 1))
