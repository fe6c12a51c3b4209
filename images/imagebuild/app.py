"""The ``app`` layer: the pqfed wheel built from the working tree, its ``pqfed`` command
and the liboqs shared library `make liboqs` built for the architecture."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from imagebuild.layers import Stage, compile_pyc, open_stage, save_stage, write_layer
from imagebuild.project import (
    FORMAT,
    LIBOQS_IN_IMAGE,
    LIBOQS_VERSION,
    ROOT,
    SITE,
    BuildError,
    Project,
    digest_of,
    log,
    run,
    sha256_file,
    source_files,
)
from imagebuild.python_deps import console_scripts_and_metadata


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
    if (hit := open_stage(where, f"app {arch}")) is not None:
        return hit
    with tempfile.TemporaryDirectory(dir=cache, prefix="tmp-app-") as tmp:
        tree = Path(tmp) / "root"
        site = tree / SITE
        site.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
        packages = console_scripts_and_metadata(tree, site)
        shutil.copyfile(liboqs, tree / LIBOQS_IN_IMAGE)
        # C sources bundled by crates.io's oqs-sys 0.11.0, built by pqc/native/build-liboqs.sh.
        packages.append({"name": "liboqs", "version": LIBOQS_VERSION, "license": "MIT",
                         "license_classifiers": "", "homepage": "https://openquantumsafe.org"})
        compile_pyc(tree, SITE)
        layer = write_layer(tree, where / "blob", p.epoch, f"pqfed {p.version} ({wheel.name})")
    return save_stage(where, Stage([layer], packages))
