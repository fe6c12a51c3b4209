"""The two-revision benchmark driver: export, harness override, statistics, refusals.

The benchmarks themselves are not run here (minutes each); `make bench-regress` does.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pqfed.testbed import regress


def test_a_base_revision_is_exported_once_and_harness_files_come_from_the_head(
        tmp_path: Path) -> None:
    commit = regress.resolve("HEAD~1")
    root = regress.export(commit, tmp_path, ["pqc/bench.py"])
    assert (root / "src" / "pqfed" / "cli.py").is_file()
    assert (root / "src" / "pqfed" / "pqc").resolve() == (root / "pqc").resolve()
    assert (root / "pqc" / "bench.py").read_bytes() == (
        regress.REPO / "pqc" / "bench.py").read_bytes()
    shown = subprocess.run(["git", "-C", str(regress.REPO), "show",
                            f"{commit}:pqc/channel.py"], capture_output=True, check=True).stdout
    assert (root / "pqc" / "channel.py").read_bytes() == shown
    # A second export reuses the tree (marked complete) and still applies the harness.
    (root / "pqc" / "bench.py").write_text("# stale\n")
    assert regress.export(commit, tmp_path, ["pqc/bench.py"]) == root
    assert (root / "pqc" / "bench.py").read_text() != "# stale\n"


def test_the_base_tree_is_imported_ahead_of_the_head(tmp_path: Path) -> None:
    root = regress.export(regress.resolve("HEAD~1"), tmp_path, [])
    tree = regress.Tree("base", root)
    where = subprocess.run(
        [regress.sys.executable, "-c", "import pqfed.pqc.channel as c; print(c.__file__)"],
        env=tree.env(), capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(root.resolve()), where


def test_unknown_revisions_and_harness_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(regress.RegressError, match="--base 'no-such-rev'"):
        regress.resolve("no-such-rev")
    with pytest.raises(regress.RegressError, match="--harness pqc/nope.py"):
        regress.export(regress.resolve("HEAD"), tmp_path, ["pqc/nope.py"])


def test_one_run_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        regress.main(["pqc", "--base", "HEAD", "--runs", "1"])
    assert "--runs: at least 2" in capsys.readouterr().err


def test_the_bootstrap_interval_resolves_a_real_difference_and_not_noise() -> None:
    base = [1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.00]
    slower = [x * 1.2 for x in base]
    lo, hi = regress.bootstrap_ratio(slower, base)
    assert 1.1 < lo <= 1.2 <= hi < 1.3
    lo, hi = regress.bootstrap_ratio(list(reversed(base)), base)
    assert lo < 1.0 < hi


def test_the_report_has_one_row_per_metric_both_trees_measured() -> None:
    samples = regress.Samples()
    samples.add("round, pqc", "s", "base", [1.0, 1.1])
    samples.add("round, pqc", "s", "head", [0.9, 1.0])
    samples.add("only head", "s", "head", [1.0, 1.0])
    meta = {"head": "abc", "base": "def", "runs": 2, "harness": ["pqc/bench.py"],
            "load_start": "0.1", "load_end": "0.2", "seconds": 10.0}
    text = regress.report(samples, "head", "base", meta)
    assert "| round, pqc | s | 1.050 (1.000-1.100) | 0.950 (0.900-1.000) | 0.905 [" in text
    assert "only head" not in text
    assert "`pqc/bench.py`" in text


def _fake_transport_run(out: Path, label: str, i: int, seconds: float) -> None:
    import json

    for variant, _ in regress.TRANSPORT_VARIANTS:
        d = regress.run_dir(out, "transport", label, i) / variant / "regress-1"
        d.mkdir(parents=True)
        rounds = [{"durationSeconds": seconds + r, "computeSeconds": 0.5} for r in range(3)]
        (d / "results.json").write_text(json.dumps({"status": {"rounds": rounds}}))


def test_a_stopped_run_is_reported_from_its_complete_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    for i in range(2):
        _fake_transport_run(tmp_path, "head", i, 1.0)
        _fake_transport_run(tmp_path, "base", i, 2.0)
    _fake_transport_run(tmp_path, "head", 2, 1.0)  # the third run was stopped: no base
    (tmp_path / "meta.json").write_text(json.dumps({
        "head": "abc", "base": "def", "runs": 3, "harness": [], "load_start": "1.0",
        "started": 0.0, "steps": ["transport"]}))
    samples, runs = regress.collect(tmp_path, ["transport"])
    assert runs == 2
    # rounds 2 and 3 of each run (round 1 is start-up), two runs
    assert samples.values["round, pqc"] == {"head": [2.0, 3.0, 2.0, 3.0],
                                           "base": [3.0, 4.0, 3.0, 4.0]}
    assert regress.main(["transport", "--base", "HEAD", "--out", str(tmp_path),
                         "--collect-only"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "2 runs each" in text and "| round, pqc | s | 3.500" in text


def test_collect_only_needs_two_complete_runs(tmp_path: Path) -> None:
    import json

    _fake_transport_run(tmp_path, "head", 0, 1.0)
    _fake_transport_run(tmp_path, "base", 0, 2.0)
    (tmp_path / "meta.json").write_text(json.dumps({
        "head": "abc", "base": "def", "runs": 3, "harness": [], "load_start": "1.0",
        "started": 0.0, "steps": ["transport"]}))
    with pytest.raises(SystemExit):
        regress.main(["transport", "--base", "HEAD", "--out", str(tmp_path), "--collect-only"])
