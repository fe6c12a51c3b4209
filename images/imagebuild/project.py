"""What the image build is made of: the images, architectures, Debian packages and
environment it puts in them, the project facts (version, commit, dependencies) read
from the tree, and the small helpers every step uses (logging, commands, digests)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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
