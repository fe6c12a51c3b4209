"""Fast checks of the real node's knobs (no cluster needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pqfed.testbed.testing import cluster_env

SCRIPTS = Path(__file__).resolve().parents[2] / "testbed" / "cluster"


def test_bad_real_node_value_is_refused_before_anything_starts(tmp_path: Path) -> None:
    env = {**cluster_env(tmp_path / "c", ["n0"]), "PQFED_REAL_NODE": "yes"}
    up = subprocess.run(["bash", str(SCRIPTS / "up.sh")], env=env, capture_output=True,
                        text=True, timeout=60, check=False)
    assert up.returncode != 0
    assert "PQFED_REAL_NODE=yes" in up.stderr and "expected 0" in up.stderr
    assert not (tmp_path / "c" / "run").exists()


def test_cluster_env_has_no_real_node_unless_asked(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PQFED_REAL_NODE", "1")     # a developer's shell must not leak in
    assert cluster_env(tmp_path, ["n0"])["PQFED_REAL_NODE"] == "0"
    env = cluster_env(tmp_path, [], real_node="r0", node_bridge="pqn0", node_subnet="10.99.0.0/16")
    assert env["PQFED_REAL_NODE"] == "1" and env["PQFED_REAL_NODE_NAME"] == "r0"
    ports = {env[k] for k in env if k.endswith("_PORT")}
    assert len(ports) == len([k for k in env if k.endswith("_PORT")]), "ports must be distinct"
    with pytest.raises(ValueError, match="node_bridge and node_subnet"):
        cluster_env(tmp_path, [], real_node="r0")


def test_node_script_help_and_unknown_command() -> None:
    out = subprocess.run(["bash", str(SCRIPTS / "node.sh"), "--help"], capture_output=True,
                         text=True, check=True)
    assert "node.sh import ARCHIVE" in out.stdout
    bad = subprocess.run(["bash", str(SCRIPTS / "node.sh"), "frobnicate"], capture_output=True,
                         text=True, check=False)
    assert bad.returncode != 0 and "unknown command: frobnicate" in bad.stderr
