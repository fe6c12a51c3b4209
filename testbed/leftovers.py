"""What a killed test run leaves behind, found and removed by the next run.

A test cluster's state dir (etcd data, the real node's containerd content store, its
containers' rootfs and volume mounts) lives under pytest's basetemp. When the run is killed
(SIGKILL, a CI timeout, a lost terminal) its fixtures never call `down.sh --wipe`: the
node's processes may still run, and its mounts keep pytest from deleting the basetemp, so
every killed run leaves gigabytes on the host disk. With the disk nearly full the real node's
kubelet garbage-collects the images it is about to run (eviction at 1% free): the next run
then fails with ErrImagePull, far from the cause.

So each cluster dir a test run creates carries an owner file (`claim`: the run's pid and that
process's start time, which tells a reused pid apart), and the next run's fixture calls
`reap` first: for every cluster dir whose owner is gone (found through the host's mount
table, the command lines of running processes, and the real node's host-wide owner file), it
stops what still runs with `down.sh --wipe`, then unmounts and deletes what is left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

OWNER_FILE = ".pqfed-owner"
HOST_OWNER = Path("/run/pqfed/real-node.owner")  # testbed/cluster/node.sh
SCRIPTS = Path(__file__).resolve().parent / "cluster"


@dataclass(frozen=True)
class Reaped:
    """One abandoned cluster dir and what removing it did."""

    cluster_dir: Path
    owner_pid: int
    unmounted: int
    down_ok: bool


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), or None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return stat[stat.rindex(")") + 2:].split()[19]


def claim(cluster_dir: Path, pid: int | None = None) -> None:
    """Marks `cluster_dir` as owned by process `pid` (this one by default)."""
    pid = os.getpid() if pid is None else pid
    start = _start_time(pid)
    if start is None:
        raise ValueError(f"claim: no process {pid}")
    cluster_dir.mkdir(parents=True, exist_ok=True)
    (cluster_dir / OWNER_FILE).write_text(f"{pid} {start}\n")


def owner_alive(cluster_dir: Path) -> bool:
    """True while the process that claimed `cluster_dir` runs (False without a claim)."""
    try:
        pid_s, start = (cluster_dir / OWNER_FILE).read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid_s)) == start


def _owner_pid(cluster_dir: Path) -> int:
    try:
        return int((cluster_dir / OWNER_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def mount_targets() -> list[Path]:
    """Every mount point on the host (findmnt's raw output decodes octal escapes itself only
    for display, so the escapes are undone here)."""
    out = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True,
                         check=False).stdout
    return [Path(line.encode().decode("unicode_escape")) for line in out.splitlines() if line]


def process_paths() -> list[Path]:
    """Every absolute path named in a running process's command line (`/x`, `--flag=/x`):
    an emulated cluster holds no mount, but its etcd, apiserver, node agents and pods name
    their cluster dir in their arguments."""
    found: list[Path] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in args:
            _, _, value = arg.decode(errors="replace").rpartition("=")
            if value.startswith("/") and "\n" not in value:
                found.append(Path(value))
    return found


def _claimed_parent(path: Path) -> Path | None:
    for parent in path.parents:
        if (parent / OWNER_FILE).is_file():
            return parent
    return None


def candidates(mounts: Iterable[Path]) -> list[Path]:
    """Claimed cluster dirs that hold one of `mounts` (mount points, or paths running
    processes name) or own the host's real node."""
    found: set[Path] = set()
    for target in mounts:
        parent = _claimed_parent(target)
        if parent is not None:
            found.add(parent)
    try:
        owner_dir = Path(HOST_OWNER.read_text().split()[0])
    except (OSError, IndexError):
        owner_dir = None
    if owner_dir is not None and (owner_dir / OWNER_FILE).is_file():
        found.add(owner_dir)
    return sorted(found)


def _env_file(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


def reap_one(cluster_dir: Path) -> Reaped:
    """Stops and deletes one abandoned cluster dir: `down.sh --wipe` with the environment its
    up.sh and node.sh recorded; then whatever is still mounted under it is unmounted (lazily:
    a dead container's rootfs may still be busy) and the dir removed."""
    owner = _owner_pid(cluster_dir)
    env = {**os.environ, **_env_file(cluster_dir / "env"),
           **_env_file(cluster_dir / "node" / "env"), "PQFED_CLUSTER_DIR": str(cluster_dir)}
    down = subprocess.run(["bash", str(SCRIPTS / "down.sh"), "--wipe"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    unmounted = 0
    for target in sorted((t for t in mount_targets() if t.is_relative_to(cluster_dir)),
                         key=lambda t: len(t.parts), reverse=True):
        if subprocess.run(["umount", "-l", str(target)], capture_output=True,
                          check=False).returncode == 0:
            unmounted += 1
    if HOST_OWNER.is_file() and HOST_OWNER.read_text().split()[:1] == [str(cluster_dir)]:
        HOST_OWNER.unlink(missing_ok=True)
    shutil.rmtree(cluster_dir, ignore_errors=True)
    return Reaped(cluster_dir, owner, unmounted, down.returncode == 0)


def reap() -> list[Reaped]:
    """Removes every cluster dir whose owning test process is gone; live ones are left."""
    return [reap_one(d) for d in candidates([*mount_targets(), *process_paths()])
            if not owner_alive(d)]


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding `path` (the kubelet's
    nodefs.available counts the same)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class DiskTooFull(RuntimeError):
    """Not enough free disk for the real node to import and run the built images."""


def disk_needed(images: Path, arch: str) -> int:
    """Bytes the real node needs free before it imports the built images of `arch`:
    containerd keeps each archive's blobs for its platform and unpacks them into snapshots
    (about twice the compressed size again), and the kubelet starts evicting at 1% free,
    garbage-collecting the images it is about to run (then ErrImagePull, far from the
    cause). 3x the archives plus 1 GiB."""
    archives = sorted(images.glob(f"pqfed-*-{arch}.oci.tar"))
    return 3 * sum(a.stat().st_size for a in archives) + (1 << 30)


def check_disk(where: Path, images: Path, arch: str) -> None:
    """Raises DiskTooFull, with the figures and what to do, when the filesystem of `where`
    has less free space than `disk_needed`."""
    need, free = disk_needed(images, arch), free_bytes(where)
    if free < need:
        raise DiskTooFull(
            f"the real node needs {need / 2**30:.1f} GiB free on the filesystem of {where} "
            f"for the built images in {images} and has {free / 2**30:.1f} GiB: free disk "
            "(test clusters of killed runs are removed at session start; look for other large "
            "leftovers, e.g. old pytest basetemps) and run again")
