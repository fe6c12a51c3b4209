"""``pqfed bench capacity``: the harness cannot bypass the aggregator's checks.

Slow: one real aggregator (sidecar + `pqfed fl aggregator`) and 4 emulated clients for 2
rounds, client 1 flipping a byte of its signed update after signing and client 2 re-sending
its round-1 update in round 2. Every honest update must be verified, accepted and counted;
the tampered and the replayed ones must be rejected by the aggregator (status + audit log),
as for a real client. Fast: the statistics and the report on synthetic rows.
"""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.slow
def test_emulated_clients_are_verified_and_misbehaviour_rejected(tmp_path: Path) -> None:
    settings = CapacitySettings(clients=4, rounds=2, client_procs=2, round_seconds=120,
                                tamper=(1,), replay=(2,), min_clients=1)
    cap = CapacityRun(settings, tmp_path / "run")
    try:
        result = cap.run()
    finally:
        cap.stop()
    rounds = {r["round"]: r for r in result["rounds"]}
    assert sorted(rounds) == [1, 2], result
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
    assert set(VARIANTS) == {"before", "backoff", "asgi", "after"}
    assert not VARIANTS["before"].idle_backoff and VARIANTS["before"].superlink_middleware == "stock"
    assert VARIANTS["after"].idle_backoff and VARIANTS["after"].superlink_middleware == "asgi"
