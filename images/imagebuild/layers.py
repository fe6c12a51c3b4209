"""Reproducible layers: a tree packed as a gzip'd tar with sorted entries, owner 0
(10001 under /home/pqfed), mtimes clamped to the commit time and no gzip timestamp, and
the cached stages (one or more layers plus the packages they hold) keyed by their inputs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imagebuild.project import (
    UID,
    log,
    sha256_file,
)

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


@dataclass
class Stage:
    layers: list[Layer]
    packages: list[dict[str, str]] = field(default_factory=list)


def cached_stage(path: Path) -> Stage | None:
    meta = path / "stage.json"
    if not meta.is_file():
        return None
    d = json.loads(meta.read_text())
    layers = [Layer.from_json(x) for x in d["layers"]]
    if not all(layer.blob.is_file() for layer in layers):
        return None
    return Stage(layers, d["packages"])


def open_stage(where: Path, label: str) -> Stage | None:
    """The stage cached at `where` (logged as `label: cached`), or None after making the
    directory the stage will be saved in."""
    if (hit := cached_stage(where)) is not None:
        log(f"{label}: cached ({where.name})")
        return hit
    where.mkdir(parents=True, exist_ok=True)
    return None


def save_stage(path: Path, stage: Stage) -> Stage:
    (path / "stage.json").write_text(json.dumps(
        {"layers": [x.to_json() for x in stage.layers], "packages": stage.packages}, indent=1))
    return stage
