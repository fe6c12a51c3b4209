"""A minimal, reproducible OCI image writer: files in, one-layer OCI image archive out.

The test cluster's real node needs two tiny images that no registry can give it here: the pod
sandbox ("pause") and a busybox test image. Both are a few static binaries in an otherwise empty
root filesystem (`FROM scratch`), so instead of a builder daemon this module writes the OCI image
layout (image-spec v1.1: oci-layout, index.json, blobs/sha256/...) as a tar that
`ctr images import` (and k3s's air-gap import) accepts. Output is byte-for-byte reproducible: tar
entries are sorted, owned by 0:0, dated 0, and gzip carries no timestamp.

The layout writer (`write_layout`, `descriptor`, `json_bytes`, the media types) is also the one
images/build.py writes the operator, sidecar and fl image archives with.

Stdlib only, so testbed/cluster/images.sh runs it with any python3 before the virtualenv exists:

    python3 testbed/ociimage.py --name localhost/pqfed/pause:3.10 --out pause.tar \\
        --file /path/to/pause:/pause:0755 --entrypoint '["/pause"]' --user 65535:65535
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# containerd names an imported image after this annotation; the OCI one is for other tools.
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class ImageSpecError(ValueError):
    """A bad --file/--dir/--symlink/--entrypoint argument; the message names it and the fix."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True)
class Entry:
    """One path of the layer: a file copied from the host, a directory or a symlink."""

    path: str
    kind: str  # "file" | "dir" | "symlink"
    mode: int = 0o755
    source: Path | None = None
    target: str = ""


@dataclass
class ImageSpec:
    name: str
    entries: list[Entry] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    env: list[str] = field(default_factory=list)
    architecture: str = ""
    annotations: dict[str, str] = field(default_factory=dict)


def _clean_path(raw: str, field_name: str) -> str:
    path = PurePosixPath(raw)
    if not path.is_absolute() or ".." in path.parts:
        raise ImageSpecError(field_name, f"{raw!r} must be an absolute path inside the image")
    return str(path).lstrip("/")


def parse_file(value: str) -> Entry:
    """SRC:DEST[:MODE] with MODE in octal (default: the source's own mode)."""
    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise ImageSpecError("--file", f"{value!r}: expected SRC:DEST or SRC:DEST:MODE")
    source = Path(parts[0])
    if not source.is_file():
        raise ImageSpecError("--file", f"{parts[0]} does not exist or is not a file")
    mode = int(parts[2], 8) if len(parts) == 3 else source.stat().st_mode & 0o7777
    return Entry(_clean_path(parts[1], "--file"), "file", mode, source=source)


def parse_dir(value: str) -> Entry:
    """DEST[:MODE] (default 0755)."""
    path, _, mode = value.partition(":")
    return Entry(_clean_path(path, "--dir"), "dir", int(mode or "755", 8))


def parse_symlink(value: str) -> Entry:
    """DEST:TARGET (TARGET as stored in the link, relative or absolute)."""
    path, sep, target = value.partition(":")
    if not sep or not target:
        raise ImageSpecError("--symlink", f"{value!r}: expected DEST:TARGET")
    return Entry(_clean_path(path, "--symlink"), "symlink", 0o777, target=target)


def _json_list(value: str, field_name: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ImageSpecError(field_name, f"not JSON ({exc}); write e.g. '[\"/pause\"]'") from exc
    if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
        raise ImageSpecError(field_name, "must be a JSON list of strings")
    return parsed


def _with_parents(entries: Sequence[Entry]) -> list[Entry]:
    """Every entry plus the directories above it, sorted so a parent precedes its children."""
    by_path = {e.path: e for e in entries}
    for e in entries:
        for parent in PurePosixPath(e.path).parents:
            p = str(parent)
            if p != "." and p not in by_path:
                by_path[p] = Entry(p, "dir", 0o755)
    return [by_path[p] for p in sorted(by_path)]


def _layer_tar(entries: Sequence[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in _with_parents(entries):
            info = tarfile.TarInfo(e.path)
            info.mode, info.mtime, info.uid, info.gid = e.mode, 0, 0, 0
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.target
                tar.addfile(info)
            else:
                assert e.source is not None
                data = e.source.read_bytes()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256_digest(data: bytes) -> str:
    """A content digest as OCI descriptors write it: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes) -> dict[str, object]:
    """The OCI content descriptor (media type, digest, size) of a blob."""
    return {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}


def json_bytes(obj: object) -> bytes:
    """A JSON blob (config, manifest, image index) as both writers encode it: sorted keys, no
    spaces, so the same object always has the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def blob_path(digest: str) -> str:
    """Where a blob lives in the layout: ``blobs/sha256/<hex>``."""
    return "blobs/sha256/" + digest.split(":", 1)[1]


def write_layout(out: BinaryIO, files: Sequence[tuple[str, bytes | Path]], mtime: int) -> None:
    """An OCI image layout (image-spec v1.1: oci-layout, index.json, blobs/sha256/...) as an
    uncompressed PAX tar on `out`: the two blob directories first, then `files` in the order
    given (a file is bytes, or a Path streamed from disk), every entry owned by 0:0, dated
    `mtime`, directories 0755 and files 0644."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(info)
        for name, content in files:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = 0o644, mtime
            if isinstance(content, Path):
                info.size = content.stat().st_size
                with content.open("rb") as f:
                    tar.addfile(info, f)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def build(spec: ImageSpec) -> bytes:
    """The OCI image layout of `spec`, as the bytes of an (uncompressed) tar archive."""
    if ":" not in spec.name.rsplit("/", 1)[-1]:
        raise ImageSpecError("--name", f"{spec.name!r} has no tag; write e.g. {spec.name}:0.1")
    arch = spec.architecture or _GOARCH.get(platform.machine(), platform.machine())
    layer = _layer_tar(spec.entries)
    layer_gz = gzip.compress(layer, compresslevel=9, mtime=0)
    config: dict[str, object] = {
        "architecture": arch,
        "os": "linux",
        "config": {k: v for k, v in (("Entrypoint", spec.entrypoint), ("Cmd", spec.cmd),
                                     ("User", spec.user), ("Env", spec.env)) if v},
        "rootfs": {"type": "layers",
                   "diff_ids": [sha256_digest(layer)]},
        "history": [{"created_by": "pqfed testbed/ociimage.py"}],
    }
    config_bytes = json_bytes(config)
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": descriptor(MEDIA_CONFIG, config_bytes),
        "layers": [descriptor(MEDIA_LAYER, layer_gz)],
    }
    if spec.annotations:
        manifest["annotations"] = dict(sorted(spec.annotations.items()))
    manifest_bytes = json_bytes(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            **descriptor(MEDIA_MANIFEST, manifest_bytes),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {ANNOTATION_CONTAINERD_NAME: spec.name,
                            ANNOTATION_REF_NAME: spec.name},
        }],
    }
    files: dict[str, bytes | Path] = {"oci-layout": json_bytes({"imageLayoutVersion": "1.0.0"}),
                                      "index.json": json_bytes(index)}
    for blob in (layer_gz, config_bytes, manifest_bytes):
        files[blob_path(sha256_digest(blob))] = blob
    out = io.BytesIO()
    write_layout(out, sorted(files.items()), mtime=0)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--name", required=True, help="reference, e.g. localhost/pqfed/pause:3.10")
    ap.add_argument("--out", required=True, type=Path, help="archive to write")
    ap.add_argument("--file", action="append", default=[], help="SRC:DEST[:MODE]")
    ap.add_argument("--dir", action="append", default=[], help="DEST[:MODE]")
    ap.add_argument("--symlink", action="append", default=[], help="DEST:TARGET")
    ap.add_argument("--entrypoint", default="[]", help="JSON list")
    ap.add_argument("--cmd", default="[]", help="JSON list")
    ap.add_argument("--user", default="", help="uid[:gid] the image runs as by default")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE")
    ap.add_argument("--arch", default="", help="GOARCH of the binaries (default: this machine)")
    ap.add_argument("--annotation", action="append", default=[], help="KEY=VALUE (manifest)")
    args = ap.parse_args(argv)
    try:
        annotations = {}
        for a in args.annotation:
            key, sep, value = a.partition("=")
            if not sep:
                raise ImageSpecError("--annotation", f"{a!r}: expected KEY=VALUE")
            annotations[key] = value
        spec = ImageSpec(
            name=args.name,
            entries=[*map(parse_dir, args.dir), *map(parse_file, args.file),
                     *map(parse_symlink, args.symlink)],
            entrypoint=_json_list(args.entrypoint, "--entrypoint"),
            cmd=_json_list(args.cmd, "--cmd"),
            user=args.user, env=list(args.env), architecture=args.arch,
            annotations=annotations)
        data = build(spec)
    except ImageSpecError as exc:
        print(f"ociimage: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, args.out)
    print(f"ociimage: wrote {args.out} ({spec.name}, {len(data)} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
