"""The TLS 1.3 vs pqfed1 benchmark runs end to end and reports every figure (no timing is
asserted: figures go to docs/BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from pqfed.pqc import bench_tls


@pytest.mark.slow
def test_bench_tls_measures_every_protocol() -> None:
    res = bench_tls.bench(n=3, runs=2, transfers=1, total=1 << 20, parallel=3)
    for proto in bench_tls.PROTOCOLS:
        row = res[proto]
        assert row["handshake_pooled"]["n"] == 6
        assert row["handshake_median_ms"]["min"] > 0
        assert row["handshake_cpu_ms"]["median"] > 0
        assert row["throughput_MiBps"]["median"] > 0
        assert row["parallel_per_s"]["median"] > 0 and row["sequential_per_s"]["median"] > 0
    assert set(res["ratio_tls13_to"]) == {"pqfed1", "pqfed1-pyca"}
    text = bench_tls.report(res)
    assert all(f"| {p} |" in text for p in bench_tls.PROTOCOLS)
    assert "OpenSSL 4" in text


def test_rotation_gives_each_protocol_each_position() -> None:
    firsts = {bench_tls._rotation(i)[0] for i in range(len(bench_tls.PROTOCOLS))}
    assert firsts == set(bench_tls.PROTOCOLS)
    assert all(sorted(bench_tls._rotation(i)) == sorted(bench_tls.PROTOCOLS) for i in range(5))
