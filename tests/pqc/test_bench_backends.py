"""The pyca-vs-liboqs benchmark step runs end to end and reports every figure (no timing is
asserted: figures go to docs/BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from pqfed.pqc import bench_backends as bb


@pytest.mark.slow
def test_backends_step_measures_both_backends_at_every_level() -> None:
    present = ["pyca", "liboqs"]
    res = {
        "backends": {"pyca": "pyca/cryptography", "liboqs": "liboqs 0.13.0 via ctypes"},
        "primitives": bb.bench_primitives(present, n=3, runs=2),
        "handshake": bb.bench_handshake(present, n=2, runs=2),
        "parallel": bb.bench_parallel(present, peers=2, runs=1),
    }
    res["faster"] = "liboqs"
    assert set(res["primitives"]) == {"ML-KEM-768 keygen", "ML-KEM-768 encaps",
                                      "ML-KEM-768 decaps", "ML-DSA-65 keygen",
                                      "ML-DSA-65 sign (1 KiB)", "ML-DSA-65 verify"}
    for row in res["primitives"].values():
        assert set(row) == set(present)
        assert all(row[b]["runs"] == 2 and row[b]["min_us"] > 0 for b in present)
    assert set(res["handshake"]["runs"]) == {"pyca", "liboqs", bb.CLASSICAL}
    assert set(res["handshake"]["ratio_to_classical_cpu"]) == set(present)
    for mode in ("threads", "processes"):
        assert set(res["parallel"][mode]) == set(present)
    text = bb.report(res)
    assert "full handshake, in memory" in text and "hybrid / classical" in text


def test_default_backend_context_restores_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PQFED_CRYPTO_BACKEND", "auto")
    with bb.default_backend("pyca") as b:
        assert b.name == "pyca"
    from pqfed.pqc.backends import get_backend

    assert get_backend().name == "liboqs"
