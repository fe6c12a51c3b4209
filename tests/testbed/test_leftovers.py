"""A killed run's test cluster is removed by the next run; a live run's is not touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqfed.testbed import leftovers

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("findmnt") is None,
                                reason="mounting a tmpfs needs root and findmnt")


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_claim_lives_as_long_as_its_process(tmp_path: Path,
                                              sleeper: subprocess.Popen[bytes]) -> None:
    leftovers.claim(tmp_path, sleeper.pid)
    assert leftovers.owner_alive(tmp_path)
    sleeper.kill()
    sleeper.wait()
    assert not leftovers.owner_alive(tmp_path)


def test_a_reused_pid_is_not_the_owner(tmp_path: Path) -> None:
    leftovers.claim(tmp_path)  # this process...
    pid, start = (tmp_path / leftovers.OWNER_FILE).read_text().split()
    # ...as if it had died and the pid been given to another process started later
    (tmp_path / leftovers.OWNER_FILE).write_text(f"{pid} {int(start) + 1}\n")
    assert not leftovers.owner_alive(tmp_path)


def test_no_claim_means_no_owner(tmp_path: Path) -> None:
    assert not leftovers.owner_alive(tmp_path)
    with pytest.raises(ValueError, match="no process"):
        leftovers.claim(tmp_path, _dead_pid())


@needs_root
def test_a_dead_runs_mounted_cluster_is_removed_and_a_live_ones_kept(
        tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    dead, live = tmp_path / "dead", tmp_path / "live"
    mounts = [dead / "node" / "containerd" / "rootfs", live / "node" / "pods" / "vol"]
    for m in mounts:
        m.mkdir(parents=True)
    leftovers.claim(dead, sleeper.pid)
    leftovers.claim(live)  # this test process
    try:
        for m in mounts:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(m)],
                           check=True)
            (m / "blob").write_bytes(b"x" * 1000)
        sleeper.kill()
        sleeper.wait()  # the owner of `dead` is gone, its mount stays

        assert set(leftovers.candidates(leftovers.mount_targets())) >= {dead, live}
        reaped = leftovers.reap()

        mine = [r for r in reaped if r.cluster_dir.is_relative_to(tmp_path)]
        assert [r.cluster_dir for r in mine] == [dead]
        assert mine[0].owner_pid == sleeper.pid
        assert not dead.exists() and mounts[0] not in leftovers.mount_targets()
        assert live.exists() and (mounts[1] / "blob").is_file()
        assert mounts[1] in leftovers.mount_targets()
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], capture_output=True, check=False)


def test_a_dead_runs_emulated_cluster_is_found_through_its_processes(
        tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    """An emulated cluster holds no mount: its etcd, apiserver and node agents still run after
    a killed test run and name their cluster dir in their arguments."""
    dead = tmp_path / "dead"
    leftovers.claim(dead, sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    assert dead not in leftovers.candidates(leftovers.mount_targets())
    etcd = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                             f"--data-dir={dead / 'etcd'}"])
    try:
        deadline = time.monotonic() + 30
        while dead not in leftovers.candidates(leftovers.process_paths()):
            assert time.monotonic() < deadline, "the process naming the cluster dir not seen"
            time.sleep(0.05)
        reaped = [r for r in leftovers.reap() if r.cluster_dir.is_relative_to(tmp_path)]
        assert [r.cluster_dir for r in reaped] == [dead]
        assert not dead.exists()
    finally:
        etcd.kill()
        etcd.wait()


def test_disk_needed_counts_this_platforms_archives(tmp_path: Path) -> None:
    for name, size in (("pqfed-fl-0.1.0-amd64.oci.tar", 1000), ("pqfed-fl-0.1.0-arm64.oci.tar",
                       5000), ("pqfed-fl-0.1.0.oci.tar", 7000)):
        with (tmp_path / name).open("wb") as f:
            f.truncate(size)
    assert leftovers.disk_needed(tmp_path, "amd64") == 3000 + (1 << 30)
    assert leftovers.disk_needed(tmp_path, "arm64") == 15000 + (1 << 30)


def test_too_little_disk_is_refused_with_the_figures(tmp_path: Path) -> None:
    with (tmp_path / "pqfed-fl-0.1.0-amd64.oci.tar").open("wb") as f:
        f.truncate(leftovers.free_bytes(tmp_path))  # sparse: takes no space itself
    with pytest.raises(leftovers.DiskTooFull, match=r"needs [0-9.]+ GiB free .* has [0-9.]+ GiB"):
        leftovers.check_disk(tmp_path, tmp_path, "amd64")
    leftovers.check_disk(tmp_path, tmp_path, "arm64")  # no arm64 archives: 1 GiB is enough
