"""`pqfed run` and `pqfed fl` subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pqfed.services import fl_node
from pqfed.services.spec import JobSpecError


def _run(args: argparse.Namespace) -> int:
    from pqfed.services.runner import Interrupted, run_local

    attackers = frozenset(int(i) for i in args.attackers.split(",") if i) if args.attackers \
        else frozenset()
    try:
        run_local(Path(args.job), Path(args.out), pqc=not args.plaintext, attackers=attackers)
    except JobSpecError as exc:
        print(f"pqfed: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:
        print(f"pqfed: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"pqfed: interrupted ({exc}); every process of the run was stopped",
              file=sys.stderr)
        return 128 + exc.signum  # the shell's convention for "killed by signal N"
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pqfed.services.benchfl import main as bench_main

    return bench_main(args)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run a FederationJob locally (processes, PQC sidecars)")
    run.add_argument("job", help="FederationJob YAML")
    run.add_argument("--out", default="results/runs")
    run.add_argument("--plaintext", action="store_true",
                     help="no sidecars (benchmark baseline only)")
    run.add_argument("--attackers", default="", help="client indexes that flip labels, e.g. 0,3")
    run.set_defaults(func=_run)
    fl_node.register(sub)
    bench = sub.add_parser("bench-fl", help="FL benchmarks (docs/BENCHMARKS.md)")
    bench.add_argument("--out", default="results/bench-fl")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--only", default="",
                       help="comma list: hapt,privacy,mia,poisoning,hierarchy,transport")
    bench.add_argument("--mia-dp", default="central",
                       help="DP modes of the mia study besides no DP: central, local or both "
                            "(central,local)")
    bench.set_defaults(func=_bench)
