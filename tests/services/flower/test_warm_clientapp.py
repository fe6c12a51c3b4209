"""The warm ClientApp fork server and its `flwr-clientapp` shim."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pqfed.services import flower as fr
from pqfed.services.procs import ManagedProcess, wait_unix_socket


@pytest.mark.slow
def test_warm_clientapp_zygote(tmp_path: Path) -> None:
    """The flwr-clientapp shim forks the task from the zygote with the shim's argv, stdio,
    cwd and env, and returns the task's exit code."""
    node = fr.SuperNodeProcess(
        run_dir=tmp_path, index=0, superlink_address="127.0.0.1:1", runtime_port=1,
        tuning=fr.FlowerTuning(warm_clientapp=True),
    )  # fmt: skip
    zyg = ManagedProcess("zygote", node.zygote_command(), tmp_path / "zygote.log", node.env(),
                         tmp_path).start()
    try:
        wait_unix_socket(node.zygote_socket, 60, zyg)
        shim = node.path_shims()[0] / "flwr-clientapp"
        ok = subprocess.run(
            [shim, "--help"], check=False, capture_output=True, text=True, timeout=30
        )
        assert ok.returncode == 0 and "usage: flwr-clientapp" in ok.stdout
        bad = subprocess.run(
            [shim, "--no-such-flag"], check=False, capture_output=True, text=True, timeout=30
        )
        assert bad.returncode == 2 and "error:" in bad.stderr
    finally:
        zyg.stop()
    assert not zyg.running
