"""Per-round records, checkpoints and privacy accounting of a federation job.

The aggregator writes `status.json` (read by `pqfed run`'s progress display and by the
operator, which copies it into the FederationJob status) and one checkpoint per completed
round, atomically, so a crashed or restarted aggregator never loses a completed round.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pqfed.services.node_defaults import STATUS_FILE
from pqfed.services.spec import FederationJobSpec


@dataclass
class RoundRecord:
    round: int
    accuracy: float = 0.0
    loss: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    crypto_seconds: float = 0.0
    compute_seconds: float = 0.0  # the slowest participant's local training time
    # Where the rest of the round went (seconds): server -> last client start, last client
    # reply -> all replies at the server, aggregation + evaluation + checkpoint.
    dispatch_seconds: float = 0.0
    return_seconds: float = 0.0
    server_seconds: float = 0.0
    duration_seconds: float = 0.0
    participants: list[str] = field(default_factory=list)
    rejected_updates: int = 0
    epsilon: float | None = None
    completed_at: str = ""
    aggregated: bool = True
    notes: list[str] = field(default_factory=list)

    def to_status(self) -> dict[str, Any]:
        d = asdict(self)
        return {_camel(k): v for k, v in d.items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def local_dp_budget(spec: FederationJobSpec) -> tuple[float, float]:
    """(epsilon, delta) of one round of local DP, so that `spec.rounds` rounds compose (basic
    composition: epsilons and deltas add up) to at most (targetEpsilon, delta) per client.
    Before, each round got the full delta, so the job's delta was understated `rounds`-fold,
    and an unset target silently became 1.0."""
    p = spec.privacy
    if p.target_epsilon is None:
        raise ValueError("spec.privacy.targetEpsilon: local DP needs a target epsilon (the "
                         "budget split over the rounds); set it, e.g. targetEpsilon: 8")
    return p.target_epsilon / spec.rounds, p.delta / spec.rounds


def epsilon_after(spec: FederationJobSpec, rounds: int) -> float | None:
    """Client-level (epsilon) spent after `rounds` rounds at the spec's delta, or None."""
    p = spec.privacy
    if not p.enabled or rounds <= 0:
        return None if not p.enabled else 0.0
    if p.mode == "local":
        # LocalDpMod's Gaussian mechanism per round, composed basically (an upper bound); the
        # delta spent after `rounds` rounds is rounds * delta / spec.rounds.
        return local_dp_budget(spec)[0] * rounds
    if p.noise_multiplier <= 0:
        return float("inf")
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    per_round, population = spec.per_round, spec.total_clients
    acc = RdpAccountant(PrivacyConfig(p.delta, population,
                                      NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      SamplingMethod.NO_AMPLIFICATION))
    acc.compose(GaussianPrivacyEvent(p.noise_multiplier, per_round, population), rounds)
    return float(acc.get_epsilon(p.delta))


class RoundRecorder:
    def __init__(self, state_dir: Path, job: str, spec: FederationJobSpec) -> None:
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "checkpoints").mkdir(exist_ok=True)
        self.job = job
        self.spec = spec
        self.status: dict[str, Any] = {"job": job, "phase": "Pending", "currentRound": 0,
                                       "totalRounds": spec.rounds, "rounds": [],
                                       "initialAccuracy": None}
        self._open: dict[int, RoundRecord] = {}
        self._started: dict[int, float] = {}
        self._test: tuple[Any, Any] | None = None
        self._latest: dict[int, list[float]] = {}
        self._marks: dict[int, dict[str, float]] = {}

    # ---- resume -------------------------------------------------------------------------
    def resume(self) -> tuple[int, list[np.ndarray[Any, Any]] | None]:
        """Rounds already completed and the matching checkpoint (or 0, None)."""
        path = self.dir / STATUS_FILE
        if not path.exists():
            return 0, None
        status = json.loads(path.read_text())
        if status.get("job") != self.job:
            return 0, None
        done = int(status.get("currentRound", 0))
        ckpt = self.dir / "checkpoints" / f"round-{done:05d}.npz"
        if done == 0 or not ckpt.exists():
            return 0, None
        self.status = status
        with np.load(ckpt) as z:
            arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
        return done, arrays

    def rounds_allowed(self) -> int:
        """spec.rounds, or fewer if the privacy budget (targetEpsilon) would be exceeded."""
        p = self.spec.privacy
        if not (p.enabled and p.mode == "central" and p.target_epsilon):
            return self.spec.rounds
        allowed = 0
        for r in range(1, self.spec.rounds + 1):
            eps = epsilon_after(self.spec, r)
            if eps is None or eps > p.target_epsilon:
                break
            allowed = r
        if allowed < self.spec.rounds:
            self.status["message"] = (f"privacy budget epsilon={p.target_epsilon} allows "
                                      f"{allowed} of {self.spec.rounds} rounds")
        return allowed

    # ---- during a round -----------------------------------------------------------------
    def _rec(self, rnd: int) -> RoundRecord:
        return self._open.setdefault(rnd, RoundRecord(rnd))

    def start_round(self, rnd: int, bytes_sent: int) -> None:
        self._started[rnd] = time.time()
        self._rec(rnd).bytes_sent += bytes_sent
        self.status["phase"] = "Running"
        self._write()

    def add_crypto(self, rnd: int, seconds: float) -> None:
        self._rec(rnd).crypto_seconds += seconds

    def note_update(self, rnd: int, node: str, nbytes: int) -> None:
        rec = self._rec(rnd)
        rec.participants.append(node)
        rec.bytes_received += nbytes

    def note_compute(self, rnd: int, seconds: float) -> None:
        rec = self._rec(rnd)
        rec.compute_seconds = max(rec.compute_seconds, seconds)

    def note_timeline(self, rnd: int, received: float, replied: float) -> None:
        started = self._started.get(rnd)
        if started and received:
            self._latest.setdefault(rnd, [0.0, 0.0])
            self._latest[rnd][0] = max(self._latest[rnd][0], received - started)
            self._latest[rnd][1] = max(self._latest[rnd][1], replied)

    def mark(self, rnd: int, event: str) -> None:
        self._marks.setdefault(rnd, {})[event] = time.time()

    def note_rejected(self, rnd: int, reason: str) -> None:
        rec = self._rec(rnd)
        rec.rejected_updates += 1
        rec.notes.append(f"rejected: {reason}")

    def note_failure(self, rnd: int, reason: str, *, model_kept: bool = False) -> None:
        """Records a problem in the round; `model_kept` marks a round that aggregated
        nothing (the global model carries over unchanged)."""
        rec = self._rec(rnd)
        if model_kept:
            rec.aggregated = False
        rec.notes.append(reason)

    # ---- after a round ------------------------------------------------------------------
    def _test_set(self) -> tuple[Any, Any]:
        if self._test is None:
            from pqfed.services.data import TASKS, load_task

            s = self.spec
            # The global test split does not depend on how many clients share the training
            # data: a federation larger than the task's partition count still evaluates.
            n = min(s.clients, TASKS[s.task].max_clients)
            data = load_task(s.task, n, s.dataset.partition, s.dataset.seed)
            self._test = (data.x_test_global, data.y_test_global)
        return self._test

    def evaluate(self, server_round: int, arrays: Any, *, offset: int = 0) -> Any:
        """Flower `evaluate_fn`: central evaluation, then the round record and checkpoint."""
        from flwr.app import MetricRecord

        from pqfed.services.models import build_model, evaluate, set_weights

        weights = [np.asarray(a, dtype=np.float32) for a in arrays.to_numpy_ndarrays()]
        model = build_model(self.spec.task, seed=self.spec.dataset.seed)
        set_weights(model, weights)
        x, y = self._test_set()
        loss, acc = evaluate(model, x, y)
        if server_round == 0:
            if self.status.get("initialAccuracy") is None:
                self.status["initialAccuracy"] = acc
            return MetricRecord({"accuracy": acc, "loss": loss})
        rnd = offset + server_round
        rec = self._rec(rnd)
        rec.accuracy, rec.loss = float(acc), float(loss)
        now = time.time()
        rec.duration_seconds = now - self._started.get(rnd, now)
        if rnd in self._latest and "replies" in self._marks.get(rnd, {}):
            replies_at = self._marks[rnd]["replies"]
            rec.dispatch_seconds = self._latest[rnd][0]
            rec.return_seconds = max(0.0, replies_at - self._latest[rnd][1])
            rec.server_seconds = now - replies_at
        rec.epsilon = epsilon_after(self.spec, rnd)
        rec.completed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # Checkpoint first, then status: a crash between them re-runs this round only.
        buf = self.dir / "checkpoints" / f"round-{rnd:05d}.npz"
        with open(buf, "wb") as fh:
            np.savez(fh, *weights)
            fh.flush()
            os.fsync(fh.fileno())
        self.status["rounds"].append(rec.to_status())
        self.status["currentRound"] = rnd
        self.status["accuracy"] = float(acc)
        if rec.epsilon is not None:
            self.status["epsilonSpent"] = rec.epsilon
        self._write()
        del self._open[rnd]
        return MetricRecord({"accuracy": acc, "loss": loss})

    def close_round(self, rnd: int) -> RoundRecord:
        """Ends a round that is not evaluated here (an edge aggregator's round: the central
        aggregator evaluates and checkpoints the global model)."""
        rec = self._open.pop(rnd, None) or RoundRecord(rnd)
        now = time.time()
        rec.duration_seconds = now - self._started.get(rnd, now)
        rec.completed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.status["phase"] = "Running"
        record = rec.to_status()
        for key in ("accuracy", "loss", "epsilon"):  # evaluated centrally, not here
            record.pop(key)
        self.status["rounds"].append(record)
        self.status["currentRound"] = rnd
        self._write()
        return rec

    def completed_rounds(self) -> int:
        return int(self.status["currentRound"])

    def finish(self, audit_head: str | None = None) -> None:
        self.status["phase"] = "Succeeded"
        self.status["completionTime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if audit_head:
            self.status["auditHead"] = audit_head
        self._write()

    def _write(self) -> None:
        _atomic_write(self.dir / STATUS_FILE, json.dumps(self.status, indent=1).encode())


def read_status(state_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((state_dir / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
