"""``--mode local``: every node is a local process (optionally pinned to its own CPUs, the
node's CPU budget), the aggregator another; all traffic stays on 127.0.0.1. Also runs one
real federation (services.runner.run_local) for the per-round time breakdown."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pqfed.services import API_GROUP_VERSION, KIND, free_ports
from pqfed.testbed.bench.common import (
    AggregatorPorts,
    make_material,
    usable_cpus,
    write_material,
)
from pqfed.testbed.bench.watch import BenchError, watch


@dataclass
class LocalProc:
    name: str
    argv: list[str]
    logfile: Path
    popen: subprocess.Popen[bytes] | None = None
    handle: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        import os

        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.logfile.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(self.argv, stdout=self.handle, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True)

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def state(self) -> str | None:
        assert self.popen is not None
        rc = self.popen.poll()
        if rc is None:
            return None
        return "ok" if rc == 0 else f"exit code {rc}"

    def stop(self) -> None:
        from pqfed.services import terminate_process_tree

        if self.popen is not None and self.popen.poll() is None:
            terminate_process_tree(self.popen.pid, timeout=10)
        if self.handle is not None:
            self.handle.close()


def placement(nodes: int, cpus_per_node: int, pin: bool) -> dict[str, Any]:
    """Which CPUs each emulated node gets: blocks of `cpus_per_node`, round-robin over the
    CPUs this process may use; nodes share CPUs when there are fewer than they need."""
    cpus = usable_cpus()
    plan: dict[str, list[int]] = {}
    for i in range(nodes):
        if pin and len(cpus) > 1:
            start = (i * cpus_per_node) % len(cpus)
            plan[f"node-{i}"] = [cpus[(start + k) % len(cpus)]
                                 for k in range(min(cpus_per_node, len(cpus)))]
        else:
            plan[f"node-{i}"] = list(cpus)
    distinct = sorted({c for v in plan.values() for c in v})
    return {"host_cpus": cpus, "nodes": plan, "pinned": pin and len(cpus) > 1,
            "distinct_node_cpus": len(distinct), "aggregator": list(cpus)}


def run(args: argparse.Namespace, out: Path, progress: Any, common: list[str]
        ) -> dict[str, Any]:
    place = placement(args.nodes, args.cpus_per_node, args.pin)
    ports = AggregatorPorts(*free_ports(5))
    pqfed = [sys.executable, "-m", "pqfed.cli", "bench"]
    procs: list[LocalProc] = []
    with tempfile.TemporaryDirectory(prefix="pqfed-bench-") as tmp:
        material = Path(tmp) / "material"
        write_material(material, make_material())
        agg = LocalProc("aggregator", [
            *pqfed, "aggregator", "--nodes", str(args.nodes), "--listen", "127.0.0.1",
            "--ports", ports.to_arg(), "--material", str(material), "--clients", args.clients,
            "--repeats", str(args.repeats), "--skip", args.skip, "--timeout",
            str(args.timeout)], out / "logs" / "aggregator.log")
        procs.append(agg)
        try:
            agg.start()
            watch([agg], progress, 180, until=lambda it, st: st.ready is not None)
            for i, (name, cpus) in enumerate(place["nodes"].items()):
                argv = [*pqfed, "node", "--name", name, "--index", str(i), "--nodes",
                        str(args.nodes), "--aggregator", "127.0.0.1", "--ports",
                        ports.to_arg(), "--material", str(material), *common]
                if place["pinned"]:
                    argv += ["--cpus", ",".join(map(str, cpus))]
                procs.append(LocalProc(name, argv, out / "logs" / f"{name}.log"))
                procs[-1].start()
            outcomes = watch(procs, progress, args.timeout)
        finally:
            for p in procs:
                p.stop()
    results = {name: o.parsed.result for name, o in outcomes.items()}
    agg_result = results.pop("aggregator")
    if agg_result is None:
        raise BenchError("the aggregator reported no result")
    return {"aggregator": agg_result, "nodes": results, "placement": place,
            "presets": {name: {"cpus": cpus, "network": "loopback (no shaping)"}
                        for name, cpus in place["nodes"].items()}}


FEDERATION_JOB = """apiVersion: {api_version}
kind: {kind}
metadata: {{name: bench-round}}
spec:
  task: breast-cancer
  clients: 3
  minClients: 3
  rounds: {rounds}
  training: {{localEpochs: 1}}
  compression: {{method: topk+int8, topkFraction: 0.3}}
"""


def federation_round(out: Path, rounds: int, timeout: float) -> dict[str, Any]:
    """A real federation (aggregator, 3 clients, PQC sidecars, all local processes): the
    per-round breakdown the aggregator records in status.json."""
    import importlib.util

    missing = [m for m in ("flwr", "torch", "sklearn") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"the FL extra is not installed ({', '.join(missing)} missing): "
                           "pip install -e '.[fl]'"}
    from pqfed.services import run_local

    fed_dir = out / "federation"
    fed_dir.mkdir(parents=True, exist_ok=True)
    job = fed_dir / "job.yaml"
    job.write_text(FEDERATION_JOB.format(api_version=API_GROUP_VERSION, kind=KIND, rounds=rounds))
    r = run_local(job, fed_dir / "runs", show=False, timeout=timeout)
    keys = ("round", "durationSeconds", "computeSeconds", "cryptoSeconds", "dispatchSeconds",
            "returnSeconds", "serverSeconds", "accuracy", "bytesSent", "bytesReceived")
    rows = [{k: x.get(k) for k in keys} for x in r["status"].get("rounds", [])]
    return {"job": "breast-cancer, 3 clients, top-k+int8, PQC sidecars (pqfed run)",
            "rounds": rows, "sidecars": r.get("sidecars", {}),
            "wallSeconds": r["wallSeconds"], "runDir": r["runDir"]}
