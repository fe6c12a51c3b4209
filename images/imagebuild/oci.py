"""The image configs, manifests and OCI archives (image index, per-platform manifests,
containerd's and docker-archive's names) of the built layers, written with the project's one
OCI layout writer (testbed/ociimage.py: stdlib only, shared with the test cluster's images)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from imagebuild.layers import Layer, Stage
from imagebuild.project import (
    DEBIAN_SUITE,
    DESCRIPTIONS,
    ENV,
    OCI_ARCH,
    REGISTRY_NAME,
    UID,
    Project,
)
from pqfed.testbed.ociimage import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER,
    MEDIA_MANIFEST,
    blob_path,
    json_bytes,
    sha256_digest,
    write_layout,
)


def ref(image: str, version: str) -> str:
    return f"{REGISTRY_NAME}/{image}:{version}"


def _blob(obj: object) -> tuple[bytes, str]:
    data = json_bytes(obj)
    return data, sha256_digest(data)


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
        ANNOTATION_REF_NAME: p.version,
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
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG,
                   "digest": cfg_digest, "size": len(cfg)},
        "layers": [{"mediaType": MEDIA_LAYER,
                    "digest": x.digest, "size": x.size} for x in layers],
        "annotations": {k: v for k, v in lab.items() if k != ANNOTATION_REF_NAME},
    }
    man, man_digest = _blob(manifest)
    return Platform(arch, layers, cfg, cfg_digest, man, man_digest, {})


def _platform_desc(pl: Platform) -> dict[str, object]:
    plat: dict[str, str] = {"architecture": OCI_ARCH[pl.arch], "os": "linux"}
    if pl.arch == "arm64":
        plat["variant"] = "v8"
    return {"mediaType": MEDIA_MANIFEST,
            "digest": pl.manifest_digest, "size": len(pl.manifest), "platform": plat}


def write_archive(dest: Path, p: Project, image: str, plats: list[Platform]) -> str:
    """An OCI image layout as a tar. index.json names the image the way containerd's importer
    (ctr images import, k3s air-gap) reads it: io.containerd.image.name is the full
    reference, org.opencontainers.image.ref.name the tag (as BuildKit's OCI exporter writes).
    A single-platform archive also carries docker-archive's manifest.json with RepoTags."""
    name = ref(image, p.version)
    annotations = {ANNOTATION_CONTAINERD_NAME: name, ANNOTATION_REF_NAME: p.version}
    blobs: dict[str, bytes | Path] = {}
    for pl in plats:
        blobs[pl.config_digest] = pl.config
        blobs[pl.manifest_digest] = pl.manifest
        for layer in pl.layers:
            blobs[layer.digest] = layer.blob
    if len(plats) > 1:
        idx = {"schemaVersion": 2, "mediaType": MEDIA_INDEX,
               "manifests": [_platform_desc(pl) for pl in plats],
               "annotations": {k: v for k, v in labels(p, image).items()
                               if k != ANNOTATION_REF_NAME}}
        data, digest = _blob(idx)
        blobs[digest] = data
        top = {"mediaType": MEDIA_INDEX, "digest": digest,
               "size": len(data), "annotations": annotations}
    else:
        top = {**_platform_desc(plats[0]), "annotations": annotations}
        digest = plats[0].manifest_digest
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX,
             "manifests": [top]}
    files: list[tuple[str, bytes | Path]] = [
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
        ("index.json", json.dumps(index, indent=1).encode())]
    if len(plats) == 1:
        pl = plats[0]
        docker = [{"Config": blob_path(pl.config_digest), "RepoTags": [name],
                   "Layers": [blob_path(x.digest) for x in pl.layers]}]
        files.append(("manifest.json", json.dumps(docker).encode()))
    files += [(blob_path(d), b) for d, b in sorted(blobs.items())]
    tmp = dest.with_suffix(".partial")
    with tmp.open("wb") as out:
        write_layout(out, files, p.epoch)
    tmp.replace(dest)
    return digest
