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
PQFED_CACHE="${PQFED_CACHE:-$HOME/.cache/pqfed}"
DIR="$PQFED_CACHE/vectors/x-wing-$XWING_VERSION"
OUT="$DIR/test-vectors.json"

log() { printf '[fetch-xwing-vectors %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[fetch-xwing-vectors] ERROR: %s\n' "$*" >&2; exit 1; }

if [[ "${1:-}" == "--print-path" ]]; then echo "$OUT"; exit 0; fi
[[ -f "$OUT" ]] && { log "x-wing $XWING_VERSION vectors are current in $DIR"; exit 0; }

if ! command -v cargo >/dev/null; then
    [[ $(id -u) -eq 0 ]] || die "cargo is missing; install it (apt-get install cargo) and rerun"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq cargo >/dev/null \
        || { apt-get -o DPkg::Lock::Timeout=900 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq cargo >/dev/null; }
fi

mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9
[[ -f "$OUT" ]] && exit 0
work="$(mktemp -d "$DIR/fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
cat >"$work/Cargo.toml" <<TOML
[package]
name = "pqfed-xwing-vectors-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
x-wing = { version = "=$XWING_VERSION", default-features = false }
TOML
echo 'fn main() {}' >"$work/src/main.rs"
log "fetching x-wing $XWING_VERSION from crates.io"
cargo fetch --quiet --manifest-path "$work/Cargo.toml" \
    || die "cargo fetch of x-wing failed (needs crates.io)"
got="$(grep -A3 '^name = "x-wing"$' "$work/Cargo.lock" | sed -n 's/^checksum = "\(.*\)"$/\1/p')"
[[ "$got" == "$XWING_SHA256" ]] || die "x-wing $XWING_VERSION checksum is '$got', expected $XWING_SHA256"
crate_dir="$(cargo metadata --format-version 1 --manifest-path "$work/Cargo.toml" \
    | python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="x-wing"))')"
src="$(dirname "$crate_dir")/tests/test-vectors.json"
[[ -f "$src" ]] || die "x-wing crate at $(dirname "$crate_dir") has no tests/test-vectors.json"
cp "$src" "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
log "x-wing $XWING_VERSION vectors in $OUT"
