"""testbed/ociimage.py: the OCI image archives of the real node's sandbox and test images."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from pqfed.testbed.ociimage import ImageSpec, ImageSpecError, build, main, parse_file


def _members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
                for m in tar.getmembers()}


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    path = tmp_path / "pause"
    path.write_bytes(b"\x7fELF not really a binary")
    path.chmod(0o755)
    return path


def _spec(binary: Path, name: str = "localhost/pqfed/pause:1") -> ImageSpec:
    return ImageSpec(name=name, entries=[parse_file(f"{binary}:/bin/pause:0755")],
                     entrypoint=["/bin/pause"], user="65535:65535", architecture="arm64")


def test_layout_is_valid_and_digests_match(binary: Path) -> None:
    files = _members(build(_spec(binary)))
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():
        if name.startswith("blobs/sha256/") and data:
            assert name.rsplit("/", 1)[1] == hashlib.sha256(data).hexdigest()
    index = json.loads(files["index.json"])
    (desc,) = index["manifests"]
    assert desc["annotations"]["io.containerd.image.name"] == "localhost/pqfed/pause:1"
    assert desc["platform"] == {"architecture": "arm64", "os": "linux"}
    manifest = json.loads(files["blobs/sha256/" + desc["digest"].split(":")[1]])
    config = json.loads(files["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]])
    assert config["config"] == {"Entrypoint": ["/bin/pause"], "User": "65535:65535"}
    layer_gz = files["blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]]
    import gzip
    layer = gzip.decompress(layer_gz)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == ["bin", "bin/pause"]       # parents first
    assert members["bin/pause"].mode == 0o755
    assert members["bin/pause"].uid == 0 and members["bin/pause"].mtime == 0


def test_build_is_reproducible(binary: Path) -> None:
    assert build(_spec(binary)) == build(_spec(binary))


def test_bad_input_names_the_field(binary: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageSpecError, match="--name.*no tag"):
        build(_spec(binary, name="localhost/pqfed/pause"))
    with pytest.raises(ImageSpecError, match="--file"):
        parse_file(f"{tmp_path / 'missing'}:/x")
    with pytest.raises(ImageSpecError, match="absolute path"):
        parse_file(f"{binary}:../../etc/x")
    assert main(["--name", "a:1", "--out", str(tmp_path / "o.tar"), "--entrypoint", "nope"]) == 2
    assert not (tmp_path / "o.tar").exists()
