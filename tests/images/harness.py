"""Run a command inside one platform of a built OCI archive with runc, as a kubelet would with
the chart's securityContext: the image's user (10001), a read-only root filesystem, a tmpfs at
/tmp, no capabilities, and a network namespace of its own that has only loopback (no route
out). arm64 images run under qemu through binfmt_misc (images/prereqs.sh registers it)."""

from __future__ import annotations

import contextlib
import gzip
import json
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCH_OF = {"amd64": "amd64", "arm64": "arm64"}


@dataclass(frozen=True)
class Unpacked:
    rootfs: Path
    config: dict[str, Any]
    manifest: dict[str, Any]
    index_annotations: dict[str, str]


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    assert f is not None, f"{name} missing from the archive"
    return f.read()


def _blob(tar: tarfile.TarFile, digest: str) -> bytes:
    return _read(tar, "blobs/sha256/" + digest.split(":", 1)[1])


def unpack(archive: Path, arch: str, dest: Path) -> Unpacked:
    """Resolve index.json -> (image index ->) manifest for `arch`, apply its layers in order."""
    with tarfile.open(archive) as tar:
        index = json.loads(_read(tar, "index.json"))
        top = index["manifests"][0]
        annotations = dict(top.get("annotations", {}))
        if top["mediaType"].endswith("image.index.v1+json"):
            inner = json.loads(_blob(tar, top["digest"]))
            picked = [m for m in inner["manifests"]
                      if m["platform"]["architecture"] == ARCH_OF[arch]]
            assert picked, f"no {arch} manifest in {archive.name}"
            manifest = json.loads(_blob(tar, picked[0]["digest"]))
        else:
            manifest = json.loads(_blob(tar, top["digest"]))
        config = json.loads(_blob(tar, manifest["config"]["digest"]))
        rootfs = dest / "rootfs"
        rootfs.mkdir(parents=True)
        for layer in manifest["layers"]:
            member = tar.getmember("blobs/sha256/" + layer["digest"].split(":", 1)[1])
            raw = tar.extractfile(member)
            assert raw is not None
            with gzip.GzipFile(fileobj=raw) as gz, tarfile.open(fileobj=gz, mode="r|") as lt:
                lt.extractall(rootfs, filter="fully_trusted")
    return Unpacked(rootfs, config, manifest, annotations)


@contextlib.contextmanager
def netns() -> Iterator[str]:
    """A network namespace with loopback up and nothing else (no route to the outside)."""
    name = f"pqfed-img-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def bundle_config(bundle: Path, img: Unpacked, args: list[str], netns_path: str,
                  entrypoint: list[str] | None = None) -> dict[str, Any]:
    """runc's default spec (what `runc spec` writes) with the image's process settings."""
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec: dict[str, Any] = json.loads((bundle / "config.json").read_text())
    cfg = img.config["config"]
    user = cfg.get("User", "0:0").split(":")
    spec["process"].update(
        terminal=False,
        args=[*(cfg.get("Entrypoint", []) if entrypoint is None else entrypoint), *args], env=cfg.get("Env", []),
        cwd=cfg.get("WorkingDir") or "/",
        user={"uid": int(user[0]), "gid": int(user[1] if len(user) > 1 else user[0])},
        noNewPrivileges=True)
    spec["process"]["capabilities"] = {k: [] for k in
                                       ("bounding", "effective", "permitted", "ambient")}
    spec["root"] = {"path": str(img.rootfs), "readonly": True}
    spec["hostname"] = "pqfed-image-test"
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777", "size=256m"]})
    spec["linux"]["namespaces"] = [
        ns if ns["type"] != "network" else {"type": "network", "path": netns_path}
        for ns in spec["linux"]["namespaces"]]
    return spec


def run_in_image(archive: Path, arch: str, args: list[str], workdir: Path,
                 timeout: float = 900, entrypoint: list[str] | None = None,
                 img: Unpacked | None = None) -> tuple[subprocess.CompletedProcess[str], Unpacked]:
    """`args` go after the image's entrypoint (pqfed) or `entrypoint`. An `img` unpacked
    before is reused (its rootfs is read-only to the container, so it stays pristine)."""
    bundle = workdir / f"bundle-{arch}-{uuid.uuid4().hex[:6]}"
    bundle.mkdir(parents=True)
    if img is None:
        img = unpack(archive, arch, bundle)
    cid = f"pqfed-test-{uuid.uuid4().hex[:10]}"
    state = workdir / "runc-state"
    try:
        with netns() as ns:
            spec = bundle_config(bundle, img, args, ns, entrypoint)
            (bundle / "config.json").write_text(json.dumps(spec))
            proc = subprocess.run(["runc", "--root", str(state), "run", "--bundle", str(bundle),
                                   cid], capture_output=True, text=True, timeout=timeout,
                                  check=False, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run(["runc", "--root", str(state), "delete", "--force", cid],
                       capture_output=True, check=False)
    return proc, img
