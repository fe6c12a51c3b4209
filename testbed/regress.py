"""Two revisions of pqfed benchmarked in one run, alternating: did a change make anything slower?

    python -m pqfed.testbed.regress --base 258dc25 --runs 3 --out results/regress pqc transport

The base revision is exported with `git archive` into `$PQFED_CACHE/regress/<commit>/` and run
from there with the same virtualenv (its `src/` first on PYTHONPATH); the head is this
checkout. Runs alternate ABBA (head, base, base, head, ...), so drift in host load hits both.
Each step runs the same commands against both trees:

* `pqc`: `pqfed bench-pqc --only primitives,handshake,parallel,throughput` (ML-KEM/ML-DSA
  primitives, the pqfed1 handshake in memory and over loopback, handshakes in parallel, bulk
  throughput through a sidecar pair vs a plaintext relay pair);
* `transport`: `pqfed run` of a 3-client breast-cancer job (12 rounds), with PQC sidecars and
  then `--plaintext`; round 1 (start-up) is left out.

A harness file can be taken from the head for both trees (`--harness pqc/bench.py`): a
benchmark driver fixed after the base revision then measures the base's code, not the base's
bug; the report lists the files so replaced.

A run can be stopped between runs: `--collect-only` rebuilds the report from the runs in
`--out` that both trees completed (meta.json keeps what the report needs).

Report: for each metric, both revisions' median over the samples (one per run; one per round
for round times), the spread (min-max), and head/base with a 95% bootstrap interval
(resampling each revision's samples); an interval that excludes 1 is a difference the runs
resolve.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqfed.cache import cache_dir
from pqfed.services import API_GROUP_VERSION, KIND

REPO = Path(__file__).resolve().parent.parent
STEPS = ("pqc", "transport")
TRANSPORT_ROUNDS = 12
TRANSPORT_JOB = {
    "apiVersion": API_GROUP_VERSION, "kind": KIND,
    "metadata": {"name": "regress"},
    "spec": {"task": "breast-cancer", "clients": 3, "minClients": 3,
             "rounds": TRANSPORT_ROUNDS, "training": {"localEpochs": 2}},
}
PRIMITIVES = ("ML-KEM-768 keygen", "ML-KEM-768 encaps", "ML-KEM-768 decaps", "ML-DSA-65 keygen",
              "ML-DSA-65 sign", "ML-DSA-65 verify")


class RegressError(RuntimeError):
    """A revision cannot be exported or a benchmark command failed; says which and why."""


@dataclass(frozen=True, slots=True)
class Tree:
    """A source tree to benchmark: the label in the report and the directory holding src/."""

    label: str
    root: Path

    def env(self) -> dict[str, str]:
        # The tree's sources first; the virtualenv (sys.executable) supplies the dependencies.
        return {**os.environ, "PYTHONPATH": str(self.root / "src")}


@dataclass(slots=True)
class Samples:
    """metric -> tree label -> samples."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    def add(self, metric: str, unit: str, label: str, xs: Sequence[float]) -> None:
        self.units[metric] = unit
        self.values.setdefault(metric, {}).setdefault(label, []).extend(xs)


def resolve(rev: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RegressError(f"--base {rev!r}: not a commit of {REPO} ({out.stderr.strip()})")
    return out.stdout.strip()


def export(commit: str, cache: Path, harness: Sequence[str]) -> Path:
    """`git archive` of `commit` (once), then the head's copy of each harness file."""
    root = cache / "regress" / commit[:12]
    if not (root / ".complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        blob = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit],
                              capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(root, filter="tar")
        (root / ".complete").write_text(commit)
    for rel in harness:
        src = REPO / rel
        if not src.is_file():
            raise RegressError(f"--harness {rel}: no such file in {REPO}")
        shutil.copyfile(src, root / rel)
    return root


def _run(tree: Tree, args: Sequence[str], log: Path, timeout: float) -> None:
    with log.open("ab") as f:
        f.write(f"\n$ [{tree.label}] {' '.join(args)}\n".encode())
        f.flush()
        done = subprocess.run([sys.executable, "-m", "pqfed.cli", *args], cwd=tree.root,
                              env=tree.env(), stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
    if done.returncode != 0:
        raise RegressError(f"[{tree.label}] pqfed {' '.join(args)} exited {done.returncode}; "
                           f"see {log}")


def _dig(data: dict[str, Any], *path: str) -> float:
    node: Any = data
    for key in path:
        node = node[key]
    return float(node)


def run_pqc(tree: Tree, out: Path, log: Path) -> None:
    _run(tree, ["bench-pqc", "--only", "primitives,handshake,parallel,throughput",
                "--out", str(out)], log, 3600)


def collect_pqc(label: str, out: Path, samples: Samples) -> None:
    r = json.loads((out / "results.json").read_text())
    for op in PRIMITIVES:
        samples.add(f"{op}, p50", "µs", label, [_dig(r, "primitives", op, "ours", "p50_us")])
    for variant in ("pq-sequential", "pq-parallel"):
        for where in ("in_memory", "loopback"):
            for stat in ("p50_us", "p99_us"):
                samples.add(f"handshake {variant}, {where}, {stat[:3]}", "µs", label,
                            [_dig(r, "handshake", variant, where, stat)])
    peers = r["parallel"]["peers"]
    for n in peers:
        for how in ("sequential", "processes"):
            samples.add(f"{n} handshakes, {how}", "s", label,
                        [_dig(peers, n, "seconds", how)])
    t = r["throughput"]
    samples.add("sidecar pair throughput", "MB/s", label, [t["secure_Bps"] / 1e6])
    # the harness's format: one entry per channel protocol; pqfed1 is in every tree
    samples.add("sidecar pair / plaintext relays", "ratio", label,
                [_dig(t, "ratio", "pqfed1", "median")])
    for side, rss in t.get("sidecar_rss_mib", {}).get("pqfed1", {}).items():
        samples.add(f"sidecar RSS, {side}", "MiB", label, [rss])


def _run_results(out: Path) -> Path:
    """`pqfed run --out D` writes D/results.json in older trees and D/<job>-<time>/results.json
    since runs got their own directories."""
    found = sorted(out.glob("results.json")) or sorted(out.glob("*/results.json"))
    if not found:
        raise RegressError(f"no results.json under {out}")
    return found[-1]


def run_transport(tree: Tree, out: Path, log: Path) -> None:
    import yaml

    job = out / "job.yaml"
    out.mkdir(parents=True, exist_ok=True)
    job.write_text(yaml.safe_dump(TRANSPORT_JOB))
    for variant, extra in TRANSPORT_VARIANTS:
        _run(tree, ["run", str(job), "--out", str(out / variant), *extra], log, 1800)


def collect_transport(label: str, out: Path, samples: Samples) -> None:
    for variant, _ in TRANSPORT_VARIANTS:
        rounds = json.loads(_run_results(out / variant).read_text())["status"]["rounds"]
        later = rounds[1:]  # round 1 is start-up
        samples.add(f"round, {variant}", "s", label,
                    [x["durationSeconds"] for x in later])
        samples.add(f"round beyond compute, {variant}", "s", label,
                    [x["durationSeconds"] - x["computeSeconds"] for x in later])


TRANSPORT_VARIANTS: tuple[tuple[str, list[str]], ...] = (("pqc", []),
                                                         ("plaintext", ["--plaintext"]))


@dataclass(frozen=True)
class Step:
    """A benchmark step: run it against a tree into a directory; read its samples back."""

    run: Callable[[Tree, Path, Path], None]
    collect: Callable[[str, Path, Samples], None]


STEP_FUNCS: dict[str, Step] = {"pqc": Step(run_pqc, collect_pqc),
                               "transport": Step(run_transport, collect_transport)}


def run_dir(out: Path, step: str, label: str, i: int) -> Path:
    return out / f"{step}-{label}-{i}"


def collect(out: Path, steps: Sequence[str]) -> tuple[Samples, int]:
    """Samples of every complete run under `out` (a run counts when both trees finished
    every step): the report of a run that was stopped early, or rebuilt later."""
    samples, done = Samples(), 0
    while True:
        dirs = {(step, label): run_dir(out, step, label, done)
                for step in steps for label in ("head", "base")}
        probe = Samples()
        try:
            for (step, label), d in dirs.items():
                STEP_FUNCS[step].collect(label, d, probe)
        except (OSError, KeyError, ValueError, RegressError):
            return samples, done
        for metric, per_label in probe.values.items():
            for label, xs in per_label.items():
                samples.add(metric, probe.units[metric], label, xs)
        done += 1


def bootstrap_ratio(head: Sequence[float], base: Sequence[float], *, n: int = 4000,
                    seed: int = 1) -> tuple[float, float]:
    """95% percentile-bootstrap interval of median(head) / median(base)."""
    rng = random.Random(seed)
    ratios = []
    for _ in range(n):
        h = statistics.median(rng.choices(head, k=len(head)))
        b = statistics.median(rng.choices(base, k=len(base)))
        if b:
            ratios.append(h / b)
    ratios.sort()
    return ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]


def report(samples: Samples, head: str, base: str, meta: dict[str, Any]) -> str:
    lines = [f"head `{meta['head']}` vs base `{meta['base']}`, {meta['runs']} runs each, "
             f"alternating ABBA; load average at start {meta['load_start']}, at end "
             f"{meta['load_end']}; {meta['seconds']:.0f} s in all.", ""]
    if meta["harness"]:
        lines += ["Harness files taken from the head for both trees: "
                  + ", ".join(f"`{h}`" for h in meta["harness"]) + ".", ""]
    lines += ["| metric | unit | base median (min-max) | head median (min-max) "
              "| head / base [95% CI] | n |", "|---|---|---|---|---|---|"]
    for metric, by in samples.values.items():
        h, b = by.get(head, []), by.get(base, [])
        if not h or not b:
            continue
        lo, hi = bootstrap_ratio(h, b)
        ratio = statistics.median(h) / statistics.median(b) if statistics.median(b) else 0.0
        lines.append(f"| {metric} | {samples.units[metric]} | {_cell(b)} | {_cell(h)} | "
                     f"{ratio:.3f} [{lo:.3f}-{hi:.3f}] | {len(b)}+{len(h)} |")
    return "\n".join(lines) + "\n"


def _cell(xs: Sequence[float]) -> str:
    return f"{_fmt(statistics.median(xs))} ({_fmt(min(xs))}-{_fmt(max(xs))})"


def _fmt(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3f}"


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pqfed.testbed.regress",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("steps", nargs="+", choices=STEPS)
    p.add_argument("--base", required=True, help="the revision to compare against (commit)")
    p.add_argument("--runs", type=int, default=3, help="runs per revision and step (>= 2)")
    p.add_argument("--out", type=Path, default=Path("results/regress"))
    p.add_argument("--harness", action="append", default=[],
                   help="a benchmark driver file (path in the repo) the base also runs from "
                        "the head, e.g. pqc/bench.py; repeatable")
    p.add_argument("--collect-only", action="store_true",
                   help="run nothing: rebuild the report from the complete runs in --out")
    args = p.parse_args(argv)
    if args.runs < 2:
        p.error("--runs: at least 2 (a spread needs two runs)")
    out: Path = args.out.resolve()
    if args.collect_only:
        meta = json.loads((out / "meta.json").read_text())
        samples, meta["runs"] = collect(out, meta["steps"])
        if meta["runs"] < 2:
            p.error(f"--collect-only: {meta['runs']} complete runs in {out}; a report needs 2")
        meta.update({"load_end": "(run stopped early; not recorded)",
                     "seconds": time.time() - meta["started"]})
        return _finish(out, samples, meta)
    cache = cache_dir()
    commit = resolve(args.base)
    head_rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, check=True).stdout.strip()
    trees = {"head": Tree("head", REPO), "base": Tree("base", export(commit, cache,
                                                                     args.harness))}
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    meta = {"head": head_rev, "base": commit[:12], "runs": args.runs, "harness": args.harness,
            "load_start": _load(), "started": time.time(), "steps": args.steps}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    samples = Samples()
    for i in range(args.runs):
        order = ("head", "base") if i % 2 == 0 else ("base", "head")
        for step in args.steps:
            for label in order:
                print(f"regress: run {i + 1}/{args.runs}, {step}, {label}", flush=True)
                d = run_dir(out, step, label, i)
                STEP_FUNCS[step].run(trees[label], d, log)
                STEP_FUNCS[step].collect(label, d, samples)
    meta.update({"load_end": _load(), "seconds": time.time() - meta["started"]})
    return _finish(out, samples, meta)


def _finish(out: Path, samples: Samples, meta: dict[str, Any]) -> int:
    (out / "samples.json").write_text(json.dumps({"meta": meta, "units": samples.units,
                                                  "values": samples.values}, indent=1))
    text = report(samples, "head", "base", meta)
    (out / "report.md").write_text(text)
    print(text)
    return 0

if __name__ == "__main__":
    sys.exit(main())
