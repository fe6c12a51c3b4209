"""services/procs.py: supervised processes stop with everything they started; a dead one is
reported with its log."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest

from pqfed.services.procs import ManagedProcess, ProcessExited, wait_http_ok

# The leader starts a grandchild in its own session-less subprocess and prints its pid.
_TREE = ("import subprocess, sys, time; "
         "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
         "print(c.pid, flush=True); time.sleep(300)")


def test_stop_ends_the_whole_tree(tmp_path: Path) -> None:
    proc = ManagedProcess("tree", [sys.executable, "-c", _TREE], tmp_path / "tree.log",
                          {"PATH": "/usr/bin:/bin"}, tmp_path).start()
    try:
        assert proc.popen is not None
        while not (lines := proc.tail().splitlines()[1:]):  # line 0 is the command
            proc.check_alive()
        child = psutil.Process(int(lines[0]))
        assert child.is_running()
    finally:
        proc.stop(timeout=5)
    assert not proc.running
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert proc.tail().startswith("# ")  # the command line heads the log


def test_a_dead_process_is_reported_with_its_log(tmp_path: Path) -> None:
    code = "import sys; print('bad config: port', flush=True); sys.exit(3)"
    proc = ManagedProcess("broken", [sys.executable, "-c", code], tmp_path / "b.log",
                          {"PATH": "/usr/bin:/bin"}, tmp_path).start()
    with pytest.raises(ProcessExited) as err:  # fails fast instead of waiting 60 s
        wait_http_ok("http://127.0.0.1:9/health", 60, proc)
    assert err.value.returncode == 3 and err.value.name == "broken"
    assert "bad config: port" in str(err.value)
