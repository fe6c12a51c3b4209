"""`pqfed bench-fl --only hierarchy`: flat vs hierarchical (edge aggregators) federations.

Accuracy and traffic use the in-process federation (services/simulation.py; real strategies,
ClientApps, signatures and edge rounds) on HAPT's natural per-subject split; round latency
runs whole federations as processes (`pqfed run`, PQC sidecars on every hop), flat and
hierarchical, in the same invocation.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from pqfed.services.spec import API_GROUP_VERSION, KIND, parse_spec


def study_hierarchy(rounds: int, latency_rounds: int, work_dir: Path) -> dict[str, Any]:
    from pqfed.services.simulation import simulate

    base: dict[str, Any] = {
        "task": "hapt", "clients": 6, "minClients": 6, "rounds": rounds,
        "dataset": {"partition": "natural"},
        "training": {"localEpochs": 1, "batchSize": 64, "learningRate": 0.001},
        "compression": {"method": "topk+int8", "topkFraction": 0.1}}
    out: dict[str, Any] = {"clients": 6, "edges": 2, "rounds": rounds, "runs": {}}
    for name, extra in (("flat", {}),
                        ("2 edges", {"hierarchy": {"enabled": True, "edges": 2}})):
        st = simulate(parse_spec({**base, **extra}))
        rs = st["rounds"]
        out["runs"][name] = {
            "final": rs[-1]["accuracy"], "best": max(r["accuracy"] for r in rs),
            "central_in_per_round": statistics.fmean(r["bytesReceived"] for r in rs),
            "central_out_per_round": statistics.fmean(r["bytesSent"] for r in rs[1:]),
            "central_updates_per_round": statistics.fmean(len(r["participants"])
                                                          for r in rs),
        }
    out["latency"] = _latency(latency_rounds, work_dir)
    return out


def _latency(rounds: int, work_dir: Path) -> dict[str, Any]:
    import yaml

    from pqfed.services.runner import run_local

    res: dict[str, Any] = {}
    for name, extra in (("flat", {}),
                        ("2 edges", {"hierarchy": {"enabled": True, "edges": 2}})):
        job_name = "hier" if extra else "flat"
        job = {"apiVersion": API_GROUP_VERSION, "kind": KIND,
               "metadata": {"name": job_name},
               "spec": {"task": "breast-cancer", "clients": 4, "minClients": 4,
                        "rounds": rounds, "training": {"localEpochs": 2},
                        "compression": {"method": "topk+int8"}, **extra}}
        path = work_dir / f"{job_name}.yaml"
        path.write_text(yaml.safe_dump(job))
        r = run_local(path, work_dir / "runs", show=False)
        later = r["status"]["rounds"][1:]  # round 1 includes start-up and handshakes
        res[name] = {"mean_round_s": statistics.fmean(x["durationSeconds"] for x in later),
                     "accuracy": r["status"]["accuracy"],
                     "handshakes": r["sidecars"].get("handshakes", 0)}
    return res


def report_lines(h: dict[str, Any]) -> list[str]:
    lines = [f"### Hierarchical vs flat, HAPT natural split ({h['clients']} clients, "
             f"{h['edges']} edge aggregators, {h['rounds']} rounds, top-k 10% + int8 both "
             "ways)", "",
             "| run | final acc | best acc | updates into the centre per round "
             "| KiB into the centre per round | KiB out of the centre per round |",
             "|---|---|---|---|---|---|"]
    for name, r in h["runs"].items():
        lines.append(f"| {name} | {r['final']:.4f} | {r['best']:.4f} | "
                     f"{r['central_updates_per_round']:.0f} | "
                     f"{r['central_in_per_round'] / 1024:.1f} | "
                     f"{r['central_out_per_round'] / 1024:.1f} |")
    lat = h.get("latency") or {}
    if lat:
        lines += ["", "Round latency as processes (breast-cancer, 4 clients, PQC sidecars on "
                      "every hop, mean of rounds 2+): " + ", ".join(
                          f"{k} {v['mean_round_s']:.2f} s" for k, v in lat.items()) + "."]
    lines.append("")
    return lines
