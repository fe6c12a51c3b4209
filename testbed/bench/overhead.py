"""``pqfed bench overhead`` (``python -m pqfed.testbed.bench.overhead``): a whole small
federation's round overhead beyond compute, between variants of how Flower polls
(``--variants``, alternating).

Each run is ``pqfed run`` (services/runner.py `run_local`: PQC sidecars, SuperLink, ServerApp,
real SuperNodes with warm ClientApps training the breast-cancer MLP), so every figure is what
a real federation of 3 processes-as-pods pays. "before" sets ``PQFED_POLL_BACKOFF=0`` and
``PQFED_SUPERLINK_MIDDLEWARE=stock`` (fixed 0.1 s polls, Flower's middleware stack); "after"
sets ``PQFED_LONG_POLL=0`` (idle back-off and ASGI middlewares, no long poll); "longpoll" is
the default (the SuperLink also holds empty pulls, services/flower/longpoll.py). Runs
alternate (A, B, B, A, ...) so drift in host load hits all; round 1 (start-up) is left out.
Overhead = round duration - the clients' compute (status.json ``durationSeconds -
computeSeconds``). CIs: percentile bootstrap over rounds of the median, and of the difference
of medians.
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
    "after": {"PQFED_LONG_POLL": "0"},
    "longpoll": {},
}


def _diff_ci(a: list[float], b: list[float], resamples: int = 2000,
             seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of median(b) - median(a), resampling each side."""
    rng = random.Random(seed)
    diffs = sorted(median([rng.choice(b) for _ in b]) - median([rng.choice(a) for _ in a])
                   for _ in range(resamples))
    return diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--runs", type=int, default=3, help="runs per variant (alternating)")
    p.add_argument("--variants", default="after,longpoll",
                   help="comma-separated, alternating; differences against the first: "
                        + "; ".join(f"{k}: {v or 'the default'}" for k, v in VARIANT_ENV.items()))
    p.add_argument("--out", default="results/bench-overhead")
    p.set_defaults(role_func=run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pqfed.testbed.bench.overhead")
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Alternating runs of each variant; writes results.json and report.md to --out."""
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if len(variants) < 2 or any(v not in VARIANT_ENV for v in variants):
        raise SystemExit(f"--variants {args.variants!r}: give two or more of "
                         f"{', '.join(VARIANT_ENV)}")
    from pqfed.services import run_local

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    job = {"apiVersion": API_GROUP_VERSION, "kind": KIND, "metadata": {"name": "overhead"},
           "spec": {"task": "breast-cancer", "clients": args.clients,
                    "minClients": args.clients, "rounds": args.rounds,
                    "training": {"localEpochs": 2}}}
    path = out / "overhead-job.yaml"
    path.write_text(yaml.safe_dump(job))
    order = [v for i in range(args.runs) for v in (variants if i % 2 == 0 else variants[::-1])]
    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    loads: dict[str, list[float]] = {v: [] for v in variants}
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
    summary: dict[str, Any] = {"command": ["pqfed", "bench", "overhead", "--clients",
                                           str(args.clients), "--rounds", str(args.rounds),
                                           "--runs", str(args.runs), "--variants",
                                           ",".join(variants), "--out", args.out]}
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
    base = variants[0]
    lines.append("")
    for v in variants[1:]:
        dlo, dhi = _diff_ci(over[base], over[v])
        delta = median(over[v]) - median(over[base])
        summary[f"overhead_delta_{v}"] = {"median": delta, "ci": [dlo, dhi]}
        lines.append(f"{v} - {base}, median overhead: {delta:+.3f} s [95% CI {dlo:+.3f}, "
                     f"{dhi:+.3f}]")
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
