"""``pqfed bench capacity``: the harness cannot bypass the aggregator's checks.

Slow: one real aggregator (sidecar + `pqfed fl aggregator`) and 4 emulated clients for 2
rounds, client 1 flipping a byte of its signed update after signing and client 2 re-sending
its round-1 update in round 2. Every honest update must be verified, accepted and counted;
the tampered and the replayed ones must be rejected by the aggregator (status + audit log),
as for a real client. Fast: the statistics and the report on synthetic rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pqfed.testbed.bench.capacity import (
    VARIANTS,
    CapacityRun,
    CapacitySettings,
    bootstrap_ci,
    median,
    report,
    summarize,
)


def _two_rounds(settings: CapacitySettings, tmp_path: Path
                ) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """One capacity run of 2 rounds: its result and its rounds by number."""
    cap = CapacityRun(settings, tmp_path / "run")
    try:
        result = cap.run()
    finally:
        cap.stop()
    rounds = {r["round"]: r for r in result["rounds"]}
    assert sorted(rounds) == [1, 2], result
    return result, rounds


@pytest.mark.slow
def test_emulated_clients_are_verified_and_misbehaviour_rejected(tmp_path: Path) -> None:
    result, rounds = _two_rounds(CapacitySettings(
        clients=4, rounds=2, client_procs=2, round_seconds=120, tamper=(1,), replay=(2,),
        min_clients=1), tmp_path)
    # Round 1: the replaying client still sends its genuine first update.
    assert sorted(rounds[1]["participants"]) == ["client-0", "client-2", "client-3"]
    assert rounds[1]["rejected"] == 1  # the tampered update
    # Round 2: its round-1 update, replayed, is refused (signature bound to the round).
    assert sorted(rounds[2]["participants"]) == ["client-0", "client-3"]
    assert rounds[2]["rejected"] == 2
    status_rounds = {r["round"]: r for r in result["status"]["rounds"]}
    notes = " ".join(status_rounds[2].get("notes", []))
    assert "round" in notes and "rejected" in notes, notes
    # Every client ran its mod chain (signing) in both rounds, so the rejections above come
    # from the aggregator's checks, not from clients that did not send.
    counts = result["client_counts"]
    assert {int(i): c["train"] for i, c in counts.items()} == {0: 2, 1: 2, 2: 2, 3: 2}
    assert all(c["errors"] == 0 for c in counts.values())
    # The signed audit log records each verdict.
    assert result["audit"].get("update-accepted") == 5, result["audit"]
    assert result["audit"].get("update-rejected") == 3, result["audit"]
    # Measurements are there for every round.
    for r in rounds.values():
        assert r["cpu_seconds"] > 0 and r["peak_pss_mib"] > 0 and r["seconds"] > 0


def test_summary_statistics_and_report() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5
    lo, hi = bootstrap_ci([1.0, 1.1, 0.9, 1.05, 0.95, 1.0])
    assert 0.9 <= lo <= 1.0 <= hi <= 1.1
    rnd = {"seconds": 2.0, "cpu_seconds": 1.0, "peak_pss_mib": 500.0, "accepted": 10,
           "rejected": 0, "load_1m": 1.5, "dispatch_seconds": 0.1, "server_seconds": 0.2}
    runs = [{"clients": 10, "rounds": [{**rnd, "seconds": 9.0}, rnd, {**rnd, "seconds": 3.0}]}]
    (row,) = summarize(runs)
    assert row["rounds"] == 2  # the first round of a job (set-up) is left out
    assert row["latency_median"] == 2.5
    assert row["cpu_per_client_ms"] == pytest.approx(100.0)
    text = report([row], {"1000": "clients: exited"})
    assert "| 10 | after | 2 | 2.50" in text and "| 1000 | - | - | did not complete" in text


def test_variants_are_summarized_apart_in_a_fixed_order() -> None:
    rnd = {"seconds": 2.0, "cpu_seconds": 1.0, "peak_pss_mib": 500.0, "accepted": 10,
           "rejected": 0, "load_1m": 1.5, "dispatch_seconds": 0.1, "server_seconds": 0.2}
    runs = [{"clients": 10, "variant": "after", "rounds": [rnd, rnd]},
            {"clients": 10, "variant": "before", "rounds": [rnd, {**rnd, "cpu_seconds": 4.0}]}]
    rows = summarize(runs)
    assert [(r["clients"], r["variant"]) for r in rows] == [(10, "before"), (10, "after")]
    assert [r["cpu_median"] for r in rows] == [4.0, 1.0]
    assert set(VARIANTS) == {"before", "backoff", "asgi", "after", "longpoll"}
    assert not VARIANTS["before"].idle_backoff and VARIANTS["before"].superlink_middleware == "stock"
    assert VARIANTS["after"].idle_backoff and VARIANTS["after"].superlink_middleware == "asgi"
    # the aggregator reads these (services/fl_node.py): only "longpoll" holds empty pulls
    assert VARIANTS["after"].env()["PQFED_LONG_POLL"] == "0"
    assert VARIANTS["longpoll"].env() == {"PQFED_SUPERLINK_MIDDLEWARE": "asgi",
                                          "PQFED_LONG_POLL": ""}


def test_a_hierarchical_job_and_its_rows() -> None:
    from pqfed.services import edge_members, parse_spec
    from pqfed.testbed.bench.capacity import job_document
    from pqfed.testbed.bench.capacity_client import parse_indices

    doc = job_document(CapacitySettings(clients=10, edges=3))
    spec = parse_spec(doc["spec"], "capacity")  # the spec's own rules accept it
    assert spec.hierarchy.enabled and spec.hierarchy.edges == 3 and spec.min_clients == 3
    assert sorted(i for e in range(3) for i in edge_members(spec, e)) == list(range(10))
    assert parse_indices("4:3") == [4, 5, 6] and parse_indices("1,4,7") == [1, 4, 7]
    rnd = {"seconds": 2.0, "cpu_seconds": 1.0, "peak_pss_mib": 500.0, "accepted": 3,
           "rejected": 0, "load_1m": 1.5, "dispatch_seconds": 0.1, "server_seconds": 0.2,
           "edge_cpu_seconds": 3.0, "edge_peak_pss_mib": 2000.0, "clients_accepted": 10,
           "edge_seconds_max": 1.5, "edge_dispatch_max": 0.4}
    runs = [{"clients": 10, "variant": "longpoll", "edges": 3, "rounds": [rnd, rnd]},
            {"clients": 10, "variant": "longpoll", "rounds": [rnd, rnd]}]
    rows = summarize(runs)
    assert [r["edges"] for r in rows] == [0, 3]  # flat and hierarchical apart
    text = report(rows, {})
    assert "| 10 | 3 | longpoll | 1 | 2.00 [2.00, 2.00] | 1.00" in text
    assert "| 3.00 [3.00, 3.00] | 300.0 | 1.50 | 0.50 | 500 / 2000 | 10/10 |" in text


@pytest.mark.slow
def test_clients_behind_edges_are_verified_at_their_edge(tmp_path: Path) -> None:
    """4 emulated clients behind 2 real edges (`pqfed fl edge` + sidecar): every client's
    signed update is accepted at its edge in each round, each edge's at the aggregator."""
    result, rounds = _two_rounds(CapacitySettings(
        clients=4, rounds=2, client_procs=2, round_seconds=120, edges=2), tmp_path)
    for r in rounds.values():
        assert sorted(r["participants"]) == ["edge-0", "edge-1"]
        assert r["clients_accepted"] == 4 and r["edge_cpu_seconds"] > 0
    assert [a.get("update-accepted") for a in result["edge_audit"]] == [4, 4]
    assert result["audit"].get("update-accepted") == 4  # 2 edges x 2 rounds
