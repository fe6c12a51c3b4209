"""``python -m pqfed.testbed.bench.overhead``: a whole small federation's round overhead
beyond compute, before vs after the idle back-off and the ASGI SuperLink middlewares.

Each run is ``pqfed run`` (services/runner.py `run_local`: PQC sidecars, SuperLink, ServerApp,
real SuperNodes with warm ClientApps training the breast-cancer MLP), so every figure is what
a real federation of 3 processes-as-pods pays. "before" sets ``PQFED_POLL_BACKOFF=0`` and
``PQFED_SUPERLINK_MIDDLEWARE=stock`` (fixed 0.1 s polls, Flower's middleware stack); "after"
is the default. Runs alternate (before, after, after, before, ...) so drift in host load hits
both; round 1 (start-up) is left out. Overhead = round duration - the clients' compute
(status.json ``durationSeconds - computeSeconds``). CIs: percentile bootstrap over rounds of
the median, and of the difference of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from pathlib import Path
from typing import Any

import yaml

from pqfed.services import API_GROUP_VERSION, KIND
from pqfed.testbed.bench.capacity import bootstrap_ci, median

VARIANT_ENV = {
    "before": {"PQFED_POLL_BACKOFF": "0", "PQFED_SUPERLINK_MIDDLEWARE": "stock"},
    "after": {},
}


def _diff_ci(a: list[float], b: list[float], resamples: int = 2000,
             seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of median(b) - median(a), resampling each side."""
    rng = random.Random(seed)
    diffs = sorted(median([rng.choice(b) for _ in b]) - median([rng.choice(a) for _ in a])
                   for _ in range(resamples))
    return diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pqfed.testbed.bench.overhead")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--runs", type=int, default=3, help="runs per variant (alternating)")
    p.add_argument("--out", default="results/bench-overhead")
    args = p.parse_args(argv)
    from pqfed.services import run_local

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    job = {"apiVersion": API_GROUP_VERSION, "kind": KIND, "metadata": {"name": "overhead"},
           "spec": {"task": "breast-cancer", "clients": args.clients,
                    "minClients": args.clients, "rounds": args.rounds,
                    "training": {"localEpochs": 2}}}
    path = out / "overhead-job.yaml"
    path.write_text(yaml.safe_dump(job))
    order = [v for i in range(args.runs)
             for v in (("before", "after") if i % 2 == 0 else ("after", "before"))]
    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANT_ENV}
    loads: dict[str, list[float]] = {v: [] for v in VARIANT_ENV}
    for variant in order:
        env = VARIANT_ENV[variant]
        os.environ.update(env)
        try:
            loads[variant].append(os.getloadavg()[0])
            result = run_local(path, out / "runs", pqc=True, show=False)
        finally:
            for key in env:
                os.environ.pop(key, None)
        rounds[variant] += result["status"]["rounds"][1:]
        print(f"{variant}: {[round(r['durationSeconds'], 3) for r in result['status']['rounds']]}",
              flush=True)
    summary: dict[str, Any] = {"command": ["python", "-m", "pqfed.testbed.bench.overhead",
                                           *(argv if argv is not None else [])]}
    over = {v: [r["durationSeconds"] - r["computeSeconds"] for r in rs]
            for v, rs in rounds.items()}
    lines = ["| variant | rounds | round s, median [95% CI] | overhead beyond compute s, median "
             "[95% CI] | mean overhead s | load 1-min at run starts |", "|---|---|---|---|---|---|"]
    for v, rs in rounds.items():
        dur = [r["durationSeconds"] for r in rs]
        lo, hi = bootstrap_ci(dur)
        olo, ohi = bootstrap_ci(over[v])
        summary[v] = {"rounds": len(rs), "round_median": median(dur), "round_ci": [lo, hi],
                      "overhead_median": median(over[v]), "overhead_ci": [olo, ohi],
                      "overhead_mean": statistics.fmean(over[v]), "loads": loads[v]}
        lines.append(f"| {v} | {len(rs)} | {median(dur):.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{median(over[v]):.3f} [{olo:.3f}, {ohi:.3f}] | "
                     f"{statistics.fmean(over[v]):.3f} | "
                     + ", ".join(f"{x:.1f}" for x in loads[v]) + " |")
    dlo, dhi = _diff_ci(over["before"], over["after"])
    delta = median(over["after"]) - median(over["before"])
    summary["overhead_delta"] = {"median": delta, "ci": [dlo, dhi]}
    lines += ["", f"after - before, median overhead: {delta:+.3f} s [95% CI {dlo:+.3f}, "
                  f"{dhi:+.3f}]"]
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
