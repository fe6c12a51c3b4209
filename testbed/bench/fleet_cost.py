"""``pqfed bench fleet-cost``: what one Fleet request costs a SuperLink, apart from any load.

Starts one SuperLink as `pqfed fl` configures it (pqfed's patches, the asgi middleware stack;
``--stack stock`` for Flower's), without the long poll so that every pull is answered at
once, and drives it with Flower's own SuperNode client (``http_request_response``): ``--nodes``
nodes register, then each sends ``--pulls`` authenticated ``pull-messages`` one after another
(all nodes at the same time). The SuperLink's CPU time (user + system, from /proc) over the
pulls, divided by their number, is the figure; the capacity benchmark's per-round CPU divided
by that is the number of requests a round can afford.

No PQC sidecar and no ServerApp: only the SuperLink's HTTP stack and Flower's state, which is
what the capacity benchmark found to grow with the clients (docs/BENCHMARKS.md, "Where a
300-client round goes").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STACKS = ("asgi", "stock")


@dataclass(frozen=True)
class FleetCost:
    stack: str
    nodes: int
    pulls: int  # in all
    wall_s: float
    cpu_s: float  # the SuperLink's user + system over the pulls
    user_s: float
    system_s: float

    @property
    def cpu_ms_per_pull(self) -> float:
        return 1000.0 * self.cpu_s / self.pulls

    def line(self) -> str:
        return (f"{self.stack}: {self.nodes} node(s), {self.pulls} pulls in {self.wall_s:.1f} s; "
                f"SuperLink CPU {self.cpu_s:.2f} s (user {self.user_s:.2f}, system "
                f"{self.system_s:.2f}) = {self.cpu_ms_per_pull:.2f} ms per pull")


def measure(stack: str, nodes: int, pulls_per_node: int, run_dir: Path) -> FleetCost:
    import psutil
    from flwr.supernode.fleet_http_connection import http_request_response

    from pqfed.services import FlowerTuning, SuperLinkProcess, free_port

    if stack not in STACKS or nodes < 1 or pulls_per_node < 1:
        raise ValueError(f"stack {stack!r} (one of {STACKS}), nodes {nodes} and pulls "
                         f"{pulls_per_node} (both >= 1)")
    tuning = FlowerTuning(poll_cap=0.5, superlink_middleware=stack)
    link = SuperLinkProcess(run_dir, free_port(), tuning=tuning)
    link.start().wait_ready(90)
    try:
        if link.proc is None or link.proc.popen is None:
            raise RuntimeError("the SuperLink did not start")
        server = psutil.Process(link.proc.popen.pid)
        ready = threading.Barrier(nodes + 1)
        go = threading.Event()
        errors: list[BaseException] = []

        def node() -> None:
            try:
                with http_request_response(link.address, insecure=True) as conn:
                    receive = conn[1]
                    receive()  # registered, activated, one pull: not counted
                    ready.wait()
                    go.wait()
                    for _ in range(pulls_per_node):
                        if receive() is not None:
                            raise RuntimeError("a pull found a message; nothing was sent")
            except BaseException as exc:  # reported after the join
                errors.append(exc)
                ready.abort()

        threads = [threading.Thread(target=node, daemon=True) for _ in range(nodes)]
        for t in threads:
            t.start()
        ready.wait(timeout=120)
        before, t0 = server.cpu_times(), time.perf_counter()
        go.set()
        for t in threads:
            t.join()
        after, wall = server.cpu_times(), time.perf_counter() - t0
        if errors:
            raise errors[0]
    finally:
        link.stop()
    user, system = after.user - before.user, after.system - before.system
    return FleetCost(stack, nodes, nodes * pulls_per_node, wall, user + system, user, system)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", default="asgi", choices=STACKS,
                   help="the SuperLink's middleware stack (FlowerTuning.superlink_middleware)")
    p.add_argument("--nodes", type=int, default=1, help="nodes pulling at the same time")
    p.add_argument("--pulls", type=int, default=300, help="pulls per node")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    p.set_defaults(role_func=run)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="pqfed-fleet-cost-") as tmp:
        cost = measure(args.stack, args.nodes, args.pulls, Path(tmp))
    print(cost.line())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**asdict(cost),
                                        "cpu_ms_per_pull": cost.cpu_ms_per_pull}, indent=2))
    return 0
