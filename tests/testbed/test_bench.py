"""``pqfed bench``: the testbed benchmark.

Fast: one small ``--quick`` local run (2 node processes + an aggregator process, federation
skipped) checked for its result schema, CSV/report/plots and the seed-004 numbers; units for
the pieces (stats, log markers, placement, the seed summary, the report on synthetic data).
Slow: the local run with a real federation round. Slow + cluster: ``--mode cluster`` against
an emulated cluster of our own (private state dir, ports, bridge and /16; 2 node agents),
skipped when root, namespaces or the control-plane binaries are unavailable.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pqfed.cli import main
from pqfed.testbed.bench import SCHEMA
from pqfed.testbed.bench.common import (
    AggregatorPorts,
    emit_progress,
    emit_result,
    parse_log,
    shares,
    stats,
)
from pqfed.testbed.testing import cluster_env, free_subnet

REPO = Path(__file__).resolve().parents[2]
OPS = ("ML-KEM-768 keygen", "ML-KEM-768 encaps", "ML-KEM-768 decaps", "ML-DSA-65 keygen",
       "ML-DSA-65 sign", "ML-DSA-65 verify")
SMALL = ["--quick", "--clients", "3", "--repeats", "2", "--iterations", "20", "--handshakes",
         "5", "--throughput-mib", "1", "--throughput-seconds", "0.2"]


# -- the quick local run ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench-local")
    rc = main(["bench", "--out", str(out), "--nodes", "2", *SMALL, "--skip", "federation"])
    if rc != 0:
        pytest.fail("pqfed bench failed:\n" + "\n".join(
            p.read_text()[-2000:] for p in sorted((out / "logs").glob("*.log"))))
    return out, json.loads((out / "results.json").read_text())


def test_local_result_schema(local_run: tuple[Path, dict[str, Any]]) -> None:
    _, r = local_run
    assert r["schema"] == SCHEMA and r["mode"] == "local" and r["quick"] is True
    for key in ("run_id", "started", "duration_s", "command", "settings", "git", "driver",
                "placement", "presets", "aggregator", "nodes", "seed", "federation", "notes"):
        assert key in r, key
    assert r["driver"]["versions"]["cryptography"]
    assert r["federation"] == {"skipped": "--skip federation"}
    assert list(r["nodes"]) == ["node-0", "node-1"]
    for name, node in r["nodes"].items():
        assert node["node"] == name and node["host"]["usable_cpus"] >= 1
        assert node["backends"]["pyca"] == "ok"
        if node["backends"]["liboqs"] != "ok":  # the reason is reported, not a crash
            assert "liboqs" not in node["primitives"] and node["backends"]["liboqs"]
        for op in OPS:
            s = node["primitives"]["pyca"][op]
            assert s["n"] == 20 and 0 < s["p50_us"] <= s["p99_us"] <= s["max_us"]
            assert len(s["cdf_us"]) == 20
        hs = node["handshake"]
        assert hs["pq"]["n"] == hs["classical"]["n"] == 5
        assert hs["pq"]["bytes_sent"] > hs["classical"]["bytes_sent"]  # ML-KEM/ML-DSA sizes
        t = node["throughput"]
        assert t["plaintext_Bps"] > 0 and t["secure_Bps"] > 0 and t["ratio"] > 0
        assert t["sidecar"]["rss_mib_peak"] > 10
        assert t["sidecar"]["metrics"]["handshakes"] >= 1
        assert set(node["aead"]) == {"AES-256-GCM", "CHACHA20-POLY1305"}
    if r["placement"]["pinned"]:
        assert r["nodes"]["node-0"]["host"]["affinity"] != r["nodes"]["node-1"]["host"][
            "affinity"]
    agg = r["aggregator"]
    assert agg["nodes_finished"] == ["node-0", "node-1"]
    assert agg["handshakes_served"]["failed"] == 0
    assert agg["handshakes_served"]["pq"] >= 2 * (5 + 3)


def test_local_seed_experiment(local_run: tuple[Path, dict[str, Any]]) -> None:
    _, r = local_run
    raw = r["aggregator"]["seed"]
    assert len(raw["sequential"]["3"]) == len(raw["parallel"]["3"]) == 2
    assert len(r["aggregator"]["distributed"]["seconds"]["3"]) == 2
    row = r["seed"]["clients"]["3"]
    for key in ("sequential_s", "parallel_s", "distributed_s"):
        assert 0 < row[key] < 30, (key, row)
    assert row["reduction_parallel"] == pytest.approx(1 - row["parallel_s"] / row["sequential_s"])
    assert row["node_shares"] == {"node-0": 2, "node-1": 1}
    assert r["seed"]["claim_reduction"] == 0.35
    # Each node timed its own share, and the aggregator's clock saw at least the slowest one.
    node_secs = r["aggregator"]["distributed"]["node_seconds"]["3"]
    assert set(node_secs) == {"node-0", "node-1"}
    assert min(r["aggregator"]["distributed"]["seconds"]["3"]) >= min(node_secs["node-0"])


def test_local_files_written(local_run: tuple[Path, dict[str, Any]]) -> None:
    out, r = local_run
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and set(rows[0]) == {"run_id", "mode", "node", "category", "metric", "stat",
                                     "value", "unit"}
    assert {row["run_id"] for row in rows} == {r["run_id"]}
    keyed = {(row["node"], row["category"], row["metric"], row["stat"]) for row in rows}
    for node in ("node-0", "node-1"):
        assert (node, "primitive", "pyca/ML-DSA-65 sign", "p99") in keyed
        assert (node, "handshake", "pq", "mean") in keyed
        assert (node, "throughput", "sidecar", "throughput") in keyed
        assert (node, "sidecar", "rss", "peak") in keyed
    assert ("aggregator", "seed", "3 clients", "sequential") in keyed
    assert ("aggregator", "seed", "3 clients", "reduction_distributed") in keyed
    report = (out / "report.md").read_text()
    for heading in ("## PQC primitives per node", "## Handshake node → aggregator",
                    "## Channel throughput", "## Seed-004", "Skipped: --skip federation"):
        assert heading in report, heading
    assert "35%" in report
    for png in ("latency_cdf.png", "seed_speedup.png"):
        assert png in r["plots"] and (out / png).stat().st_size > 5000
    assert (out / "logs" / "aggregator.log").exists()


def test_bad_options_are_refused(tmp_path: Path) -> None:
    assert main(["bench", "--out", str(tmp_path), "--skip", "everything"]) == 2
    assert main(["bench", "--out", str(tmp_path), "--clients", "0"]) == 2


@pytest.mark.slow
def test_local_with_federation_round(tmp_path: Path) -> None:
    pytest.importorskip("flwr", reason="the FL extra is not installed")
    rc = main(["bench", "--out", str(tmp_path), "--nodes", "1", *SMALL, "--rounds", "2",
               "--skip", "primitives,handshake,throughput,seed"])
    assert rc == 0
    r = json.loads((tmp_path / "results.json").read_text())
    rounds = r["federation"]["rounds"]
    assert [x["round"] for x in rounds] == [1, 2]
    for x in rounds:
        assert x["cryptoSeconds"] > 0 and x["durationSeconds"] > x["cryptoSeconds"]
        assert x["computeSeconds"] > 0
    assert (tmp_path / "round_breakdown.png").stat().st_size > 5000
    assert "| 2 |" in (tmp_path / "report.md").read_text()


# -- units ------------------------------------------------------------------------------------
def test_stats_and_shares() -> None:
    s = stats([i / 1e6 for i in range(1, 1001)])
    assert s["n"] == 1000 and s["p50_us"] == pytest.approx(501)
    assert s["p99_us"] == pytest.approx(991) and s["max_us"] == pytest.approx(1000)
    assert len(s["cdf_us"]) == 100 and s["cdf_us"][0] == 1 and s["cdf_us"][-1] == 1000
    assert stats([]) == {"n": 0}
    assert shares(3, 3) == [1, 1, 1] and shares(20, 3) == [7, 7, 6] and shares(2, 3) == [1, 1, 0]


def test_log_markers_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    emit_progress("handshake", 2, 5)
    print("noise {not json")
    emit_result({"node": "pi-0", "x": [1.5, 2]})
    st = parse_log(capsys.readouterr().out)
    assert st.progress == {"step": "handshake", "done": 2, "total": 5}
    assert st.result == {"node": "pi-0", "x": [1.5, 2]}
    assert parse_log("PQFED_BENCH_RESULT_BEGIN\n{\"trunc").result is None
    ports = AggregatorPorts(1, 2, 3, 4, 5)
    assert AggregatorPorts.parse(ports.to_arg()) == ports
    with pytest.raises(ValueError):
        AggregatorPorts.parse("1,2")


def test_placement_spreads_nodes_over_cpus() -> None:
    from pqfed.testbed.bench.local import placement

    p = placement(3, 1, pin=True)
    cpus = p["host_cpus"]
    if len(cpus) > 1:
        assert p["pinned"] and [v[0] for v in p["nodes"].values()] == [
            cpus[i % len(cpus)] for i in range(3)]
        assert p["distinct_node_cpus"] == min(3, len(cpus))
    assert not placement(2, 1, pin=False)["pinned"]


def _synthetic(tmp_path: Path) -> dict[str, Any]:
    from pqfed.testbed.bench.common import host_info
    from pqfed.testbed.bench.report import seed_summary

    host = {**host_info(), "usable_cpus": 1, "affinity": [0], "cpu_quota_cores": None}
    lat = stats([i / 1e5 for i in range(1, 50)])
    node = {"node": "pi-0", "index": 0, "host": host,
            "backends": {"pyca": "ok", "liboqs": "no library"},
            "primitives": {"pyca": dict.fromkeys(OPS, lat)},
            "handshake": {"pq": {**lat, "bytes_sent": 9000, "bytes_received": 11000},
                          "classical": {**lat, "bytes_sent": 400, "bytes_received": 500},
                          "ratio_mean": 1.0, "suite": "CHACHA20_POLY1305_SHA384"},
            "seed": {"share": {"3": 3}, "seconds": {"3": [0.03, 0.031]}}}
    agg = {"node": "pi-0", "host": host, "seed": {"workers": 1, "sequential": {"3": [0.03]},
                                                  "parallel": {"3": [0.032]}},
           "distributed": {"seconds": {"3": [0.0305]}, "node_seconds": {}}}
    notes: list[str] = []
    return {"schema": SCHEMA, "run_id": "t", "mode": "local", "quick": True,
            "started": "now", "duration_s": 1.0, "command": ["pqfed", "bench"],
            "git": "x", "driver": host, "aggregator": agg, "nodes": {"pi-0": node},
            "presets": {"pi-0": {"network": "rate 50mbit"}},
            "seed": seed_summary(agg, {"pi-0": node}, 1.0, notes), "notes": notes,
            "federation": {"job": "j", "wallSeconds": 9.0, "sidecars": {},
                           "rounds": [{"round": 1, "durationSeconds": 3.0,
                                       "computeSeconds": 1.0, "cryptoSeconds": 0.05,
                                       "dispatchSeconds": 0.5, "returnSeconds": 0.4,
                                       "serverSeconds": 0.2}]}}


def test_report_from_synthetic_results(tmp_path: Path) -> None:
    from pqfed.testbed.bench.report import write_all

    r = _synthetic(tmp_path)
    assert any("cannot speed up on 1 core" in n for n in r["notes"])
    assert r["seed"]["clients"]["3"]["ideal_reduction_distributed"] == 0
    write_all(r, tmp_path)
    assert set(r["plots"]) == {"latency_cdf.png", "seed_speedup.png", "round_breakdown.png"}
    report = (tmp_path / "report.md").read_text()
    assert "liboqs unavailable: no library" in report
    assert "| 1 | 3.000 | 1.000 | 0.500 | 0.400 | 0.200 | 0.050 | 1.7% |" in report
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {"federation", "aggregator", "pi-0"} <= {row["node"] for row in rows}
    assert any(row["stat"] == "unavailable" and row["value"] == "no library" for row in rows)


# -- cluster mode against an emulated cluster of our own ---------------------------------------
RUN_ID = secrets.token_hex(3)
NODES = (f"pqb{RUN_ID}-0", f"pqb{RUN_ID}-1")
BRIDGE = f"pqb{RUN_ID}"


def _free_subnet() -> str:
    subnet = free_subnet(150 + int(RUN_ID, 16) % 40, 250)
    if subnet is None:
        pytest.skip("no free 10.X.0.0/16 for the test pod network")
    return subnet


@pytest.fixture(scope="module")
def emulated_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")
    if os.geteuid() != 0:
        pytest.skip("the node agent needs root (network/mount namespaces, veth, cgroups)")
    for tool in ("ip", "nsenter", "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    check = subprocess.run(["bash", str(REPO / "testbed/cluster/build.sh"), "--check", "etcd",
                            "kube-apiserver", "kube-controller-manager", "kube-scheduler"],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        pytest.skip(f"control-plane binaries not built (testbed/cluster/build.sh):\n"
                    f"{check.stdout.strip()}")
    cluster_dir = tmp_path_factory.mktemp("bench-cluster")
    env = cluster_env(cluster_dir, NODES, bridge=BRIDGE, pod_subnet=_free_subnet())
    agents: list[subprocess.Popen[bytes]] = []
    try:
        up = subprocess.run(["bash", str(REPO / "testbed/cluster/up.sh")], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
        assert up.returncode == 0, f"up.sh failed:\n{up.stderr}"
        presets = [["--cpu-limit-cores", "1.0", "--net-preset", "pi4-wifi"],
                   ["--cpu-limit-cores", "1.0", "--net-preset", "pi4-ethernet"]]
        for node, extra in zip(NODES, presets, strict=True):
            log = open(cluster_dir / f"agent-{node}.log", "wb")  # noqa: SIM115
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "pqfed.cli", "node-agent", "--name", node,
                 "--shutdown-grace", "5", "--labels", "pqfed.io/pi=true", *extra],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        kubeconfig = str(cluster_dir / "kubeconfig")
        from kubernetes import client, config

        core = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            ready = [n for n in core.list_node(label_selector="pqfed.io/pi=true").items
                     if any(c.type == "Ready" and c.status == "True"
                            for c in n.status.conditions or [])]
            if len(ready) == 2:
                break
            assert all(a.poll() is None for a in agents), "a node agent exited"
            time.sleep(1)
        else:
            pytest.fail("the emulated nodes did not become Ready")
        yield {"env": env, "dir": cluster_dir, "kubeconfig": kubeconfig, "core": core}
    finally:
        down = subprocess.run(["bash", str(REPO / "testbed/cluster/down.sh"), "--wipe"],
                              env=env, capture_output=True, text=True, timeout=180,
                              check=False)
        for proc in agents:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert down.returncode == 0, f"down.sh failed:\n{down.stderr}"


@pytest.mark.slow
@pytest.mark.cluster
def test_cluster_mode_on_the_emulated_cluster(emulated_cluster: dict[str, Any],
                                             tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "pqfed.cli", "bench", "--mode", "cluster", "--kubeconfig",
         emulated_cluster["kubeconfig"], "--node-selector", "pqfed.io/pi=true", "--namespace",
         f"bench-{RUN_ID}", "--out", str(out), *SMALL, "--timeout", "600",
         "--pod-env", "PQFED_AEAD=CHACHA20-POLY1305"],  # the suite a Pi 4 (no AES) picks
        env=emulated_cluster["env"], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads((out / "results.json").read_text())
    assert r["mode"] == "cluster" and r["cluster"]["emulated"] is True
    assert list(r["nodes"]) == list(NODES)
    assert r["cluster"]["aggregator_node"] == NODES[0]
    for name, node in r["nodes"].items():
        assert node["node"] == name
        assert node["host"]["cpu_quota_cores"] == pytest.approx(1.0)  # --cpu-limit-cores
        assert node["handshake"]["pq"]["n"] == 5
        assert node["throughput"]["secure_Bps"] > 0
        assert set(node["primitives"]["pyca"]) == set(OPS)
        assert node["handshake"]["suite"] == "CHACHA20_POLY1305_SHA384"  # --pod-env reached it
    # The link presets were applied (rate shaping at least) and are recorded per node.
    assert "50" in r["presets"][NODES[0]]["network"]
    assert r["presets"][NODES[0]]["cpu_limit_cores"] == pytest.approx(1.0)
    assert r["presets"][NODES[0]]["arch"] == "arm64"
    row = r["seed"]["clients"]["3"]
    assert row["sequential_s"] > 0 and row["parallel_s"] > 0 and row["distributed_s"] > 0
    assert any("Emulated nodes" in n for n in r["notes"])
    assert (out / "report.md").exists() and (out / "latency_cdf.png").exists()
    # Cleaned up: the namespace it created is going away with its pods.
    core = emulated_cluster["core"]
    pods = core.list_pod_for_all_namespaces(label_selector="app.kubernetes.io/name=pqfed-bench")
    assert all(p.metadata.deletion_timestamp for p in pods.items)
