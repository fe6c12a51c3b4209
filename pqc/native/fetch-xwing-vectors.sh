#!/usr/bin/env bash
# Fetch the X-Wing test vectors (draft-connolly-cfrg-xwing-kem, appendix "Test vectors") into a
# cache outside the repo, for tests/pqc/test_vectors.py:
#
#     ${PQFED_CACHE:-$HOME/.cache/pqfed}/vectors/x-wing-<version>/test-vectors.json
#
# Where they come from: the crates.io package x-wing (RustCrypto's X-Wing, pinned below), which
# ships the draft's three vectors as tests/test-vectors.json (seed, sk, pk, eseed, ct, ss). cargo
# fetches the crate through crates.io and checks it against the registry index; we also check
# the index's checksum against the pin. The vectors are third-party data: they are fetched at
# test time, never committed, like liboqs' sources (build-liboqs.sh).
#
# Idempotent; cargo is apt-get installed when missing and running as root.
# Usage: fetch-xwing-vectors.sh [--print-path]
set -euo pipefail

XWING_VERSION="0.1.1"
XWING_SHA256="01576e56599d01d75c5efcd5b30fa5de29e776f5a225e43fbf8c92c7302d4c8b"
LOG_TAG=fetch-xwing-vectors
# shellcheck source=pqc/native/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
DIR="$PQFED_CACHE/vectors/x-wing-$XWING_VERSION"
OUT="$DIR/test-vectors.json"

if [[ "${1:-}" == "--print-path" ]]; then echo "$OUT"; exit 0; fi
[[ -f "$OUT" ]] && { log "x-wing $XWING_VERSION vectors are current in $DIR"; exit 0; }

command -v cargo >/dev/null || apt_install cargo

mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9
[[ -f "$OUT" ]] && exit 0
work="$(mktemp -d "$DIR/fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
crate_dir="$(fetch_crate x-wing "$XWING_VERSION" "$XWING_SHA256" "$work")"
src="$crate_dir/tests/test-vectors.json"
[[ -f "$src" ]] || die "x-wing crate at $crate_dir has no tests/test-vectors.json"
cp "$src" "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
log "x-wing $XWING_VERSION vectors in $OUT"
