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


# Preloaded by the zygote below: records, in every forked child, the state of the garbage
# collector at the moment of the fork.
FORK_PROBE = """
import gc, os

def _child():
    with open(os.environ["FORK_PROBE_OUT"], "a") as fh:
        fh.write(f"{gc.get_freeze_count()} {gc.isenabled()}\\n")

os.register_at_fork(after_in_child=_child)
"""


@pytest.mark.slow
def test_zygote_freezes_what_it_imported_before_forking(tmp_path: Path) -> None:
    """Children must not copy the zygote's pages by collecting inherited objects: everything
    the zygote imported is frozen (gc.freeze) when a task forks, and collection is on in the
    child. Without the freeze the count is 0 and a child's first full collection writes to
    every inherited object (docs/BENCHMARKS.md "Memory footprint")."""
    (tmp_path / "fork_probe.py").write_text(FORK_PROBE)
    out = tmp_path / "forks.txt"
    node = fr.SuperNodeProcess(
        run_dir=tmp_path, index=0, superlink_address="127.0.0.1:1", runtime_port=1,
        tuning=fr.FlowerTuning(warm_clientapp=True, preload=("numpy", "fork_probe")),
        extra_pythonpath=(tmp_path,), env_overrides={"FORK_PROBE_OUT": str(out)},
    )  # fmt: skip
    zyg = ManagedProcess("zygote", node.zygote_command(), tmp_path / "zygote.log", node.env(),
                         tmp_path).start()
    try:
        wait_unix_socket(node.zygote_socket, 60, zyg)
        shim = node.path_shims()[0] / "flwr-clientapp"
        for _ in range(2):
            run = subprocess.run([shim, "--help"], check=False, capture_output=True, text=True,
                                 timeout=30)
            assert run.returncode == 0, run.stderr
    finally:
        zyg.stop()
    forks = [line.split() for line in out.read_text().splitlines()]
    assert len(forks) == 2
    for frozen, enabled in forks:
        assert int(frozen) > 10_000  # numpy + flwr-clientapp's imports: ~10^5 objects
        assert enabled == "True"
