"""``pqfed`` subcommands of the testbed: ``node-agent`` (an emulated Raspberry Pi node) and
``bench`` (the testbed benchmark, local processes or one pod per cluster node)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the testbed subcommands to the ``pqfed`` argument parser."""
    from pqfed.testbed.nodeagent import main

    p: argparse.ArgumentParser = sub.add_parser(
        "node-agent",
        help="run an emulated Raspberry Pi node: register a Node, run its pods as processes",
        description=(
            "A process-based mini-kubelet for the testbed control plane "
            "(testbed/cluster/up.sh): registers a Raspberry Pi 4 Node, renews its Lease and "
            "runs the pods scheduled to it as local processes, each in its own network and "
            "mount namespace. See testbed/nodeagent/README.md."
        ),
    )
    main.add_arguments(p)
    p.set_defaults(func=main.run)

    from pqfed.testbed.bench import main as bench

    b: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="testbed benchmark: per-node PQC costs, handshakes, throughput, round breakdown, "
             "seed-004 sequential/parallel/distributed crypto (docs/testbed.md)",
        description=(
            "Benchmarks the testbed: on every node ML-KEM-768/ML-DSA-65 latencies, hybrid vs "
            "classical handshakes to an aggregator and channel throughput through the PQC "
            "sidecar; a federation round's time breakdown; and the seed-004 experiment "
            "(per-round crypto sequential vs process pool vs distributed over the nodes). "
            "--mode local runs nodes as (pinned) local processes, --mode cluster one pod per "
            "node of a k3s or the emulated cluster. Writes results.json, results.csv, "
            "report.md and plots to --out. See docs/testbed.md."
        ),
    )
    bench.add_arguments(b)

    f: argparse.ArgumentParser = sub.add_parser(
        "bench-footprint",
        help="memory (PSS) per role of a federation, steady and peak (make bench-scale)",
        description=(
            "Runs breast-cancer federations with `pqfed run` (PQC sidecars) and samples the "
            "proportional memory (PSS) of every process, per pod and role (sidecar, "
            "SuperNode, SuperExec, ClientApp zygote and tasks, SuperLink, ServerApp, edge), "
            "steady state and peak, over several runs; --trees compares checkouts in one "
            "run. Writes results.json and report.md to --out. See docs/BENCHMARKS.md."
        ),
    )
    from pqfed.testbed.bench import footprint

    footprint.add_arguments(f)
