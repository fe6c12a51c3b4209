"""The OCI archives both image writers produce, byte for byte, without building an image.

images/build.py (the operator, sidecar and fl images) and testbed/ociimage.py (the real
node's sandbox and test images) write their archives with one OCI layout writer. Image
digests are what a cluster pins and pulls by, so the bytes must not change when the code
around them does: each case builds a small archive from fixed inputs and compares its SHA-256
with the one the writers produced before they shared code. A change that alters a single byte
(an entry's order, mode or mtime, JSON spacing, a descriptor field) fails here.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from pqfed.testbed.ociimage import ImageSpec, build, parse_dir, parse_file, parse_symlink

ROOT = Path(__file__).resolve().parents[2]
EPOCH = 1_700_000_000


def _images_build() -> SimpleNamespace:
    """The parts of images/build.py's build this test drives (images/imagebuild, imported as
    the build script imports it: from the images folder)."""
    sys.path.insert(0, str(ROOT / "images"))
    try:
        layers = importlib.import_module("imagebuild.layers")
        oci = importlib.import_module("imagebuild.oci")
        project = importlib.import_module("imagebuild.project")
    finally:
        sys.path.remove(str(ROOT / "images"))
    return SimpleNamespace(write_layer=layers.write_layer, Stage=layers.Stage,
                           Project=project.Project, assemble=oci.assemble,
                           write_archive=oci.write_archive)


def _tree(root: Path) -> Path:
    files = {"opt/pqfed/bin/pqfed": (b"#!/bin/sh\nexec python3 -m pqfed.cli \"$@\"\n", 0o755),
             "opt/pqfed/lib/app.py": (b"print('hello')\n", 0o644),
             "home/pqfed/.keep": (b"", 0o644)}
    for rel, (data, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    (root / "opt/pqfed/bin/python3").symlink_to("/usr/bin/python3.11")
    for d in sorted({p for p in root.rglob("*") if p.is_dir()}):
        d.chmod(0o755)
    return root


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    b = _images_build()
    work = tmp_path_factory.mktemp("oci")
    layer = b.write_layer(_tree(work / "tree"), work / "layers" / "app.tar.gz", EPOCH, "app")
    stage = b.Stage([layer])
    p = b.Project("0.1.0", "0" * 40, EPOCH, False, (), {})
    plats = [b.assemble(p, "sidecar", arch, [stage]) for arch in ("amd64", "arm64")]
    out = {"multi": work / "multi.oci.tar", "single": work / "single.oci.tar"}
    b.write_archive(out["multi"], p, "sidecar", plats)
    b.write_archive(out["single"], p, "sidecar", plats[:1])
    binary = work / "pause"
    binary.write_bytes(b"\x7fELF pause")
    binary.chmod(0o755)
    spec = ImageSpec(name="localhost/pqfed/pause:3.10",
                     entries=[parse_file(f"{binary}:/pause:0755"), parse_dir("/etc:0755"),
                              parse_symlink("/bin/sh:/pause")],
                     entrypoint=["/pause"], user="65535:65535", env=["A=1"],
                     architecture="arm64", annotations={"org.example": "x"})
    out["testbed"] = work / "pause.oci.tar"
    out["testbed"].write_bytes(build(spec))
    return out


# SHA-256 of each archive as the writers wrote it before they shared the layout writer.
# gzip output depends on the zlib build: the values hold for the zlib they were taken with.
GOLDEN_ZLIB = "1.2.13"
GOLDEN = {
    "multi": "bc6ba5e0b4e98ebb8f5efe030c2463a62a822f3b5ee37547251ba4bcc8af1cae",
    "single": "4b81c83c2af3f1d0d25af1908d138228d5ee54d252f7c0a167070d3d8d11beda",
    "testbed": "cc80bbbbf30e2e278a51513e27e0a6fa6058d72dffc0bc82182b819d16e4b28b",
}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_archive_bytes_are_unchanged(archives: dict[str, Path], case: str) -> None:
    if zlib.ZLIB_RUNTIME_VERSION != GOLDEN_ZLIB:
        pytest.skip(f"zlib {zlib.ZLIB_RUNTIME_VERSION}, the digests were taken with {GOLDEN_ZLIB}")
    assert _sha256(archives[case]) == GOLDEN[case]


def test_the_archives_are_oci_layouts(archives: dict[str, Path]) -> None:
    for path in archives.values():
        with tarfile.open(path) as tar:
            names = tar.getnames()
            assert names[:2] == ["blobs", "blobs/sha256"]
            layout = tar.extractfile("oci-layout")
            assert layout is not None
            assert json.loads(layout.read()) == {"imageLayoutVersion": "1.0.0"}
            for m in tar.getmembers():
                if m.name.startswith("blobs/sha256/"):
                    f = tar.extractfile(m)
                    assert f is not None
                    assert hashlib.sha256(f.read()).hexdigest() == m.name.rsplit("/", 1)[1]
