"""results.json -> results.csv, report.md and PNG plots (comparable across runs: every
file carries the run id, mode, host facts, versions and node presets)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from pqfed.testbed.bench.common import effective_cores, median

SEED_CLAIM = 0.35  # seed 004: distributed crypto cuts latency ~35% vs sequential (3 Pi 4s)
SHOWN_PRESETS = ("cpus", "arch", "instance_type", "testbed", "cpu_limit_cores", "network")
OPS = ("ML-KEM-768 keygen", "ML-KEM-768 encaps", "ML-KEM-768 decaps", "ML-DSA-65 keygen",
       "ML-DSA-65 sign", "ML-DSA-65 verify")


# --- the seed-004 summary ---------------------------------------------------------------------

def seed_summary(aggregator: dict[str, Any], nodes: dict[str, Any], node_cores: float,
                 notes: list[str]) -> dict[str, Any]:
    """Median latencies of the three designs per client count, reductions vs sequential,
    the ideal bounds and how they compare with the seed's ~35%."""
    base = aggregator.get("seed") or {}
    dist = (aggregator.get("distributed") or {}).get("seconds", {})
    k = len(nodes)
    workers = int(base.get("workers") or 1)
    out: dict[str, Any] = {"claim_reduction": SEED_CLAIM, "nodes": k, "workers": workers,
                           "node_cores": node_cores,
                           "aggregator_cores": effective_cores(aggregator.get("host") or {}),
                           "clients": {}}
    for n_str, seq_list in (base.get("sequential") or {}).items():
        n = int(n_str)
        seq = median(seq_list)
        par = median(base["parallel"][n_str])
        d = median(dist.get(n_str, []))
        # Ideal: no overhead; the nodes can only run as many shares at once as they have cores.
        lanes = max(1, min(k, math.floor(node_cores + 1e-9))) if k else 1
        share_max = math.ceil(n / lanes)
        row: dict[str, Any] = {
            "sequential_s": seq, "parallel_s": par, "distributed_s": d,
            "reduction_parallel": 1 - par / seq, "reduction_distributed": 1 - d / seq,
            "speedup_parallel": seq / par, "speedup_distributed": seq / d,
            "ideal_reduction_parallel": 1 - math.ceil(n / workers) / n,
            "ideal_reduction_distributed": 1 - share_max / n,
            "node_shares": {name: (r.get("seed") or {}).get("share", {}).get(n_str)
                            for name, r in nodes.items()},
        }
        for key in ("reduction_parallel", "reduction_distributed"):
            if math.isnan(row[key]):
                row[key] = None
        out["clients"][n_str] = row
    rows = [r for r in out["clients"].values() if r["reduction_distributed"] is not None]
    if rows:
        best = max(rows, key=lambda r: r["reduction_distributed"])
        out["best_reduction_distributed"] = best["reduction_distributed"]
        out["mean_reduction_distributed"] = sum(r["reduction_distributed"] for r in rows) / len(
            rows)
    prow = [r for r in out["clients"].values() if r["reduction_parallel"] is not None]
    if prow:
        out["mean_reduction_parallel"] = sum(r["reduction_parallel"] for r in prow) / len(prow)
    if node_cores <= 1.0:
        notes.append("The nodes together have only 1 CPU core: distribution across nodes "
                     "cannot speed up on 1 core (the 'distributed' numbers measure "
                     "coordination overhead, not a speed-up).")
    if out["aggregator_cores"] <= 1.0:
        notes.append(f"The aggregator has {out['aggregator_cores']:g} effective CPU core(s) "
                     f"(pool of {workers} processes): its process pool cannot beat "
                     "sequential.")
    return out


# --- CSV -----------------------------------------------------------------------------------------

CSV_FIELDS = ("run_id", "mode", "node", "category", "metric", "stat", "value", "unit")


def csv_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(node: str, category: str, metric: str, stat: str, value: Any, unit: str) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        rows.append({"run_id": r["run_id"], "mode": r["mode"], "node": node,
                     "category": category, "metric": metric, "stat": stat,
                     "value": value if isinstance(value, str) else round(float(value), 6),
                     "unit": unit})

    lat = ("mean_us", "p50_us", "p90_us", "p99_us", "max_us")
    for name, n in r.get("nodes", {}).items():
        for backend, ops in (n.get("primitives") or {}).items():
            for op, s in ops.items():
                for stat in lat:
                    add(name, "primitive", f"{backend}/{op}", stat[:-3], s.get(stat), "us")
        for backend, why in (n.get("backends") or {}).items():
            if why != "ok":
                add(name, "backend", backend, "unavailable", why, "")
        for aead, v in (n.get("aead") or {}).items():
            add(name, "aead", aead, "throughput", v["MBps"], "MB/s")
        hs = n.get("handshake") or {}
        for kind in ("pq", "classical"):
            if kind in hs:
                for stat in lat:
                    add(name, "handshake", kind, stat[:-3], hs[kind].get(stat), "us")
                add(name, "handshake", kind, "bytes",
                    hs[kind]["bytes_sent"] + hs[kind]["bytes_received"], "B")
        if "ratio_mean" in hs:
            add(name, "handshake", "pq/classical", "ratio_mean", hs["ratio_mean"], "x")
        t = n.get("throughput") or {}
        if t:
            add(name, "throughput", "plaintext", "throughput", t["plaintext_Bps"] / 1e6, "MB/s")
            add(name, "throughput", "sidecar", "throughput", t["secure_Bps"] / 1e6, "MB/s")
            add(name, "throughput", "sidecar/plaintext", "ratio", t["ratio"], "x")
            sc = t.get("sidecar") or {}
            add(name, "sidecar", "cpu", "percent_of_core", sc.get("cpu_percent"), "%")
            add(name, "sidecar", "rss", "peak", sc.get("rss_mib_peak"), "MiB")
            add(name, "sidecar", "rss", "idle", sc.get("rss_mib_idle"), "MiB")
        for n_str, secs in ((n.get("seed") or {}).get("seconds") or {}).items():
            add(name, "seed-share", f"{n_str} clients", "median", median(secs), "s")
    for n_str, row in (r.get("seed") or {}).get("clients", {}).items():
        for stat in ("sequential_s", "parallel_s", "distributed_s"):
            add("aggregator", "seed", f"{n_str} clients", stat[:-2], row[stat], "s")
        for stat in ("reduction_parallel", "reduction_distributed"):
            add("aggregator", "seed", f"{n_str} clients", stat, row[stat], "fraction")
    sc = (r.get("aggregator") or {}).get("sidecar") or {}
    add("aggregator", "sidecar", "rss", "peak", sc.get("rss_mib_peak"), "MiB")
    add("aggregator", "sidecar", "cpu", "seconds", sc.get("cpu_seconds"), "s")
    for rd in (r.get("federation") or {}).get("rounds", []):
        for key in ("durationSeconds", "computeSeconds", "cryptoSeconds", "dispatchSeconds",
                    "returnSeconds", "serverSeconds"):
            add("federation", "round", f"round {rd['round']}", key, rd.get(key), "s")
    return rows


def write_csv(r: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(csv_rows(r))


# --- plots ---------------------------------------------------------------------------------------

def _cdf(ax: Any, values_us: list[float], label: str, scale: float, **kw: Any) -> None:
    n = len(values_us)
    if n:
        ax.plot([v / scale for v in values_us], [(i + 1) / n for i in range(n)], label=label,
                **kw)


def plot(r: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    files: list[str] = []
    nodes = r.get("nodes", {})
    subtitle = f"{r['mode']} mode, run {r['run_id']}"
    # 1. latency CDFs: sign, verify, handshake
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, n in nodes.items():
        for backend, ops in (n.get("primitives") or {}).items():
            label = name if len(n["primitives"]) == 1 else f"{name} ({backend})"
            _cdf(axes[0], ops["ML-DSA-65 sign"].get("cdf_us", []), label, 1)
            _cdf(axes[1], ops["ML-DSA-65 verify"].get("cdf_us", []), label, 1)
        hs = n.get("handshake") or {}
        if hs:
            line = axes[2].plot([], [])[0]
            _cdf(axes[2], hs["pq"]["cdf_us"], f"{name} PQ hybrid", 1e3, color=line.get_color())
            _cdf(axes[2], hs["classical"]["cdf_us"], f"{name} classical", 1e3,
                 color=line.get_color(), linestyle="--")
    for ax, title, unit in ((axes[0], "ML-DSA-65 sign", "µs"),
                            (axes[1], "ML-DSA-65 verify", "µs"),
                            (axes[2], "handshake node→aggregator", "ms")):
        ax.set_title(title)
        ax.set_xlabel(f"latency ({unit})")
        ax.set_ylabel("CDF")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"Latency CDFs — {subtitle}")
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)
    files.append("latency_cdf.png")
    # 2. seed-004: latency and speed-up vs clients
    seed = (r.get("seed") or {}).get("clients") or {}
    if seed:
        xs = sorted(int(n) for n in seed)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for key, label in (("sequential_s", "sequential (aggregator)"),
                           ("parallel_s", f"parallel (process pool, {r['seed']['workers']} "
                                          "workers)"),
                           ("distributed_s", f"distributed ({r['seed']['nodes']} nodes)")):
            a1.plot(xs, [seed[str(x)][key] * 1e3 for x in xs], marker="o", label=label)
        a1.set_xlabel("clients per round")
        a1.set_ylabel("per-round crypto latency (ms)")
        a1.set_title("Handshake + signed-update verification per client")
        a1.legend(fontsize=8)
        a1.grid(alpha=0.3)
        for key, label in (("speedup_parallel", "parallel"),
                           ("speedup_distributed", "distributed")):
            a2.plot(xs, [seed[str(x)][key] for x in xs], marker="o", label=label)
        a2.axhline(1 / (1 - SEED_CLAIM), color="gray", linestyle="--",
                   label=f"seed claim (-{SEED_CLAIM:.0%}, i.e. {1 / (1 - SEED_CLAIM):.2f}x)")
        a2.axhline(1, color="black", linewidth=0.8)
        a2.set_xlabel("clients per round")
        a2.set_ylabel("speed-up vs sequential")
        a2.set_title("Speed-up vs clients")
        a2.legend(fontsize=8)
        a2.grid(alpha=0.3)
        fig.suptitle(f"Seed-004 experiment — {subtitle}")
        fig.tight_layout()
        fig.savefig(out / "seed_speedup.png", dpi=110)
        plt.close(fig)
        files.append("seed_speedup.png")
    # 3. round breakdown (stacked) + crypto alongside
    rounds = (r.get("federation") or {}).get("rounds") or []
    if rounds:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [rd["round"] for rd in rounds]
        parts = ("dispatchSeconds", "computeSeconds", "returnSeconds", "serverSeconds")
        bottom = [0.0] * len(rounds)
        for key in parts:
            vals = [float(rd.get(key) or 0) for rd in rounds]
            ax.bar([x - 0.18 for x in xs], vals, 0.34, bottom=bottom,
                   label=key.replace("Seconds", ""))
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        other = [max(0.0, float(rd.get("durationSeconds") or 0) - b)
                 for rd, b in zip(rounds, bottom, strict=True)]
        ax.bar([x - 0.18 for x in xs], other, 0.34, bottom=bottom, label="other", color="0.8")
        ax.bar([x + 0.18 for x in xs], [float(rd.get("cryptoSeconds") or 0) for rd in rounds],
               0.34, label="crypto (sign + verify, overlaps)", hatch="//", color="white",
               edgecolor="black")
        ax.set_xticks(xs)
        ax.set_xlabel("round")
        ax.set_ylabel("seconds")
        ax.set_title(f"Federation round breakdown — {subtitle}")
        ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        fig.savefig(out / "round_breakdown.png", dpi=110)
        plt.close(fig)
        files.append("round_breakdown.png")
    return files


# --- report.md -----------------------------------------------------------------------------------

def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1e3:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def markdown(r: dict[str, Any]) -> str:
    d = r["driver"]
    lines = [
        f"# pqfed testbed benchmark — {r['mode']} mode{' (quick)' if r['quick'] else ''}",
        "",
        f"Run `{r['run_id']}`, {r['started']}, {r['duration_s']:.0f} s. "
        f"Command: `{' '.join(r['command'])}`",
        "",
        f"Driver host: {d['hostname']} ({d['machine']}, {d['cpu_model']}, "
        f"{d['usable_cpus']}/{d['logical_cpus']} CPUs usable, AES instructions: "
        f"{'yes' if d['aes_instructions'] else 'no'}); Python {d['versions'].get('python')}, "
        f"pqfed {d['versions'].get('pqfed')}, cryptography {d['versions'].get('cryptography')}"
        f" ({d['versions'].get('openssl', '?')}); commit {r.get('git', '?')}.",
        "",
        "| node | machine / CPU | CPUs (affinity) | CPU quota | preset | preferred AEAD |",
        "|---|---|---|---|---|---|",
    ]
    for name, n in r["nodes"].items():
        h = n["host"]
        preset = r.get("presets", {}).get(name, {})
        preset_text = ", ".join(f"{k}={v}" for k, v in preset.items()
                                if k in SHOWN_PRESETS and v is not None) or "-"
        quota = h.get("cpu_quota_cores")
        lines.append(f"| {name} | {h['machine']} / {h['cpu_model']} | {h['usable_cpus']} "
                     f"({','.join(map(str, h['affinity']))}) | "
                     f"{'-' if quota is None else f'{quota:g} cores'} | {preset_text} | "
                     f"{h['preferred_aead']} |")
    a = r["aggregator"]
    lines.append(f"| aggregator ({a.get('node')}) | {a['host']['machine']} | "
                 f"{a['host']['usable_cpus']} | {a['host'].get('cpu_quota_cores') or '-'} | | "
                 f"{a['host']['preferred_aead']} |")
    notes = list(r.get("notes", []))
    # primitives
    lines += ["", "## PQC primitives per node (µs)", "",
              "| node | backend | operation | mean | p50 | p99 | max |",
              "|---|---|---|---|---|---|---|"]
    unavailable: set[str] = set()
    for name, n in r["nodes"].items():
        for backend, why in (n.get("backends") or {}).items():
            if why != "ok":
                unavailable.add(f"{backend} unavailable: {why}")
        for backend, ops in (n.get("primitives") or {}).items():
            for op in OPS:
                s = ops.get(op)
                if s:
                    lines.append(f"| {name} | {backend} | {op} | {s['mean_us']:.1f} | "
                                 f"{s['p50_us']:.1f} | {s['p99_us']:.1f} | {s['max_us']:.1f} |")
    lines += ["", *[f"- {u}" for u in sorted(unavailable)]]
    if any(n.get("aead") for n in r["nodes"].values()):
        lines += ["", "AEAD (one-shot, 64 KiB records, MB/s):", "",
                  "| node | AES-256-GCM | ChaCha20-Poly1305 | AES instructions |",
                  "|---|---|---|---|"]
        for name, n in r["nodes"].items():
            ae = n.get("aead") or {}
            if ae:
                lines.append(f"| {name} | {ae['AES-256-GCM']['MBps']:.0f} | "
                             f"{ae['CHACHA20-POLY1305']['MBps']:.0f} | "
                             f"{'yes' if n['host']['aes_instructions'] else 'no'} |")
    # handshakes
    hs_rows = [(name, n["handshake"]) for name, n in r["nodes"].items() if n.get("handshake")]
    if hs_rows:
        lines += ["", "## Handshake node → aggregator over the network (ms)", "",
                  "| node | PQ mean | PQ p50 | PQ p99 | classical mean | classical p50 | "
                  "classical p99 | PQ/classical (mean) | PQ bytes | classical bytes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, hs in hs_rows:
            pq, cl = hs["pq"], hs["classical"]
            lines.append(
                f"| {name} | {_ms(pq['mean_us'])} | {_ms(pq['p50_us'])} | {_ms(pq['p99_us'])} "
                f"| {_ms(cl['mean_us'])} | {_ms(cl['p50_us'])} | {_ms(cl['p99_us'])} | "
                f"{hs['ratio_mean']:.2f}x | {pq['bytes_sent'] + pq['bytes_received']} | "
                f"{cl['bytes_sent'] + cl['bytes_received']} |")
        lines.append(f"\nRecord suite negotiated: {hs_rows[0][1].get('suite')}.")
    # throughput
    tp = [(name, n["throughput"]) for name, n in r["nodes"].items() if n.get("throughput")]
    if tp:
        lines += ["", "## Channel throughput node → aggregator", "",
                  "| node | transfers x MiB (plain / sidecar) | plaintext MB/s | "
                  "through sidecars MB/s | ratio | client sidecar CPU (% of a core) | "
                  "RSS idle / peak MiB | wire overhead |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, t in tp:
            sc = t["sidecar"]
            ov = t.get("wire_overhead")
            lines.append(
                f"| {name} | {t.get('plaintext_transfers', 1)} / {t.get('secure_transfers', 1)} "
                f"x {t['bytes'] / 2**20:g} | {t['plaintext_Bps'] / 1e6:.1f} | "
                f"{t['secure_Bps'] / 1e6:.1f} | {t['ratio'] * 100:.0f}% | "
                f"{sc['cpu_percent']:.0f}% | {sc['rss_mib_idle']:.0f} / "
                f"{sc['rss_mib_peak']:.0f} | {'-' if ov is None else f'{ov * 100:.1f}%'} |")
        asc = a.get("sidecar") or {}
        if asc:
            lines.append(f"\nAggregator sidecar over the whole run: peak RSS "
                         f"{asc.get('rss_mib_peak', 0):.0f} MiB, {asc.get('cpu_seconds', 0):.1f}"
                         " CPU-seconds. Plaintext = direct TCP to the aggregator's sink; "
                         "sidecars = app → local sidecar → network → aggregator sidecar → sink.")
    # seed
    seed = r.get("seed") or {}
    if seed.get("clients"):
        lines += ["", "## Seed-004: per-round crypto, sequential vs parallel vs distributed", "",
                  "Per client: a full hybrid handshake (ML-KEM-768 + X25519, ML-DSA-65 "
                  "certificates) and a signed 256 KiB update, signed and verified "
                  "(`pqfed.pqc.bench.peer_task`). Sequential and parallel run on the "
                  f"aggregator ({seed['aggregator_cores']:g} cores; pool of {seed['workers']} "
                  f"processes); distributed = each of the {seed['nodes']} nodes does its own "
                  "share at the same time, timed by the aggregator from barrier release to "
                  f"the last node's report ({seed['node_cores']:g} cores across the nodes). "
                  "Medians.", "",
                  "| clients | sequential ms | parallel ms | distributed ms | reduction parallel "
                  "| reduction distributed | ideal (parallel / distributed) |",
                  "|---|---|---|---|---|---|---|"]
        for n_str, row in sorted(seed["clients"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {n_str} | {row['sequential_s'] * 1e3:.1f} | {row['parallel_s'] * 1e3:.1f} "
                f"| {row['distributed_s'] * 1e3:.1f} | {_pct(row['reduction_parallel'])} | "
                f"{_pct(row['reduction_distributed'])} | "
                f"{_pct(row['ideal_reduction_parallel'])} / "
                f"{_pct(row['ideal_reduction_distributed'])} |")
        if "mean_reduction_distributed" in seed:
            diff = seed["mean_reduction_distributed"] - SEED_CLAIM
            lines.append(
                f"\nSeed claim: ~{SEED_CLAIM:.0%} lower latency than sequential on a 3-node "
                f"Pi 4 k3s cluster. Here: distributed {_pct(seed['mean_reduction_distributed'])}"
                f" on average over the client counts ({diff * 100:+.1f} points vs the claim), "
                f"parallel {_pct(seed.get('mean_reduction_parallel'))}.")
    # federation
    fed = r.get("federation") or {}
    lines += ["", "## Federation round breakdown (s)", ""]
    if fed.get("rounds"):
        lines += [f"{fed.get('job', '')}; wall {fed.get('wallSeconds', 0):.0f} s. Round 1 "
                  "includes start-up (model download to clients, first handshakes).", "",
                  "| round | duration | compute | dispatch | return | server | crypto | "
                  "crypto share |", "|---|---|---|---|---|---|---|---|"]
        for rd in fed["rounds"]:
            dur = float(rd.get("durationSeconds") or 0)
            cr = rd.get("cryptoSeconds")

            def f(key: str, rd: dict[str, Any] = rd) -> str:
                v = rd.get(key)
                return "-" if v is None else f"{v:.3f}"

            share = f"{cr / dur * 100:.1f}%" if cr is not None and dur else "-"
            lines.append(f"| {rd['round']} | {f('durationSeconds')} | {f('computeSeconds')} | "
                         f"{f('dispatchSeconds')} | {f('returnSeconds')} | "
                         f"{f('serverSeconds')} | {f('cryptoSeconds')} | {share} |")
        sc = fed.get("sidecars") or {}
        if sc.get("handshakes"):
            lines.append(f"\nSidecars: {int(sc['handshakes'])} handshakes, "
                         f"{sc['handshake_seconds'] * 1e3:.1f} ms in total.")
        lines.append("\ncryptoSeconds = update signing (clients) + verification (aggregator); "
                     "it overlaps compute/server time and excludes the sidecars' channels.")
    else:
        lines.append(f"Skipped: {fed.get('skipped', 'not run')}")
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    if r.get("plots"):
        lines += ["", "## Plots", "", *[f"![{p}]({p})" for p in r["plots"]]]
    return "\n".join(lines) + "\n"


def write_all(r: dict[str, Any], out: Path) -> None:
    r["plots"] = plot(r, out)
    (out / "results.json").write_text(json.dumps(r, indent=1))
    write_csv(r, out / "results.csv")
    (out / "report.md").write_text(markdown(r))
