#!/bin/sh
# Push the multi-arch images built by `make images` to a registry with skopeo: the index and
# both architectures' manifests and layers, under REGISTRY/<image>:<version>.
#   images/push.sh 127.0.0.1:5000/pqfed [--dest-tls-verify=false] [--dest-creds=user:pass]
set -eu
registry="${1:?usage: images/push.sh REGISTRY[/path] [skopeo copy flags]: make images-push REGISTRY=host:port/path}"
shift
here="$(cd "$(dirname "$0")/.." && pwd)"
dist="$here/dist/images"
[ -f "$dist/images.json" ] || { echo "images/push.sh: no $dist/images.json: run make images" >&2; exit 1; }
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/pyproject.toml" | head -1)"
for image in operator sidecar fl; do
    archive="$dist/pqfed-$image-$version.oci.tar"
    [ -f "$archive" ] || { echo "images/push.sh: $archive missing: run make images" >&2; exit 1; }
    echo "push $archive -> docker://$registry/$image:$version"
    skopeo copy --all --preserve-digests "$@" "oci-archive:$archive" "docker://$registry/$image:$version"
done
