"""``pqfed bench``: options, the run and the result files."""

from __future__ import annotations

import argparse
import contextlib
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pqfed.testbed.bench import SCHEMA
from pqfed.testbed.bench.common import host_info
from pqfed.testbed.bench.report import seed_summary, write_all
from pqfed.testbed.bench.watch import BenchError

STEPS = ("primitives", "handshake", "throughput", "seed", "federation")
QUICK = {"iterations": 100, "handshakes": 20, "throughput_mib": 8.0,
         "throughput_seconds": 0.5, "repeats": 5, "rounds": 2}
FULL = {"iterations": 1000, "handshakes": 200, "throughput_mib": 32.0,
        "throughput_seconds": 3.0, "repeats": 9, "rounds": 4}


def _git() -> str:
    repo = Path(__file__).resolve().parents[2]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10, check=False)
        if head.returncode == 0:
            return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return "unknown"


def _resolve(args: argparse.Namespace) -> None:
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    skip = [s for s in (args.skip or "").split(",") if s]
    bad = set(skip) - set(STEPS)
    if bad:
        raise ValueError(f"--skip: unknown step(s) {sorted(bad)}; choose from {STEPS}")
    args.skip = ",".join(skip)
    for e in getattr(args, "pod_env", []):
        if "=" not in e or not e.split("=", 1)[0]:
            raise ValueError(f"--pod-env {e!r}: expected KEY=VALUE")
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not clients or min(clients) < 1:
        raise ValueError("--clients: give positive client counts, e.g. 3,5,10,20")
    args.clients = ",".join(map(str, clients))


def node_arguments(args: argparse.Namespace) -> list[str]:
    """The options every node gets (same in both modes)."""
    node_skip = ",".join(s for s in args.skip.split(",") if s and s != "federation")
    return ["--iterations", str(args.iterations), "--handshakes", str(args.handshakes),
            "--throughput-mib", str(args.throughput_mib), "--throughput-seconds",
            str(args.throughput_seconds), "--clients", args.clients,
            "--repeats", str(args.repeats), "--skip", node_skip, "--timeout",
            str(args.timeout)]


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_role", None):
        return int(args.role_func(args))
    _resolve(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.time()
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    notes: list[str] = []
    driver = host_info()  # before anything starts: its load average is other people's work
    load = (driver.get("load_average") or [0.0])[0]
    if load > 0.5 * driver["usable_cpus"]:
        notes.append(f"This host was busy before the run started (1-min load average {load:.1f} "
                     f"on {driver['usable_cpus']} CPUs): latencies are inflated and the "
                     "parallel/distributed comparisons less reliable; rerun on an idle host.")
    data: dict[str, Any]
    skip = set(args.skip.split(",")) if args.skip else set()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        try:
            if args.mode == "local":
                from pqfed.testbed.bench import local

                data = local.run(args, out, progress, node_arguments(args))
                place = data["placement"]
                node_cores = float(place["distinct_node_cpus"])
                if place["pinned"]:
                    notes.append(f"Local mode: {args.nodes} nodes as processes pinned to CPUs "
                                 f"{place['nodes']} of this host's {place['host_cpus']} "
                                 "(a node's CPU budget); the aggregator may use every CPU.")
                else:
                    notes.append(f"Local mode: {args.nodes} unpinned node processes share "
                                 f"this host's {len(place['host_cpus'])} CPU(s).")
                if "federation" not in skip:
                    task = progress.add_task("federation round (pqfed run)", total=None)
                    from pqfed.testbed.bench.local import federation_round

                    try:
                        data["federation"] = federation_round(out, args.rounds, args.timeout)
                    except (RuntimeError, TimeoutError) as exc:
                        data["federation"] = {"skipped": f"the federation failed: {exc}"[:2000]}
                    progress.update(task, total=1, completed=1,
                                    description="federation round: done")
                else:
                    data["federation"] = {"skipped": "--skip federation"}
            else:
                from pqfed.testbed.bench import cluster

                data = cluster.run(args, out, progress, node_arguments(args))
                node_cores = data["node_cores"]
                notes.extend(data.pop("notes", []))
        except BenchError as exc:
            console.print(f"[red]pqfed bench failed:[/red] {exc}")
            return 1
    nodes = dict(sorted(data["nodes"].items(), key=lambda kv: (kv[1] or {}).get("index", 0)))
    agg = data["aggregator"]
    if agg.get("error"):
        notes.append(f"aggregator: {agg['error']}")
    results: dict[str, Any] = {
        "schema": SCHEMA, "run_id": run_id, "mode": args.mode, "quick": bool(args.quick),
        "started": started, "duration_s": time.time() - t0,
        "command": (["pqfed", *sys.argv[sys.argv.index("bench"):]] if "bench" in sys.argv
                    else ["pqfed", "bench", "(called in-process)"]),
        "settings": {k: getattr(args, k) for k in (
            "nodes", "clients", "repeats", "iterations", "handshakes", "throughput_mib",
            "throughput_seconds", "rounds", "skip", "cpus_per_node", "pin", "node_selector",
            "namespace", "image")
            if hasattr(args, k)},
        "git": _git(), "driver": driver, "driver_after": host_info(),
        "placement": data.get("placement"), "presets": data.get("presets", {}),
        "cluster": data.get("cluster"),
        "aggregator": agg, "nodes": nodes,
        "federation": data.get("federation", {"skipped": "not run"}),
    }
    if "seed" not in skip:
        results["seed"] = seed_summary(agg, nodes, node_cores, notes)
    hosts = [n["host"] for n in nodes.values()]
    if any(h["machine"] not in ("aarch64", "arm64") for h in hosts) and args.mode == "cluster":
        notes.append("The nodes run on " + ", ".join(sorted({h["machine"] for h in hosts}))
                     + " CPUs (emulated Pis?): expect real Raspberry Pi 4 numbers to be "
                     "several times slower; see docs/testbed.md.")
    results["notes"] = notes
    write_all(results, out)
    console.print((out / "report.md").read_text(), markup=False, highlight=False)
    console.print(f"results: {out}/results.json, results.csv, report.md, "
                  f"{', '.join(results['plots'])}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("local", "cluster"), default="local",
                   help="local: nodes are local processes; cluster: one pod per node")
    p.add_argument("--out", default="results/bench-testbed", help="output directory")
    p.add_argument("--quick", action="store_true", help="CI-sized run (fewer samples)")
    p.add_argument("--clients", default="3,5,10,20",
                   help="seed-004 client counts (default 3,5,10,20)")
    p.add_argument("--repeats", type=int, help="seed-004 repetitions (quick 5, full 9)")
    p.add_argument("--iterations", type=int, help="samples per primitive (100 / 1000)")
    p.add_argument("--handshakes", type=int, help="handshakes per kind per node (20 / 200)")
    p.add_argument("--throughput-mib", type=float, help="MiB per transfer (8 / 32)")
    p.add_argument("--throughput-seconds", type=float,
                   help="repeat transfers for at least this long (0.5 / 3)")
    p.add_argument("--rounds", type=int, help="federation rounds, local mode (2 / 4)")
    p.add_argument("--skip", default="",
                   help=f"comma-separated steps to leave out: {','.join(STEPS)}")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the whole run")
    local = p.add_argument_group("local mode")
    local.add_argument("--nodes", type=int, default=3, help="emulated nodes (default 3)")
    local.add_argument("--cpus-per-node", type=int, default=1,
                       help="CPUs pinned to each node process (default 1)")
    local.add_argument("--no-pin", dest="pin", action="store_false",
                       help="do not pin node processes to CPUs")
    cl = p.add_argument_group("cluster mode")
    cl.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config")
    cl.add_argument("--context", help="kubeconfig context")
    cl.add_argument("--node-selector", default="",
                    help="label selector of the nodes to benchmark, e.g. pqfed.io/pi=true")
    cl.add_argument("--aggregator-node", help="node for the aggregator pod (default: the "
                    "first selected node)")
    cl.add_argument("--namespace", default="pqfed-bench",
                    help="namespace for the pods (created and deleted if absent)")
    cl.add_argument("--image", default="localhost/pqfed/fl:0.1.0",
                    help="container image (ignored by the emulated nodes)")
    cl.add_argument("--image-pull-policy", default="IfNotPresent")
    cl.add_argument("--pod-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of the benchmark pods, e.g. PQFED_AEAD=CHACHA20-POLY1305 "
                         "(repeatable)")
    cl.add_argument("--keep", action="store_true", help="keep the pods and secret afterwards")
    cl.add_argument("--federation-job",
                    help="NAMESPACE/NAME of a FederationJob whose round status to include")

    roles = p.add_subparsers(dest="bench_role",
                             metavar="{node,aggregator,capacity,overhead,fleet-cost}")
    from pqfed.testbed.bench import aggregator, node

    np_ = roles.add_parser("node", help="(internal) the per-node benchmark; run by the driver")
    node.add_arguments(np_)
    np_.set_defaults(role_func=node.run)
    ap = roles.add_parser("aggregator", help="(internal) the aggregator side; run by the driver")
    aggregator.add_arguments(ap)
    ap.set_defaults(role_func=aggregator.run)
    from pqfed.testbed.bench import capacity

    cp = roles.add_parser("capacity", help="one real aggregator under 10-1,000 emulated "
                                           "clients (testbed/bench/capacity.py)")
    capacity.add_arguments(cp)
    from pqfed.testbed.bench import overhead

    op = roles.add_parser("overhead", help="a small federation's round overhead beyond "
                                           "compute, variants alternating "
                                           "(testbed/bench/overhead.py)")
    overhead.add_arguments(op)
    from pqfed.testbed.bench import fleet_cost

    fp = roles.add_parser("fleet-cost", help="one SuperLink's CPU per Fleet pull, apart from "
                                             "any load (testbed/bench/fleet_cost.py)")
    fleet_cost.add_arguments(fp)
    p.set_defaults(func=run)
