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
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This tree's pqfed package (the OCI layout writer, the cache location), not another
# checkout's installed one; the build's steps are in images/imagebuild.
sys.path.insert(0, str(ROOT / "src"))
from imagebuild.app import build_app, build_wheel  # noqa: E402
from imagebuild.debian import build_base  # noqa: E402
from imagebuild.oci import assemble, ref, write_archive  # noqa: E402
from imagebuild.project import (  # noqa: E402
    ARCHES,
    FORMAT,
    IMAGES,
    BuildError,
    digest_of,
    log,
    project,
    sha256_file,
    source_files,
)
from imagebuild.python_deps import build_deps  # noqa: E402
from imagebuild.sbom import spdx  # noqa: E402

from pqfed.cache import cache_dir  # noqa: E402

# The build's own code: a change to it rebuilds the archives.
BUILD_CODE = (Path(__file__), *sorted((ROOT / "images/imagebuild").glob("*.py")))


def build(out: Path, cache: Path, images: list[str], arches: list[str],
          jobs: int) -> dict[str, object]:
    start = time.monotonic()
    p = project()
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp_key = digest_of(FORMAT, p, [(str(f.relative_to(ROOT)), sha256_file(f))
                                      for f in source_files()],
                          [sha256_file(f) for f in BUILD_CODE], images, arches)
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
