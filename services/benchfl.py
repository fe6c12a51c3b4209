"""`make bench-fl`: accuracy, communication, privacy, robustness and transport benchmarks.

Study runs (accuracy vs centralized, compression, DP, poisoning, membership inference:
services/mia.py) use the
in-process federation (services/simulation.py: real strategies, real ClientApp, real
signatures; no transport). Transport runs (PQC sidecars vs plaintext; Flower's stock polling
vs ours) run whole federations as processes with `pqfed run`. Each comparison is made
within one invocation. Results: JSON, Markdown and PNGs under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pqfed.services.node_defaults import FLEET_PATH_PREFIX
from pqfed.services.spec import API_GROUP_VERSION, KIND, parse_spec


def _quiet() -> None:
    for name in ("flwr", "flower"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _sim(spec: dict[str, Any], attackers: frozenset[int] = frozenset(),
         attack: str = "label-flip") -> dict[str, Any]:
    from pqfed.services.simulation import simulate

    _quiet()
    return simulate(parse_spec(spec), attackers=attackers, attack=attack)


def centralized(task: str, epochs: int) -> float:
    from pqfed.services.centralized import train_centralized

    res = train_centralized(task, epochs=epochs, seed=0)
    return float(res["final_test_accuracy"])


def study_hapt(rounds: int) -> dict[str, Any]:
    """FedAvg fp32 vs top-k+int8 on HAPT's natural per-subject split, vs centralized."""
    base = {"task": "hapt", "clients": 6, "minClients": 6, "rounds": rounds,
            "dataset": {"partition": "natural"},
            "training": {"localEpochs": 1, "batchSize": 64, "learningRate": 0.001}}
    central = centralized("hapt", 15)
    out: dict[str, Any] = {"centralized_accuracy": central, "runs": {}}
    for name, comp in (("fedavg-fp32", {"method": "none"}),
                       ("topk10-int8-uplink-only", {"method": "topk+int8", "topkFraction": 0.1,
                                                    "downlink": False}),
                       ("topk10-int8", {"method": "topk+int8", "topkFraction": 0.1})):
        st = _sim({**base, "compression": comp})
        acc = [r["accuracy"] for r in st["rounds"]]
        up = np.cumsum([r["bytesReceived"] for r in st["rounds"]])
        down = np.cumsum([r["bytesSent"] for r in st["rounds"]])
        target = 0.9 * central
        hit = next((i for i, a in enumerate(acc) if a >= target), None)
        out["runs"][name] = {
            "accuracy": acc, "final": acc[-1], "best": max(acc),
            "uplink_bytes": up.tolist(), "downlink_bytes": down.tolist(),
            "round_to_90pct": None if hit is None else hit + 1,
            "uplink_bytes_to_90pct": None if hit is None else int(up[hit]),
            "total_bytes_to_90pct": None if hit is None else int(up[hit] + down[hit]),
            "seconds": st["wallSeconds"],
        }
    fp, cq = out["runs"]["fedavg-fp32"], out["runs"]["topk10-int8"]
    out["final_vs_centralized"] = fp["final"] / central
    out["best_vs_centralized"] = fp["best"] / central
    if fp["uplink_bytes_to_90pct"] and cq["uplink_bytes_to_90pct"]:
        out["uplink_reduction_to_90pct"] = 1 - cq["uplink_bytes_to_90pct"] / fp[
            "uplink_bytes_to_90pct"]
        out["total_reduction_to_90pct"] = 1 - cq["total_bytes_to_90pct"] / fp[
            "total_bytes_to_90pct"]
    return out


def study_privacy(rounds: int) -> dict[str, Any]:
    """Central DP (Flower's server-side fixed clipping, RDP accounting) at epsilon 1, 2, 8
    (utility only; what DP does against membership inference: study "mia")."""
    from pqfed.services.mia import noise_multiplier_for

    clients = 20
    base: dict[str, Any] = {"task": "breast-cancer", "clients": clients, "minClients": clients,
                            "rounds": rounds,
                            "training": {"localEpochs": 5, "batchSize": 16,
                                         "learningRate": 0.005}}
    out: dict[str, Any] = {"clients": clients, "rounds": rounds, "runs": {}}
    st = _sim(base)
    out["runs"]["no-dp"] = {"accuracy": st["rounds"][-1]["accuracy"], "epsilon": None}
    for eps in (1.0, 2.0, 8.0):
        spec = parse_spec({**base, "privacy": {"enabled": True, "clippingNorm": 1.0,
                                               "targetEpsilon": eps}})
        z = noise_multiplier_for(spec, eps)
        st = _sim({**base, "privacy": {"enabled": True, "clippingNorm": 1.0,
                                       "noiseMultiplier": z, "targetEpsilon": eps}})
        out["runs"][f"eps-{eps:g}"] = {
            "accuracy": st["rounds"][-1]["accuracy"] if st["rounds"] else None,
            "rounds_run": len(st["rounds"]), "noise_multiplier": z,
            "epsilon": st.get("epsilonSpent")}
    return out


def study_poisoning(rounds: int) -> dict[str, Any]:
    """20% label-flipping clients: FedAvg vs Flower's robust strategies."""
    clients, bad = 10, frozenset({0, 1})
    base: dict[str, Any] = {"task": "breast-cancer", "clients": clients, "minClients": clients,
                            "rounds": rounds, "training": {"localEpochs": 3}}
    out: dict[str, Any] = {"clients": clients, "attackers": sorted(bad), "runs": {}}
    out["runs"]["FedAvg (no attack)"] = _sim(base)["rounds"][-1]["accuracy"]
    for attack in ("label-flip", "label-flip-boost"):
        for name, strat in (("FedAvg", {"name": "FedAvg"}),
                            ("FedTrimmedAvg", {"name": "FedTrimmedAvg", "trimFraction": 0.2}),
                            ("Krum", {"name": "Krum", "byzantineClients": 2}),
                            ("MultiKrum", {"name": "MultiKrum", "byzantineClients": 2})):
            st = _sim({**base, "strategy": strat}, attackers=bad, attack=attack)
            out["runs"][f"{name} vs {attack}"] = st["rounds"][-1]["accuracy"]
    return out


# A keep-alive HTTP/1.1 upstream that answers every request with a fixed 64-byte body (the
# size class of Flower's Fleet replies); stdlib only, run as its own process.
_PING_UPSTREAM = r"""
import asyncio, sys
BODY = b"x" * 64
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
async def serve(r, w):
    while True:
        head = await r.readuntil(b"\r\n\r\n")
        n = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":", 1)[1])
        if n:
            await r.readexactly(n)
        w.write(RESP)
        await w.drain()
async def main():
    srv = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    await srv.serve_forever()
asyncio.run(main())
"""


def sidecar_ping_pong(requests: int = 400, blocks: int = 8) -> dict[str, Any]:
    """Per-request latency of one keep-alive HTTP/1.1 POST (a Fleet pull-object sized
    request) straight to a loopback upstream vs through a client + aggregator sidecar pair
    (ML-KEM channel, path allow-list), as separate processes like `pqfed run`. Blocks of
    both paths alternate so host noise hits both alike."""
    import subprocess
    import sys
    import urllib.request

    import httpx

    from pqfed.pqc import CertificateAuthority, Role
    from pqfed.services.ports import free_ports
    from pqfed.services.procs import terminate_process_tree

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        ca = CertificateAuthority.generate("ping")
        paths: dict[str, tuple[Path, Path]] = {}
        for name, role in (("aggregator", Role.AGGREGATOR), ("client-0", Role.CLIENT)):
            ident = ca.new_identity(name, role)
            paths[name] = (tmp / f"{name}.crt", tmp / f"{name}.key")
            ident.save(*paths[name])
        (tmp / "ca.crt").write_text(ca.root.to_pem())
        upstream, secure, route, admin_a, admin_c = free_ports(5)
        cli = [sys.executable, "-m", "pqfed.cli", "sidecar", "--ca", str(tmp / "ca.crt"),
               "--log-level", "warning"]
        argvs = [
            [sys.executable, "-c", _PING_UPSTREAM, str(upstream)],
            [*cli, "--cert", str(paths["aggregator"][0]), "--key", str(paths["aggregator"][1]),
             "--listen", f"127.0.0.1:{secure}", "--upstream", f"127.0.0.1:{upstream}",
             "--allow-path-prefix", FLEET_PATH_PREFIX, "--admin", f"127.0.0.1:{admin_a}"],
            [*cli, "--cert", str(paths["client-0"][0]), "--key", str(paths["client-0"][1]),
             "--route", f"127.0.0.1:{route}=127.0.0.1:{secure}@aggregator",
             "--admin", f"127.0.0.1:{admin_c}"],
        ]
        procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True) for a in argvs]
        try:
            deadline = time.monotonic() + 60
            for port in (admin_a, admin_c):
                while True:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz",
                                                    timeout=1):
                            break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise TimeoutError("sidecars not ready after 60 s") from None
                        time.sleep(0.1)
            body = b"\x00" * 89  # a Fleet PullObjectRequest is ~89 bytes
            lat: dict[str, list[float]] = {"direct": [], "sidecars": []}
            clients = {"direct": httpx.Client(base_url=f"http://127.0.0.1:{upstream}"),
                       "sidecars": httpx.Client(base_url=f"http://127.0.0.1:{route}")}
            for client in clients.values():  # connect (and handshake) before timing
                client.post("/v1/fleet/pull-object", content=body).raise_for_status()
            per_block = max(1, requests // blocks)
            for _ in range(blocks):
                for name, client in clients.items():
                    for _ in range(per_block):
                        t0 = time.perf_counter()
                        client.post("/v1/fleet/pull-object", content=body).raise_for_status()
                        lat[name].append(time.perf_counter() - t0)
            for client in clients.values():
                client.close()
        finally:
            for proc in procs:
                terminate_process_tree(proc.pid, timeout=5)

    def pct(xs: list[float], q: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3

    out: dict[str, Any] = {"requests": per_block * blocks}
    for name, xs in lat.items():
        out[name] = {"p50_ms": pct(xs, 0.5), "p90_ms": pct(xs, 0.9),
                     "mean_ms": statistics.fmean(xs) * 1e3}
    out["added_p50_ms"] = out["sidecars"]["p50_ms"] - out["direct"]["p50_ms"]
    return out


def study_transport(rounds: int, out_dir: Path, reps: int = 2) -> dict[str, Any]:
    """Whole federations as processes: PQC sidecars vs plaintext, and stock Flower polling."""
    from pqfed.services.runner import run_local

    job = {"apiVersion": API_GROUP_VERSION, "kind": KIND,
           "metadata": {"name": "transport"},
           "spec": {"task": "breast-cancer", "clients": 3, "minClients": 3, "rounds": rounds,
                    "training": {"localEpochs": 2}}}
    import yaml

    path = out_dir / "transport-job.yaml"
    path.write_text(yaml.safe_dump(job))
    # PQC and plaintext alternate (`reps` runs each) so drift in host load hits both; the
    # baselines: the SuperLink's SQLite state file, and stock Flower polling.
    variants: tuple[tuple[str, bool, dict[str, str]], ...] = (
        *((("pqc", True, {}), ("plaintext", False, {})) * reps),
        ("pqc-superlink-sqlite", True, {"PQFED_SUPERLINK_DB": "1"}),
        ("pqc-stock-flower", True, {"PQFED_FLOWER_STOCK": "1"}))
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, pqc, env in variants:
        os.environ.update(env)
        try:
            r = run_local(path, out_dir / "runs", pqc=pqc, show=False)
        finally:
            for key in env:
                os.environ.pop(key, None)
        runs.setdefault(name, []).append(r)
    res: dict[str, Any] = {}
    for name, rs in runs.items():
        rounds_ = [x for r in rs for x in r["status"]["rounds"][1:]]  # round 1: start-up
        res[name] = {
            "round_seconds": [x["durationSeconds"] for x in rounds_],
            "mean_round_s": statistics.fmean(x["durationSeconds"] for x in rounds_),
            "median_round_s": statistics.median(x["durationSeconds"] for x in rounds_),
            "mean_overhead_s": statistics.fmean(x["durationSeconds"] - x["computeSeconds"]
                                                for x in rounds_),
            "handshakes": statistics.fmean(r["sidecars"].get("handshakes", 0) for r in rs),
            "handshake_ms": statistics.fmean(r["sidecars"].get("handshake_seconds", 0)
                                             for r in rs) * 1e3,
        }
    res["pqc_overhead"] = res["pqc"]["mean_round_s"] / res["plaintext"]["mean_round_s"] - 1
    res["pqc_overhead_median"] = (res["pqc"]["median_round_s"]
                                  / res["plaintext"]["median_round_s"] - 1)
    res["sidecar_request"] = sidecar_ping_pong()
    res["flower_speedup"] = (res["pqc-stock-flower"]["mean_round_s"]
                             / res["pqc"]["mean_round_s"])
    return res


def _report(r: dict[str, Any]) -> str:
    lines: list[str] = []
    if "hapt" in r:
        h = r["hapt"]
        fp, cq = h["runs"]["fedavg-fp32"], h["runs"]["topk10-int8"]
        lines += ["### HAPT, natural per-subject split (6 clients x 5 subjects), 1D-CNN", "",
                  "| run | final acc | best acc | rounds to 90% of centralized "
                  "| uplink MB to 90% | total MB to 90% |",
                  "|---|---|---|---|---|---|",
                  f"| centralized (15 epochs) | {h['centralized_accuracy']:.4f} | | | | |"]
        for name, run in (("FedAvg fp32", fp),
                          ("top-k 10% + int8, uplink only", h["runs"].get(
                              "topk10-int8-uplink-only")),
                          ("top-k 10% + int8, both ways", cq)):
            if run is None:
                continue
            up = run["uplink_bytes_to_90pct"]
            tot = run["total_bytes_to_90pct"]
            lines.append(f"| {name} | {run['final']:.4f} | {run['best']:.4f} | "
                         f"{run['round_to_90pct']} | {up / 1e6 if up else float('nan'):.2f} | "
                         f"{tot / 1e6 if tot else float('nan'):.2f} |")
        lines += ["", f"FedAvg final / centralized: **{h['final_vs_centralized'] * 100:.1f}%** "
                      f"(best round {h['best_vs_centralized'] * 100:.1f}%)."]
        if "uplink_reduction_to_90pct" in h:
            lines.append(f"Bytes to 90% of centralized, compression (both ways) vs fp32: uplink "
                         f"-{h['uplink_reduction_to_90pct'] * 100:.1f}%, uplink+downlink "
                         f"**-{h['total_reduction_to_90pct'] * 100:.1f}%**.")
        lines.append("")
    if "privacy" in r:
        p = r["privacy"]
        lines += [f"### Central DP, breast-cancer, {p['clients']} hospitals, {p['rounds']} rounds",
                  "", "| run | accuracy | epsilon spent (delta 1e-5) | noise multiplier |",
                  "|---|---|---|---|"]
        for name, run in p["runs"].items():
            eps = run.get("epsilon")
            lines.append(f"| {name} | {run['accuracy']:.4f} | "
                         f"{'-' if eps is None else f'{eps:.2f}'} | "
                         f"{run.get('noise_multiplier', 0):.2f} |")
        lines.append("")
    if "mia" in r:
        from pqfed.services.mia import report_lines as mia_lines

        lines += mia_lines(r["mia"])
    if "poisoning" in r:
        q = r["poisoning"]
        lines += [f"### 20% label-flipping clients ({len(q['attackers'])} of {q['clients']}), "
                  "breast-cancer", "", "| strategy | final accuracy |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in q["runs"].items()]
        lines.append("")
    if "hierarchy" in r:
        from pqfed.services.benchhier import report_lines

        lines += report_lines(r["hierarchy"])
    if "transport" in r:
        t = r["transport"]
        lines += ["### Round latency, whole federation as processes (3 clients, breast-cancer)",
                  "", "| variant | rounds | mean round s | median round s "
                  "| mean overhead beyond compute s | handshakes per run |",
                  "|---|---|---|---|---|---|"]
        for name in ("pqc", "plaintext", "pqc-superlink-sqlite", "pqc-stock-flower"):
            v = t.get(name)
            if v is None:
                continue
            lines.append(f"| {name} | {len(v['round_seconds'])} | {v['mean_round_s']:.3f} | "
                         f"{v.get('median_round_s', float('nan')):.3f} | "
                         f"{v['mean_overhead_s']:.3f} | {v['handshakes']:.0f} |")
        lines += ["", f"PQC channel overhead per round: **{t['pqc_overhead'] * 100:+.1f}%** "
                      f"(medians {t.get('pqc_overhead_median', float('nan')) * 100:+.1f}%); "
                      f"our Flower runtime vs stock Flower: **{t['flower_speedup']:.1f}x** faster "
                      "rounds.", ""]
        if "sidecar_request" in t:
            sr = t["sidecar_request"]
            lines += [f"One keep-alive HTTP/1.1 request ({sr['requests']} per path, alternating "
                      "blocks): direct "
                      f"{sr['direct']['p50_ms']:.2f} ms p50 / {sr['direct']['p90_ms']:.2f} ms p90, "
                      f"through a client + aggregator sidecar pair "
                      f"{sr['sidecars']['p50_ms']:.2f} ms p50 / "
                      f"{sr['sidecars']['p90_ms']:.2f} ms p90 "
                      f"(**{sr['added_p50_ms']:+.2f} ms** per request at p50).", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = bool(args.quick)
    studies = args.only.split(",") if args.only else ["hapt", "privacy", "mia", "poisoning",
                                                       "hierarchy", "transport"]
    results: dict[str, Any] = {"quick": quick}
    t0 = time.time()
    from rich.progress import Progress

    with Progress() as progress, tempfile.TemporaryDirectory() as tmp:
        task = progress.add_task("bench-fl", total=len(studies))
        for s in studies:
            progress.update(task, description=f"bench-fl: {s}")
            if s == "hapt":
                results[s] = study_hapt(4 if quick else 30)
            elif s == "privacy":
                results[s] = study_privacy(3 if quick else 10)
            elif s == "mia":
                from pqfed.services.mia import MiaConfig, parse_modes, quick_config, study

                def partial(res: dict[str, Any]) -> None:
                    (out / "mia-partial.json").write_text(json.dumps(res, indent=1,
                                                                     default=str))

                cfg = quick_config() if quick else MiaConfig()
                modes = parse_modes(str(getattr(args, "mia_dp", "central")))
                results[s] = study(dataclasses.replace(cfg, modes=modes), partial)
            elif s == "poisoning":
                results[s] = study_poisoning(3 if quick else 10)
            elif s == "hierarchy":
                from pqfed.services.benchhier import study_hierarchy

                results[s] = study_hierarchy(4 if quick else 15, 3 if quick else 5, Path(tmp))
            elif s == "transport":
                results[s] = study_transport(3 if quick else 12, Path(tmp),
                                             reps=2 if quick else 3)
            progress.advance(task)
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    results["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report = _report(results)
    (out / "report.md").write_text(report)
    print(report)
    return 0
