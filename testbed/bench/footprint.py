"""``pqfed bench-footprint`` (the footprint part of ``make bench-scale``): proportional memory
(PSS) of every role of a federation, steady state and peak.

What is measured: every process of a real ``pqfed run`` federation (breast-cancer task, PQC
sidecars on every hop) is sampled from ``/proc/<pid>/smaps_rollup`` (PSS: a page shared by N
processes counts 1/N in each, so the sum over processes is the memory the federation uses).
Each process gets an *owner* (the pod it would be in: ``aggregator``, ``client-3``,
``edge-0``) and a *role* (sidecar, SuperNode, ClientApp zygote, ...) from its command line and
its ancestry. Per run and role: *steady* = median over the samples after the first round
completed, *peak* = maximum over all samples (per owner, then median / maximum over owners).
Each process is also broken down once (``/proc/<pid>/smaps``) by what its PSS maps: torch's
libraries, CUDA libraries, other files, anonymous memory; that answers "does this role import
torch" and "are CUDA libraries mapped" with the kernel's view, not the interpreter's.

Several source trees can be compared in one run (``--trees /work/main,.``): runs alternate
between the trees, so a before/after pair shares the host's conditions; each tree's sources go
first on PYTHONPATH of every process of its federations.

This module only measures; the report table is written by ``render``. The aggregator-capacity
part of ``make bench-scale`` lives in its own module.

Longer than our ~500-line habit on purpose: the sampling, the process-to-role
classification, the per-library breakdown and the four steps (federations, zygote, operator,
arm64 under qemu) share the classification tables and the report's rows; one file keeps
the role names and the table columns in one place.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "pqfed.bench.footprint/1"
MIB = 1024 * 1024

# --- reading /proc --------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """One process's memory in bytes (smaps_rollup): PSS and its anonymous / file parts."""

    pss: int
    pss_anon: int
    pss_file: int
    rss: int


_ROLLUP_FIELDS = {"Pss:": "pss", "Pss_Anon:": "pss_anon", "Pss_File:": "pss_file",
                  "Rss:": "rss"}


def parse_rollup(text: str) -> Memory:
    """The fields of ``/proc/<pid>/smaps_rollup`` (kB) as bytes."""
    values = dict.fromkeys(_ROLLUP_FIELDS.values(), 0)
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in _ROLLUP_FIELDS:
            values[_ROLLUP_FIELDS[parts[0]]] = int(parts[1]) * 1024
    return Memory(**values)


def read_memory(pid: int) -> Memory | None:
    """``None`` when the process is gone (or not ours to read)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            return parse_rollup(fh.read())
    except OSError:
        return None


#: Mapping categories of `breakdown`, first match wins (paths of the host venv and images).
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("cuda", re.compile(r"/nvidia/|/libcu[a-z]*[.-]|/libcudnn|/libnccl|/libnv[A-Za-z]*\.so|"
                        r"/libtorch_cuda|/libc10_cuda|/triton/")),
    ("torch", re.compile(r"/torch/")),
    ("python-ext", re.compile(r"\.so(\.[0-9.]+)?$")),
)


def breakdown(smaps: str) -> dict[str, int]:
    """PSS in bytes per mapping category of ``/proc/<pid>/smaps``: ``cuda`` (NVIDIA/CUDA
    libraries, torch's CUDA parts), ``torch`` (the rest of torch: libtorch_cpu, ...),
    ``python-ext`` (other shared objects), ``file`` (other files), ``anon`` (heap, stacks,
    anonymous mappings); plus ``cuda_mapped`` / ``torch_mapped`` = how many such mappings."""
    out = {"cuda": 0, "torch": 0, "python-ext": 0, "file": 0, "anon": 0,
           "cuda_mapped": 0, "torch_mapped": 0}
    category = "anon"
    for line in smaps.splitlines():
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and not head.endswith(":"):  # a mapping's header line
            parts = line.split(None, 5)
            path = parts[5].strip() if len(parts) == 6 else ""
            category = "anon" if not path.startswith("/") else "file"
            for name, pattern in CATEGORIES:
                if path.startswith("/") and pattern.search(path):
                    category = name
                    break
            if category in ("cuda", "torch"):
                out[f"{category}_mapped"] += 1
        elif head == "Pss:":
            out[category] += int(line.split()[1]) * 1024
    return out


def read_breakdown(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            return breakdown(fh.read())
    except OSError:
        return None


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    cmd: tuple[str, ...]


def list_processes() -> dict[int, Proc]:
    """Every process on the host (pid -> ppid and command line)."""
    procs: dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = tuple(a.decode(errors="replace") for a in fh.read().split(b"\0") if a)
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        procs[int(entry)] = Proc(int(entry), ppid, cmd)
    return procs


def descendants(root: int, procs: Mapping[int, Proc]) -> list[Proc]:
    children: dict[int, list[Proc]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


# --- roles ----------------------------------------------------------------------------------

SIDECAR = "sidecar"
LAUNCHER = "fl launcher"  # `pqfed fl client|aggregator|edge`: the container's entry point
SUPERLINK = "SuperLink"
SERVERAPP_EXEC = "ServerApp SuperExec"
SERVERAPP = "ServerApp"
SUPERNODE = "SuperNode"
CLIENTAPP_EXEC = "ClientApp SuperExec"
ZYGOTE = "ClientApp zygote"
CLIENTAPP = "ClientApp (forked task)"
SHIM = "flwr-clientapp shim"
FLWR_CLI = "flwr CLI (submit, logs)"
OPERATOR = "operator"
SUPEREXEC = "SuperExec"
OTHER = "other"
ROLE_ORDER = (SIDECAR, LAUNCHER, SUPERLINK, SERVERAPP_EXEC, SERVERAPP, FLWR_CLI, SUPERNODE,
              CLIENTAPP_EXEC, ZYGOTE, CLIENTAPP, SHIM, OPERATOR, OTHER)


def _pqfed_args(cmd: Sequence[str]) -> tuple[str, ...] | None:
    """The arguments of a ``pqfed`` command: ``python -m pqfed.cli ARGS`` (pqfed run) or
    ``.../bin/pqfed ARGS`` (the images' entry point), else None."""
    for i, arg in enumerate(cmd[:4]):
        if arg == "pqfed.cli" or Path(arg).name == "pqfed":
            return tuple(cmd[i + 1:])
    return None


def _after(cmd: Sequence[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd and cmd.index(flag) + 1 < len(cmd) else None


def owner_of(cmd: Sequence[str]) -> str | None:
    """The pod a top-level process of ``pqfed run`` stands for (None: not one of them)."""
    args = _pqfed_args(cmd)
    if args is None:
        return None
    if args[:1] == ("sidecar",):
        cert = _after(args, "--cert")
        return Path(cert).parent.name if cert else "sidecar"
    if args[:2] == ("fl", "aggregator"):
        return "aggregator"
    if args[:2] in (("fl", "client"), ("fl", "edge")):
        return f"{'client' if args[1] == 'client' else 'edge'}-{_after(args, '--index')}"
    if args[:2] == ("operator", "run"):
        return "operator"
    return None


def role_of(cmd: Sequence[str], parent_role: str | None) -> str:
    """The role of a process from its command line (and its parent's role: a forked ClientApp
    task has its zygote's command line). Both SuperExecs read ``SUPEREXEC`` here; `classify`
    tells them apart."""
    cmd = tuple(cmd)
    if cmd[1:4] == ("-I", "-S", "-c"):
        return SHIM  # checked first: its inline code mentions flwr-clientapp
    args = _pqfed_args(cmd)
    if args is not None:
        if args[:1] == ("sidecar",):
            return SIDECAR
        if args[:1] == ("fl",):
            return LAUNCHER
        if args[:2] == ("operator", "run"):
            return OPERATOR
    if "pqfed.services.flower" in cmd and "zygote" in cmd:
        return CLIENTAPP if parent_role in (ZYGOTE, CLIENTAPP) else ZYGOTE
    if any(Path(a).name == "flwr" for a in cmd[:2]):
        return FLWR_CLI
    text = " ".join(cmd)
    for script, role in (("flower-superlink", SUPERLINK), ("flower-supernode", SUPERNODE),
                         ("flwr-serverapp", SERVERAPP), ("flwr-clientapp", CLIENTAPP),
                         ("flower-superexec", SUPEREXEC)):
        if script in text:
            return role
    return OTHER


def classify(root: int, procs: Mapping[int, Proc], default_owner: str | None = None
             ) -> dict[int, tuple[str, str]]:
    """pid -> (owner, role) for every descendant of ``root`` (the ``pqfed run`` process);
    processes outside any pqfed command get `default_owner` (None: not sampled)."""
    out: dict[int, tuple[str, str]] = {}
    for p in descendants(root, procs):  # parents come before their children
        parent = out.get(p.ppid)
        owner = (owner_of(p.cmd) or default_owner) if parent is None else parent[0]
        if owner is not None:
            out[p.pid] = (owner, role_of(p.cmd, parent[1] if parent else None))
    # A SuperExec whose Runtime API is its owner's SuperLink launches ServerApps; the one on a
    # SuperNode's Runtime API (clients, an edge's upstream node) launches ClientApps.
    links = {(owner, _after(procs[pid].cmd, "--port")) for pid, (owner, role) in out.items()
             if role == SUPERLINK}
    for pid, (owner, role) in out.items():
        if role == SUPEREXEC:
            address = _after(procs[pid].cmd, "--runtime-api-address") or ""
            on_link = (owner, address.rpartition(":")[2]) in links
            out[pid] = (owner, SERVERAPP_EXEC if on_link else CLIENTAPP_EXEC)
    return out


def owner_kind(owner: str) -> str:
    return owner.rsplit("-", 1)[0] if owner[-1:].isdigit() else owner


# --- sampling -------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    #: [pid, owner, role, pss, pss_anon, pss_file, rss]
    procs: list[list[Any]]


@dataclass
class Recording:
    samples: list[Sample] = field(default_factory=list)
    #: pid -> {owner, role, cmd, first_seen, sightings, breakdown (see `sample_once`)}
    processes: dict[int, dict[str, Any]] = field(default_factory=dict)


def sample_once(root: int, rec: Recording, now: float, mature: bool,
                default_owner: str | None = None) -> None:
    """One sample of every process under `root`. Once `mature` (the first round is done, every
    long-lived process has imported what it will), each process is broken down once by
    mapping (`breakdown`); a forked ClientApp task at its second sighting (it lives for one
    message)."""
    procs = list_processes()
    roles = classify(root, procs, default_owner)
    row: list[list[Any]] = []
    for pid, (owner, role) in roles.items():
        mem = read_memory(pid)
        if mem is None:
            continue
        row.append([pid, owner, role, mem.pss, mem.pss_anon, mem.pss_file, mem.rss])
        info = rec.processes.setdefault(pid, {"owner": owner, "role": role,
                                              "cmd": list(procs[pid].cmd)[:12],
                                              "first_seen": now, "sightings": 0})
        info["sightings"] += 1
        if "breakdown" not in info and (info["sightings"] >= 2 if role == CLIENTAPP
                                        else mature):
            b = read_breakdown(pid)
            if b is not None:
                info["breakdown"] = b
    rec.samples.append(Sample(now, row))


# --- summaries ------------------------------------------------------------------------------


def role_series(samples: Iterable[Sample]) -> dict[tuple[str, str], list[tuple[float, int]]]:
    """(owner, role) -> [(t, summed PSS of that owner's processes of that role)], only samples
    where the role had a process. ``(federation, total)`` = every process; role ``pod`` = all
    of the owner's processes (with the owner's sidecar for clients, aggregator and edges: the
    pod), ``container`` = the pod without its sidecar."""
    series: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for s in samples:
        sums: dict[tuple[str, str], int] = {("federation", "total"): 0}
        for _pid, owner, role, pss, *_ in s.procs:
            sums["federation", "total"] += pss
            for key in ((owner, role), (owner, "pod")) + \
                    (((owner, "container"),) if role != SIDECAR else ()):
                sums[key] = sums.get(key, 0) + pss
        for key, value in sums.items():
            series.setdefault(key, []).append((s.t, value))
    return series


def summarize_run(rec: Recording, steady_from: float | None) -> dict[str, dict[str, Any]]:
    """kind/role -> {steady, peak (bytes), owners}: per owner the median over the steady
    window (samples at or after `steady_from`) and the maximum over the run; across owners of
    one kind the median of the steadies and the maximum of the peaks."""
    per: dict[str, dict[str, list[float]]] = {}
    for (owner, role), points in role_series(rec.samples).items():
        kind = owner_kind(owner)
        steady_pts = [v for t, v in points if steady_from is None or t >= steady_from]
        entry = per.setdefault(f"{kind}/{role}", {"steady": [], "peak": []})
        if steady_pts:
            entry["steady"].append(statistics.median(steady_pts))
        entry["peak"].append(max(v for _, v in points))
    return {key: {"steady": statistics.median(v["steady"]) if v["steady"] else None,
                  "peak": max(v["peak"]), "owners": len(v["peak"])}
            for key, v in per.items()}


def role_breakdowns(rec: Recording) -> dict[str, dict[str, float]]:
    """kind/role -> median over its processes of each `breakdown` category (bytes)."""
    groups: dict[str, list[dict[str, int]]] = {}
    for info in rec.processes.values():
        if "breakdown" in info:
            groups.setdefault(f"{owner_kind(info['owner'])}/{info['role']}", []).append(
                info["breakdown"])
    return {key: {cat: float(statistics.median(b[cat] for b in bs)) for cat in bs[0]}
            for key, bs in groups.items()}


def spread(values: Sequence[float | None]) -> dict[str, float] | None:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# --- one federation -------------------------------------------------------------------------


def job_manifest(clients: int, rounds: int, edges: int = 0) -> dict[str, Any]:
    """The measured job: breast-cancer, 1 local epoch, top-k + int8 (the issue's setting)."""
    from pqfed.services import API_GROUP_VERSION, KIND

    spec: dict[str, Any] = {
        "task": "breast-cancer", "clients": clients, "minClients": clients, "rounds": rounds,
        "training": {"localEpochs": 1},
        "compression": {"method": "topk+int8", "topkFraction": 0.1}}
    if edges:
        spec["hierarchy"] = {"enabled": True, "edges": edges}
    name = f"footprint-{clients}c" + (f"-{edges}e" if edges else "")
    return {"apiVersion": API_GROUP_VERSION, "kind": KIND,
            "metadata": {"name": name}, "spec": spec}


def tree_env(tree: Path) -> dict[str, str]:
    """This interpreter's environment with `tree`'s sources first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree / "src"),
                                                    env.get("PYTHONPATH", "")) if p)
    return env


def job_progress(run_root: Path) -> tuple[int, bool]:
    """(completed rounds, finished) from the aggregator's status file of the run."""
    for status in run_root.glob("*/state/aggregator/status.json"):
        try:
            st = json.loads(status.read_text())
        except (OSError, ValueError):  # being replaced
            return 0, False
        return len(st.get("rounds", [])), st.get("phase") in ("Succeeded", "Failed")
    return 0, False


def run_federation(tree: Path, job: dict[str, Any], out: Path, interval: float,
                   timeout: float) -> dict[str, Any]:
    """One ``pqfed run`` of `job` with `tree`'s sources, sampled until it ends."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    job_file = out / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    rec = Recording()
    steady_from: float | None = None
    steady_to: float | None = None
    with (out / "pqfed-run.log").open("wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "pqfed.cli", "run", str(job_file), "--out", str(out / "runs")],
            cwd=tree, env=tree_env(tree), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        t0 = time.time()
        try:
            deadline = time.monotonic() + timeout
            while popen.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pqfed run did not end within {timeout:.0f}s")
                tick = time.monotonic()
                if steady_to is None:  # after the job: only the shutdown, not sampled
                    sample_once(popen.pid, rec, time.time(), steady_from is not None)
                    done, finished = job_progress(out / "runs")
                    if done and steady_from is None:
                        steady_from = time.time()
                    if finished:
                        steady_to = time.time()
                time.sleep(max(0.0, interval - (time.monotonic() - tick)))
        finally:
            if popen.poll() is None:
                from pqfed.services import terminate_process_tree

                terminate_process_tree(popen.pid, timeout=15)
    if popen.returncode != 0:
        tail = (out / "pqfed-run.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"pqfed run failed ({popen.returncode}):\n{tail}")
    return {"tree": str(tree), "wall_s": time.time() - t0, "steady_from": steady_from,
            "steady_to": steady_to,
            "samples": len(rec.samples), "roles": summarize_run(rec, steady_from),
            "breakdowns": role_breakdowns(rec),
            "processes": {str(pid): info for pid, info in rec.processes.items()}}


def git_describe(tree: Path) -> str:
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", ".",
                            ":!results"], capture_output=True, text=True,
                           check=False).stdout.strip()
    return (head or "unknown") + ("+dirty" if dirty else "")


# --- a client pod in the arm64 fl image, under qemu-user ------------------------------------


def unpack_image(archive: Path, dest: Path) -> tuple[Path, dict[str, Any]]:
    """The root filesystem and config of the single-platform OCI archive `archive`."""
    import gzip
    import tarfile

    rootfs = dest / "rootfs"
    with tarfile.open(archive) as tar:
        def blob(digest: str) -> bytes:
            member = tar.extractfile("blobs/sha256/" + digest.split(":", 1)[1])
            assert member is not None
            return member.read()

        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        if not rootfs.is_dir():
            partial = dest / "rootfs.partial"
            partial.mkdir(parents=True, exist_ok=True)
            for layer in manifest["layers"]:
                raw = tar.extractfile("blobs/sha256/" + layer["digest"].split(":", 1)[1])
                with gzip.GzipFile(fileobj=raw) as gz, tarfile.open(fileobj=gz, mode="r|") as lt:
                    # our own image (make images), unpacked like tests/images does
                    lt.extractall(partial, filter="fully_trusted")  # noqa: S202
            partial.rename(rootfs)
    return rootfs, config


def qemu_share(smaps: str) -> int:
    """PSS (bytes) of what is qemu-user's own in an emulated process: the emulator's binary,
    its brk heap (the guest's brk is emulated elsewhere) and the translated-code buffer (an
    anonymous read-write-execute mapping; guest code is never mapped writable and executable
    here). qemu's other anonymous allocations (page-flag tables, translation hash tables)
    cannot be told apart from the guest's, so `pss - qemu_share` is an upper bound of what the
    same process would use natively."""
    own = 0
    counting = False
    for line in smaps.splitlines():
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            parts = line.split(None, 5)
            path = parts[5].strip() if len(parts) == 6 else ""
            counting = "qemu" in path or path == "[heap]" or (
                parts[1].startswith("rwx") and not path.startswith("/"))
        elif head == "Pss:" and counting:
            own += int(line.split()[1]) * 1024
    return own


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def arm64_client_pod(archive: Path, tree: Path, work: Path, seconds: float,
                     interval: float) -> dict[str, Any]:
    """One client pod (`pqfed fl client` + its sidecar) in the arm64 fl image, with `tree`'s
    sources first on PYTHONPATH, run under qemu-user (binfmt_misc) in its own network
    namespace for `seconds` after its ClientApp zygote is up. There is no SuperLink: the
    SuperNode retries it, so this is the pod idle between rounds, with the zygote's warm-up
    (one training step per task) inside its peak; a forked task's own pages are measured on
    x86."""
    import shutil

    import yaml

    from pqfed.pqc import CertificateAuthority, Role

    rootfs, config = unpack_image(archive, work)
    guest = Path("/opt/footprint") / tree.name
    src = rootfs / guest.relative_to("/")
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(tree / "src" / "pqfed", src / "pqfed", symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    ca = CertificateAuthority.generate("footprint-arm64")
    ident = ca.new_identity("client-0", Role.CLIENT)
    ident_dir = src / "identity"
    ident_dir.mkdir()
    ident.save(ident_dir / "tls.crt", ident_dir / "tls.key")
    (ident_dir / "ca.crt").write_text(ca.root.to_pem())
    (src / "job.yaml").write_text(yaml.safe_dump(job_manifest(3, 4)))
    env = " ".join(f"{k}={v}" for k, v in (e.split("=", 1) for e in config["config"]["Env"])
                   if k != "PYTHONPATH")
    pqfed = " ".join(config["config"].get("Entrypoint") or ["pqfed"])
    gid = guest / "identity"
    # The image has no coreutils `env`: the host's clears the environment, the image's shell
    # sets the image's.
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    bindir = str(Path(pqfed).parent)
    python = f"{bindir}/python3"
    preload = " ".join(f"--preload {m}" for m in ZYGOTE_PRELOAD)
    script = (
        f"mkdir -p {rootfs}/dev {rootfs}/proc {rootfs}/sys && "
        f"mount --rbind /dev {rootfs}/dev && mount -t proc proc {rootfs}/proc && "
        f"mount --rbind /sys {rootfs}/sys && "  # torch's cpuinfo reads /sys/devices/system/cpu
        f"ip link set lo up && exec env -i {chroot} {rootfs} /bin/sh -c '"
        f"export {env} HOME=/tmp PYTHONPATH={guest} PYTHONDONTWRITEBYTECODE=1; "
        f"{pqfed} sidecar --cert {gid}/tls.crt --key {gid}/tls.key --ca {gid}/ca.crt "
        "--route 127.0.0.1:19092=127.0.0.1:7443@aggregator --admin 127.0.0.1:9901 "
        "--log-level warning & "
        f"{python} -m pqfed.services.flower exec --poll-cap 0.1 flower-supernode -- "
        "--insecure --isolation process --superlink 127.0.0.1:19092 --host 127.0.0.1 "
        "--port 9094 & "
        f"{bindir}/flower-superexec --insecure --runtime-api-address 127.0.0.1:9094 & "
        f"PQFED_WARM_SPEC={guest}/job.yaml PQFED_WARM_PARTITION=0 exec {python} -m "
        f"pqfed.services.flower zygote --socket /tmp/clientapp.sock {preload} --poll-cap 0.1'"
    )
    (rootfs / "tmp").mkdir(exist_ok=True)
    state = rootfs / "tmp" / "state"
    if state.exists():
        shutil.rmtree(state)
    rec = Recording()
    log_path = work / f"arm64-{tree.name}.log"
    with log_path.open("wb") as log:
        # its own network and mount namespaces (the mounts vanish with it), like a pod
        popen = subprocess.Popen(["unshare", "--net", "--mount", "--fork", "sh", "-c", script],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t0 = time.monotonic()
            ready: float | None = None
            ready_wall = time.time()
            while popen.poll() is None:
                now = time.monotonic()
                if ready is None and b"zygote for" in _read_bytes(log_path):
                    ready, ready_wall = now, time.time()
                if ready is not None and now - ready > seconds:
                    break
                if now - t0 > seconds + 900:
                    raise TimeoutError("the arm64 client pod's zygote was not ready in 900 s")
                sample_once(popen.pid, rec, time.time(), ready is not None, "client-0")
                time.sleep(max(0.0, interval - (time.monotonic() - now)))
            if popen.poll() is not None:
                raise RuntimeError(f"the arm64 client pod exited: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            qemu: dict[str, int] = {}
            for pid in rec.processes:
                try:
                    with open(f"/proc/{pid}/smaps") as fh:
                        qemu[str(pid)] = qemu_share(fh.read())
                except OSError:
                    continue
        finally:
            from pqfed.services import terminate_process_tree

            terminate_process_tree(popen.pid, timeout=15)
    roles = summarize_run(rec, ready_wall)
    last = rec.samples[-1].procs if rec.samples else []
    qemu_total = sum(qemu.get(str(p[0]), 0) for p in last)
    return {"tree": str(tree), "roles": roles, "qemu_own_last_sample": qemu_total,
            "pss_last_sample": sum(p[3] for p in last),
            "processes": {str(pid): {**info, "qemu_own": qemu.get(str(pid))}
                          for pid, info in rec.processes.items()}}


# --- the warm ClientApp alone ---------------------------------------------------------------

ZYGOTE_PRELOAD = ("torch", "pqfed.services.clientapp", "pqfed.services.models",
                  "pqfed.services.data", "pqfed.services.warmup")  # services/fl_node.PRELOAD


def zygote_alone(tree: Path, work: Path, timeout: float = 600) -> dict[str, Any]:
    """A client's warm ClientApp process with `tree`'s sources, started alone (no federation,
    so no other process shares its anonymous pages), measured once it is ready."""
    import shutil

    from pqfed.services import terminate_process_tree

    work.mkdir(parents=True, exist_ok=True)
    sock = work / "zygote.sock"
    argv = [sys.executable, "-m", "pqfed.services.flower", "zygote", "--socket", str(sock)]
    for module in ZYGOTE_PRELOAD:
        argv += ["--preload", module]
    log_path = work / "zygote.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(argv, cwd=tree, env=tree_env(tree), stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while b"ready on" not in _read_bytes(log_path):
                if popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"zygote did not start: {_read_bytes(log_path)[-2000:]!r}")
                time.sleep(0.2)
            time.sleep(1.0)
            mem = read_memory(popen.pid)
            with open(f"/proc/{popen.pid}/smaps") as fh:
                parts = breakdown(fh.read())
        finally:
            terminate_process_tree(popen.pid, timeout=10)
            shutil.rmtree(work, ignore_errors=True)
    assert mem is not None
    return {"tree": str(tree), **asdict(mem), "breakdown": parts}


# --- the operator --------------------------------------------------------------------------


def operator_process(tree: Path, work: Path, seconds: float, interval: float,
                     job_file: Path | None) -> dict[str, Any]:
    """A real operator process (`pqfed operator run`, kopf) with `tree`'s sources against a
    private control plane (testbed/cluster/up.sh, no nodes): sampled `seconds` idle, then
    `seconds` more after a FederationJob is submitted (it plans and creates the job's
    objects; with no node its pods stay Pending)."""
    import shutil

    from pqfed.services import free_ports, terminate_process_tree
    from pqfed.testbed.testing import cluster_env

    scripts = Path(__file__).resolve().parents[1] / "cluster"
    cluster = work / "cluster"
    env = {**tree_env(tree), **cluster_env(cluster, [])}
    env.pop("KUBECONFIG", None)
    subprocess.run(["bash", str(scripts / "up.sh")], env=env, check=True, capture_output=True,
                   timeout=600)
    kubeconfig = str(cluster / "kubeconfig")
    rec = Recording()
    try:
        import kubernetes
        from kubernetes import utils

        api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
        for crd in sorted((tree / "charts" / "pqfed" / "crds").glob("*.yaml")):
            utils.create_from_yaml(api, str(crd))
        (metrics,) = free_ports(1)
        with (work / "operator.log").open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "pqfed.cli", "operator", "run", "--kubeconfig",
                 kubeconfig, "--all-namespaces", "--standalone", "--metrics-port", str(metrics),
                 "--log-level", "warning"], cwd=tree, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
            try:
                t0 = time.monotonic()
                submitted = False
                steady_from = time.time() + 10.0  # start-up: imports, first watch
                while time.monotonic() - t0 < 2 * seconds:
                    if popen.poll() is not None:
                        tail = _read_bytes(work / "operator.log")[-2000:]
                        raise RuntimeError(f"operator exited: {tail!r}")
                    tick = time.monotonic()
                    sample_once(os.getpid(), rec, time.time(), time.time() > steady_from)
                    if not submitted and job_file and tick - t0 > seconds:
                        subprocess.run([sys.executable, "-m", "pqfed.cli", "submit", "--kubeconfig",
                                        kubeconfig, "-n", "default", str(job_file)], env=env,
                                       cwd=tree, check=True, capture_output=True, timeout=120)
                        submitted = True
                    time.sleep(max(0.0, interval - (time.monotonic() - tick)))
            finally:
                terminate_process_tree(popen.pid, timeout=15)
    finally:
        subprocess.run(["bash", str(scripts / "down.sh"), "--wipe"], env=env, check=False,
                       capture_output=True, timeout=300)
        shutil.rmtree(work, ignore_errors=True)
    return {"tree": str(tree), "roles": summarize_run(rec, steady_from),
            "processes": {str(pid): info for pid, info in rec.processes.items()
                          if info["owner"] == "operator"}}


# --- the benchmark --------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    trees: tuple[Path, ...]
    clients: tuple[int, ...]
    runs: int
    rounds: int
    edges: int
    interval: float
    timeout: float
    out: Path
    steps: tuple[str, ...] = ("federation", "arm64")
    arm64_image: Path | None = None
    arm64_seconds: float = 60.0


def federation_runs(s: Settings) -> dict[str, Any]:
    """Every (clients, tree) cell `runs` times; trees alternate within each repetition, the
    first tree of a repetition rotating, so slow drift of the host hits all trees alike."""
    configs = [(c, 0) for c in s.clients] + ([(max(s.clients), s.edges)] if s.edges else [])
    cells: dict[str, list[dict[str, Any]]] = {}
    for clients, edges in configs:
        for rep in range(s.runs):
            order = list(s.trees[rep % len(s.trees):]) + list(s.trees[:rep % len(s.trees)])
            for tree in order:
                label = f"{clients}c{f'-{edges}e' if edges else ''}/{tree.name or tree}"
                out = s.out / "runs" / f"{clients}c{edges}e-{tree.name}-{rep}"
                print(f"footprint: {label} run {rep + 1}/{s.runs}", file=sys.stderr, flush=True)
                result = run_federation(tree, job_manifest(clients, s.rounds, edges), out,
                                        s.interval, s.timeout)
                cells.setdefault(label, []).append(result)
                # a run cut short still leaves every completed federation on disk
                (s.out / "results.partial.json").write_text(json.dumps(cells, default=str))
    return cells


def aggregate(cells: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """cell -> kind/role -> {steady, peak}: median and min-max over the runs (bytes)."""
    out: dict[str, Any] = {}
    for label, runs in cells.items():
        keys = sorted({k for r in runs for k in r["roles"]})
        out[label] = {k: {"steady": spread([r["roles"].get(k, {}).get("steady") for r in runs]),
                          "peak": spread([r["roles"].get(k, {}).get("peak") for r in runs])}
                      for k in keys}
    return out


def _mib(cell: Mapping[str, float] | None) -> str:
    if not cell:
        return "-"
    m, lo, hi = (cell[k] / MIB for k in ("median", "min", "max"))
    return f"{m:.0f} ({lo:.0f}-{hi:.0f})"


def _row_order(key: str) -> tuple[int, int, str]:
    kind, _, role = key.partition("/")
    kinds = ("federation", "client", "aggregator", "edge", "operator")
    roles = ("total", "pod", "container", *ROLE_ORDER)
    return (kinds.index(kind) if kind in kinds else 9,
            roles.index(role) if role in roles else 99, key)


def bootstrap_difference(before: Sequence[float], after: Sequence[float],
                         resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """after - before: difference of the means and its 95% bootstrap interval (runs
    resampled with replacement within each side)."""
    import random

    rng = random.Random(seed)
    diffs = sorted(statistics.fmean(rng.choices(after, k=len(after)))
                   - statistics.fmean(rng.choices(before, k=len(before)))
                   for _ in range(resamples))
    return (statistics.fmean(after) - statistics.fmean(before),
            diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples) - 1])


def compare(results: Mapping[str, Any], before: str, after: str) -> str:
    """Markdown: per pod/role the steady PSS of two cells (the same federation with two
    trees), and after - before with its 95% bootstrap interval over runs (MiB)."""
    cells = results["cells"]
    rows = ["| pod / role | before: steady MiB | after: steady MiB | after - before, MiB "
            "(95% bootstrap CI) | before: peak MiB | after: peak MiB |",
            "|---|---|---|---|---|---|"]
    keys = sorted({k for r in [*cells[before], *cells[after]] for k in r["roles"]},
                  key=_row_order)
    agg = results["aggregate"]
    for key in keys:
        b = [r["roles"][key]["steady"] / MIB for r in cells[before]
             if r["roles"].get(key, {}).get("steady") is not None]
        a = [r["roles"][key]["steady"] / MIB for r in cells[after]
             if r["roles"].get(key, {}).get("steady") is not None]
        diff = "-"
        if a and b:
            d, lo, hi = bootstrap_difference(b, a)
            diff = f"{d:+.1f} ({lo:+.1f} to {hi:+.1f})"
        rows.append(f"| {key} | {_mib(agg[before].get(key, {}).get('steady'))} | "
                    f"{_mib(agg[after].get(key, {}).get('steady'))} | {diff} | "
                    f"{_mib(agg[before].get(key, {}).get('peak'))} | "
                    f"{_mib(agg[after].get(key, {}).get('peak'))} |")
    return "\n".join(rows) + "\n"


def render(results: Mapping[str, Any]) -> str:
    """Markdown tables (MiB of PSS: median (min-max) over runs) for docs/BENCHMARKS.md."""
    lines: list[str] = []
    agg = results["aggregate"]
    for label in agg:
        lines += [f"#### {label}", "",
                  "| pod / role | steady PSS MiB | peak PSS MiB | torch / CUDA libs mapped |",
                  "|---|---|---|---|"]
        runs = results["cells"][label]
        for key in sorted(agg[label], key=_row_order):
            bd = [r.get("breakdowns", {}).get(key) for r in runs
                  if r.get("breakdowns", {}).get(key)]
            libs = "-"
            if bd:
                b = bd[0]
                libs = (f"{b['torch'] / MIB:.0f} / {b['cuda'] / MIB:.0f} MiB "
                        f"({b['torch_mapped']:.0f} / {b['cuda_mapped']:.0f} maps)"
                        if b["torch_mapped"] or b["cuda_mapped"] else "none")
            lines.append(f"| {key} | {_mib(agg[label][key]['steady'])} | "
                         f"{_mib(agg[label][key]['peak'])} | {libs} |")
        lines.append("")
    trees = [Path(t).name for t in results["settings"]["trees"]]
    if len(trees) == 2:
        for label in list(agg):
            config, _, tree = label.partition("/")
            if tree == trees[0] and f"{config}/{trees[1]}" in agg:
                lines += [f"#### {config}: {trees[0]} (before) vs {trees[1]} (after)", "",
                          compare(results, label, f"{config}/{trees[1]}")]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    trees = tuple(Path(t).resolve() for t in args.trees.split(",") if t)
    for tree in trees:
        if not (tree / "src" / "pqfed").is_dir():
            raise ValueError(f"--trees: {tree} has no src/pqfed; give checkouts of pqfed")
    clients = tuple(int(c) for c in args.clients.split(",") if c)
    if not clients or min(clients) < 2:
        raise ValueError("--clients: give client counts of at least 2, e.g. 3,10")
    if args.runs < 1:
        raise ValueError("--runs: at least 1 (3 or more to report a spread)")
    steps = tuple(x for x in args.only.split(",") if x)
    if not steps or set(steps) - {"federation", "arm64", "zygote", "operator"}:
        raise ValueError(f"--only {args.only!r}: choose from federation,arm64,zygote,operator")
    image = Path(args.arm64_image) if args.arm64_image else None
    if "arm64" in steps and (image is None or not image.is_file()):
        raise ValueError(f"--arm64-image {args.arm64_image!r}: give the arm64 fl image's OCI "
                         "archive (dist/images/pqfed-fl-<version>-arm64.oci.tar, make images)"
                         " or leave arm64 out of --only")
    s = Settings(trees, clients, args.runs, args.rounds, args.edges, args.interval,
                 args.timeout, Path(args.out), steps, image, args.arm64_seconds)
    s.out.mkdir(parents=True, exist_ok=True)
    from pqfed.testbed.bench.common import host_info

    t0 = time.time()
    cells = federation_runs(s) if "federation" in s.steps else {}
    arm64: dict[str, list[dict[str, Any]]] = {}
    if "arm64" in s.steps and s.arm64_image is not None:
        for rep in range(s.runs):
            for tree in list(trees[rep % len(trees):]) + list(trees[:rep % len(trees)]):
                print(f"footprint: arm64 client pod/{tree.name} run {rep + 1}/{s.runs}",
                      file=sys.stderr, flush=True)
                arm64.setdefault(f"arm64 client pod/{tree.name}", []).append(arm64_client_pod(
                    s.arm64_image, tree, s.out / "arm64", s.arm64_seconds, s.interval))
    cells.update(arm64)
    if "operator" in s.steps:
        job = s.out / "operator-job.yaml"
        s.out.mkdir(parents=True, exist_ok=True)
        import yaml

        job.write_text(yaml.safe_dump(job_manifest(3, 3)))
        for rep in range(s.runs):
            for tree in list(trees[rep % len(trees):]) + list(trees[:rep % len(trees)]):
                print(f"footprint: operator/{tree.name} run {rep + 1}/{s.runs}",
                      file=sys.stderr, flush=True)
                cells.setdefault(f"operator/{tree.name}", []).append(operator_process(
                    tree, s.out / "operator" / f"{tree.name}-{rep}", 30.0, s.interval, job))
    if "zygote" in s.steps:
        zygotes: dict[str, list[dict[str, Any]]] = {}
        for rep in range(s.runs):
            for tree in list(trees[rep % len(trees):]) + list(trees[:rep % len(trees)]):
                zygotes.setdefault(tree.name, []).append(
                    zygote_alone(tree, s.out / "zygote" / f"{tree.name}-{rep}"))
        (s.out / "zygote.json").write_text(json.dumps(zygotes, indent=1))
        for name, rows in zygotes.items():
            print(f"zygote alone, {name}: PSS " + ", ".join(
                f"{r['pss'] / MIB:.1f}" for r in rows) + " MiB; anonymous " + ", ".join(
                f"{r['pss_anon'] / MIB:.1f}" for r in rows) + " MiB")
    results = {"schema": SCHEMA, "settings": {**asdict(s), "trees": [str(t) for t in trees],
                                              "out": str(s.out)},
               "trees": {str(t): git_describe(t) for t in trees},
               "command": ["pqfed", *sys.argv[sys.argv.index("bench-footprint"):]]
               if "bench-footprint" in sys.argv else None,
               "host": host_info(), "duration_s": time.time() - t0,
               "cells": cells, "aggregate": aggregate(cells)}
    (s.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report = render(results)
    (s.out / "report.md").write_text(report)
    print(report)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/bench-scale/footprint", help="output directory")
    p.add_argument("--trees", default=".",
                   help="comma list of pqfed checkouts to compare, alternating (default: .)")
    p.add_argument("--clients", default="3,10", help="client counts (default 3,10)")
    p.add_argument("--runs", type=int, default=3, help="runs per cell (default 3)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per run (default 4)")
    p.add_argument("--edges", type=int, default=0,
                   help="also run the largest client count with this many edges (default 0)")
    p.add_argument("--only", default="federation",
                   help="comma list of steps: federation (pqfed run), arm64 (a client pod in "
                        "the arm64 fl image under qemu; needs --arm64-image), zygote (the "
                        "warm ClientApp process alone)")
    p.add_argument("--arm64-image", default="",
                   help="the arm64 fl image's OCI archive, e.g. "
                        "dist/images/pqfed-fl-0.1.0-arm64.oci.tar")
    p.add_argument("--arm64-seconds", type=float, default=60.0,
                   help="seconds to sample the arm64 pod once its zygote is up")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    p.add_argument("--timeout", type=float, default=900, help="seconds per federation")
    p.set_defaults(func=run)
