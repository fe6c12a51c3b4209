"""`pqfed selftest` on the host: every check runs and passes, and a wrong known answer is
reported as a failure (exit status 1), not passed over."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pqfed import selftest
from pqfed.pqc import kat


def test_selftest_passes_here_with_torch() -> None:
    checks = selftest.run_selftest(require_torch=True)
    assert [c for c in checks if c.status != "ok"] == []
    names = {c.name for c in checks}
    assert "kat: ML-KEM-768 decapsulate" in names
    assert "kat: ML-DSA-65 verify known signature" in names
    assert "pqfed1 handshake + records over loopback" in names
    assert "torch training step" in names


def test_versions_name_every_component() -> None:
    v = selftest.versions()
    for key in ("pqfed", "cryptography", "openssl", "flwr", "torch", "pqc_backend"):
        assert v[key] and v[key] != "not installed", key
    from pqfed.pqc.backends import get_backend

    assert v["pqc_backend"].startswith(f"{get_backend().name} (")
    assert v["openssl"].startswith("OpenSSL")


def test_a_wrong_known_answer_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = json.loads(json.dumps(kat._vectors()))
    ss = vectors["ML-KEM-768"]["shared_secret"]
    vectors["ML-KEM-768"]["shared_secret"] = ("0" if ss[0] != "0" else "1") + ss[1:]
    monkeypatch.setattr(kat, "_vectors", lambda: vectors)
    bad = [r for r in kat.run_known_answer_tests() if not r.ok]
    assert [r.name for r in bad] == ["ML-KEM-768 decapsulate"]
    assert "expected" in bad[0].detail


def test_cli_prints_versions_and_exits_zero(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pqfed.cli", "selftest"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    for word in ("pqfed:", "cryptography:", "openssl:", "flwr:", "torch:", "pqc_backend:",
                 "backends: pyca->pyca"):
        assert word in proc.stdout
    assert re.search(r"^selftest: (\d+)/\1 passed", proc.stdout, re.M), proc.stdout


def test_cli_exits_nonzero_when_torch_is_required_but_missing(tmp_path: Path) -> None:
    import os

    blocker = Path(__file__).parent / "import_blocker"
    env = dict(os.environ, PQFED_BLOCK_IMPORTS="torch", PYTHONPATH=str(blocker))
    proc = subprocess.run([sys.executable, "-m", "pqfed.cli", "selftest", "--require-torch"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 1
    assert "FAIL  torch training step" in proc.stdout
