"""The built images (`make images`), run for real: each amd64 image and the arm64 fl image
(under qemu) run `pqfed selftest` with runc as user 10001 on a read-only root filesystem;
their labels, user, archive names, SBOMs and size budgets are checked. The build is the
project's own (images/build.py), reused from $PQFED_CACHE/images when nothing changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Unpacked, run_in_image, unpack

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist/images"
VERSION = "0.1.0"
MB = 1000 * 1000
# Budgets from issue 9 (compressed layer bytes of one platform).
BUDGET = {("operator", "amd64"): 150 * MB, ("operator", "arm64"): 150 * MB,
          ("sidecar", "amd64"): 150 * MB, ("sidecar", "arm64"): 150 * MB,
          ("fl", "arm64"): 1200 * MB}
TORCH = {"amd64": "2.15.0", "arm64": "2.10.0"}
MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.images,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc and `ip netns` need root (CI runs as root)"),
]


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    """`make images` (seconds when cached): what images/build.py reports in images.json."""
    proc = subprocess.run([sys.executable, str(ROOT / "images/build.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout[-2000:])
    result: dict[str, Any] = json.loads((DIST / "images.json").read_text())
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("images")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _archive(image: str) -> Path:
    return DIST / f"pqfed-{image}-{VERSION}.oci.tar"


@pytest.mark.parametrize(("image", "arch"), [("operator", "amd64"), ("sidecar", "amd64"),
                                             ("fl", "amd64"), ("fl", "arm64")])
def test_selftest_runs_in_the_image(built: dict[str, Any], workdir: Path, image: str,
                                    arch: str) -> None:
    args = ["selftest", "--json"] + (["--require-torch"] if image == "fl" else [])
    proc, img = run_in_image(_archive(image), arch, args, workdir, timeout=1800)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    v = report["versions"]
    assert v["pqfed"] == VERSION
    assert v["machine"] == MACHINE[arch]
    # liboqs is in every image (images/build.py), so `auto` picks it, on arm64 too.
    assert v["pqc_backend"].startswith("liboqs (liboqs 0.13.0 via ctypes (/opt/pqfed/lib/")
    assert v["openssl"].startswith("OpenSSL")
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["pqfed1 handshake + records over loopback"] == "ok"
    assert status["kat: ML-KEM-768 decapsulate"] == "ok"
    if image == "fl":
        assert v["torch"] == TORCH[arch]
        assert v["flwr"] == "1.42.0"
        assert status["torch training step"] == "ok"
    else:  # operator and sidecar: no torch, no Flower
        assert v["torch"] == v["flwr"] == "not installed"
        assert status["torch training step"] == "not run"
    assert (v["kubernetes"] != "not installed") == (image == "operator")

    # The same root filesystem: the process is uid 10001 and cannot write outside /tmp.
    probe = ("import os, pathlib; print(os.getuid(), os.getgid());"
             "pathlib.Path('/tmp/ok').write_text('x');"
             "exec('try:\\n open(\"/opt/pqfed/x\", \"w\")\\nexcept OSError as e: print(e.errno)')")
    proc, _ = run_in_image(_archive(image), arch, ["-c", probe], workdir,
                           entrypoint=["/opt/pqfed/bin/python3"], img=img)
    assert proc.returncode == 0, proc.stderr
    uid_line, errno_line = proc.stdout.split()[:2], proc.stdout.split()[2]
    assert uid_line == ["10001", "10001"]
    assert errno_line == "30"  # EROFS: the root filesystem is read-only


@pytest.mark.parametrize("image", ["operator", "sidecar", "fl"])
def test_archive_names_labels_user_and_sbom(built: dict[str, Any], image: str) -> None:
    entry = built["images"][image]
    assert entry["ref"] == f"localhost/pqfed/{image}:{VERSION}"
    with tarfile.open(_archive(image)) as tar:
        f = tar.extractfile("index.json")
        assert f is not None
        index = json.loads(f.read())
    top = index["manifests"][0]
    # What containerd's importer (ctr images import, k3s air-gap) names the image.
    assert top["annotations"]["io.containerd.image.name"] == f"localhost/pqfed/{image}:{VERSION}"
    assert top["annotations"]["org.opencontainers.image.ref.name"] == VERSION
    assert top["mediaType"] == "application/vnd.oci.image.index.v1+json"
    for arch in ("amd64", "arm64"):
        per_arch = DIST / f"pqfed-{image}-{VERSION}-{arch}.oci.tar"
        with tarfile.open(per_arch) as tar:
            f = tar.extractfile("manifest.json")
            assert f is not None
            docker = json.loads(f.read())
        assert docker[0]["RepoTags"] == [f"localhost/pqfed/{image}:{VERSION}"]
        sbom = json.loads((DIST / entry["platforms"][arch]["sbom"]).read_text())
        assert sbom["spdxVersion"] == "SPDX-2.3"
        names = {p["name"] for p in sbom["packages"]}
        assert {"python3.11-minimal", "libc6", "pqfed", "cryptography"} <= names
        assert ("torch" in names) == (image == "fl")
        assert ("flwr" in names) == (image == "fl")
        assert ("kubernetes" in names) == (image == "operator")


@pytest.mark.parametrize("image", ["operator", "sidecar", "fl"])
def test_config_user_and_oci_labels(built: dict[str, Any], image: str, workdir: Path) -> None:
    # The config only: unpack the smallest platform (labels are the same on both).
    img: Unpacked = unpack(DIST / f"pqfed-{image}-{VERSION}-arm64.oci.tar", "arm64",
                           workdir / f"cfg-{image}")
    cfg = img.config["config"]
    assert cfg["User"] == "10001:10001"
    assert img.config["architecture"] == "arm64"
    labels = cfg["Labels"]
    revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.revision"].split("-")[0] == revision
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.created"].endswith("Z")
    assert img.manifest["annotations"]["org.opencontainers.image.revision"] \
        == labels["org.opencontainers.image.revision"]
    assert (img.rootfs / "etc/passwd").read_text().count(":10001:10001:") == 1
    shutil.rmtree(workdir / f"cfg-{image}", ignore_errors=True)


def test_size_budgets(built: dict[str, Any]) -> None:
    lines = []
    for image, entry in built["images"].items():
        for arch, pl in entry["platforms"].items():
            lines.append(f"{image:9} {arch}: {pl['compressed_bytes'] / MB:7.1f} MB compressed, "
                         f"{pl['uncompressed_bytes'] / MB:7.1f} MB uncompressed")
    print("\n".join(lines))  # reported in the test log (pytest -s / -rA)
    for (image, arch), budget in BUDGET.items():
        size = built["images"][image]["platforms"][arch]["compressed_bytes"]
        assert size <= budget, f"{image}/{arch}: {size / MB:.0f} MB > {budget / MB:.0f} MB"


def test_push_to_a_local_registry(built: dict[str, Any], tmp_path: Path) -> None:
    """`make images-push` (images/push.sh) into Debian's docker-registry on loopback: the
    registry then serves each image's multi-arch index with the digest the build reported."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {tmp_path / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    registry = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "config.yml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        target = f"127.0.0.1:{port}/pqfed"
        push = subprocess.run([str(ROOT / "images/push.sh"), target, "--dest-tls-verify=false"],
                              capture_output=True, text=True, timeout=1800, check=False)
        assert push.returncode == 0, push.stderr[-3000:]
        for image, entry in built["images"].items():
            raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                  f"docker://{target}/{image}:{VERSION}"],
                                 capture_output=True, check=True, timeout=120).stdout
            assert "sha256:" + hashlib.sha256(raw).hexdigest() == entry["index_digest"]
            index = json.loads(raw)
            archs = sorted(m["platform"]["architecture"] for m in index["manifests"])
            assert archs == ["amd64", "arm64"]
    finally:
        registry.terminate()
        registry.wait(timeout=30)
