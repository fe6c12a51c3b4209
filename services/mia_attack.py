"""Membership-inference attacks on a trained model's per-sample outputs (pure numpy).

Two attacks, both calibrated on a *shadow* split that is disjoint from the samples they are
scored on (Shokri et al., S&P 2017: the attacker trains shadow models on its own data, drawn
from the same population, and learns the decision rule there):

* loss threshold (Yeom et al., CSF 2018): "member" when the model's cross-entropy loss on the
  sample is below a threshold; the threshold maximises balanced accuracy on the shadow
  model's shadow members vs shadow non-members;
* reference-calibrated (offline LiRA with one reference model and a global variance, Carlini
  et al., S&P 2022; the same statistic as Watson et al.'s difficulty calibration, ICLR 2022):
  the score is the logit-scaled confidence phi = log(p_y / (1 - p_y)) of the attacked model
  minus that of a reference model that never trained on the sample, which removes how hard
  the sample is for any model. The threshold is fitted on the shadow split the same way.

Scores follow one convention: higher = more member-like. Nothing in this module sees the
evaluated members/non-members before the threshold is fixed; `threshold_attack` takes the
shadow and target scores as separate arguments and fits on the shadow pair only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Scores = npt.NDArray[np.float64]


class AttackInputError(ValueError):
    """Scores the attack cannot use. The message names the argument and the fix."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


def _scores(name: str, values: npt.ArrayLike) -> Scores:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise AttackInputError(name, "no scores; pass at least one sample's score")
    if not np.all(np.isfinite(arr)):
        raise AttackInputError(name, "scores must be finite; clip losses/logits before scoring")
    return arr


def balanced_accuracy(threshold: float, members: npt.ArrayLike,
                      non_members: npt.ArrayLike) -> float:
    """Mean of the true-positive and true-negative rates of "member iff score >= threshold"
    (0.5 = chance, whatever the class sizes)."""
    m, n = _scores("members", members), _scores("non_members", non_members)
    return float(((m >= threshold).mean() + (n < threshold).mean()) / 2)


def fit_threshold(members: npt.ArrayLike, non_members: npt.ArrayLike) -> float:
    """The threshold with the best balanced accuracy on these (shadow) scores: every distinct
    score is a candidate cut, ties broken towards the middle of the best run."""
    m, n = _scores("members", members), _scores("non_members", non_members)
    cuts = np.unique(np.concatenate([m, n, [np.inf]]))
    # tpr(c) = P(m >= c), tnr(c) = P(n < c), vectorised over all candidate cuts
    tpr = 1.0 - np.searchsorted(np.sort(m), cuts, side="left") / m.size
    tnr = np.searchsorted(np.sort(n), cuts, side="left") / n.size
    acc = (tpr + tnr) / 2
    best = np.flatnonzero(acc == acc.max())
    return float(cuts[best[len(best) // 2]])


def roc_auc(members: npt.ArrayLike, non_members: npt.ArrayLike) -> float:
    """P(score of a random member > score of a random non-member), ties counting half (the
    Mann-Whitney statistic; threshold-free)."""
    m, n = _scores("members", members), _scores("non_members", non_members)
    allv = np.concatenate([m, n])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(allv.size, dtype=np.float64)
    sorted_v = allv[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def tpr_at_fpr(members: npt.ArrayLike, non_members: npt.ArrayLike, fpr: float) -> float:
    """Share of members flagged at the strictest cut that flags at most `fpr` of the
    non-members (a point of the ROC curve, as Carlini et al. report)."""
    if not 0.0 <= fpr < 1.0:
        raise AttackInputError("fpr", f"{fpr} is outside [0, 1); use e.g. 0.05")
    m, n = _scores("members", members), _scores("non_members", non_members)
    allowed = int(np.floor(fpr * n.size))
    ns = np.sort(n)[::-1]
    # flag "score > cut": at most `allowed` non-members lie strictly above the cut
    cut = ns[allowed] if allowed < n.size else -np.inf
    return float((m > cut).mean())


@dataclass(frozen=True)
class AttackResult:
    """One attack scored on balanced target members vs non-members."""

    threshold: float  # fitted on the shadow split only
    shadow_accuracy: float  # balanced accuracy where the threshold was fitted
    accuracy: float  # balanced accuracy on the target split at that threshold
    auc: float  # target split, threshold-free
    tpr_at_fpr: float  # target split, ROC point
    fpr: float

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "shadow_accuracy": self.shadow_accuracy,
                "accuracy": self.accuracy, "auc": self.auc, "tpr_at_fpr": self.tpr_at_fpr,
                "fpr": self.fpr}


def threshold_attack(shadow_members: npt.ArrayLike, shadow_non_members: npt.ArrayLike,
                     target_members: npt.ArrayLike, target_non_members: npt.ArrayLike,
                     fpr: float = 0.05) -> AttackResult:
    """Fits the threshold on the shadow pair, then scores the target pair with it."""
    t = fit_threshold(shadow_members, shadow_non_members)
    return AttackResult(
        threshold=t,
        shadow_accuracy=balanced_accuracy(t, shadow_members, shadow_non_members),
        accuracy=balanced_accuracy(t, target_members, target_non_members),
        auc=roc_auc(target_members, target_non_members),
        tpr_at_fpr=tpr_at_fpr(target_members, target_non_members, fpr),
        fpr=fpr)


def loss_scores(logits: npt.ArrayLike, labels: npt.ArrayLike) -> Scores:
    """-cross-entropy per sample (Yeom's statistic, higher = more member-like)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    out: Scores = log_p[np.arange(len(y)), y]
    return out


def logit_confidence(logits: npt.ArrayLike, labels: npt.ArrayLike) -> Scores:
    """phi = log(p_y) - log(1 - p_y), computed stably from the logits (LiRA's statistic:
    close to Gaussian across models, unlike p_y itself)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    idx = np.arange(len(y))
    true = z[idx, y]
    others = z.copy()
    others[idx, y] = -np.inf
    top = others.max(axis=1)
    log_rest = top + np.log(np.exp(others - top[:, None]).sum(axis=1))
    out: Scores = np.clip(true - log_rest, -1e4, 1e4)
    return out
