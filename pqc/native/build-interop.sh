#!/usr/bin/env bash
# Build the TLS 1.3 interop peer (tests/pqc/interop, Go), into a cache outside the repo:
#
#     ${PQFED_CACHE:-$HOME/.cache/pqfed}/interop/bin/pqfed-interop        (Go 1.27.4, see below)
#     ${PQFED_CACHE:-$HOME/.cache/pqfed}/interop/bin/pqfed-interop-stock  (Go 1.27.4 as released)
#
# Why Go: its crypto/tls, crypto/x509 and crypto/mldsa share no code with the OpenSSL 4 that
# pqfed's TLS channel runs on (pqc/tls13.py), and Go 1.27 negotiates X25519MLKEM768 and signs
# and verifies ML-DSA-65 certificates and CertificateVerify (draft-ietf-tls-mldsa).
#
# One change to Go 1.27.4, applied with `go build -overlay` (the toolchain itself stays as
# downloaded): crypto/tls's isDisabledSignatureAlgorithm leaves ML-DSA out of the
# signature_algorithms_cert extension "to work around non-compliant middleboxes"
# (go.dev/issue/82536), although crypto/x509 verifies ML-DSA certificate signatures. OpenSSL
# (check_cert_usable in ssl/t1_lib.c) then finds no certificate whose issuer signature the peer
# accepts and fails the handshake ("no suitable signature algorithm"; as a client it sends no
# certificate), in both directions. The overlay drops that omission only, so Go advertises
# ML-DSA for certificates as RFC 8446 §4.2.3 intends. pqfed-interop-stock is built without the
# overlay; a test keeps the incompatibility on record (it should go away with a Go release
# that advertises ML-DSA in signature_algorithms_cert).
#
# Downloads: the Go toolchain module golang.org/toolchain@v0.0.1-go<version>.linux-<arch> from
# the Go module proxy (`go mod download`, which checks it against the Go checksum database);
# we also check its hash against the pins below. Nothing else: the program uses the standard
# library only. The toolchain and the Go build cache are deleted after the build (the
# binaries are what is kept, ~12 MB), so a rebuild downloads the toolchain again (~70 MB).
#
# Needs `go` (>= 1.21) on PATH to fetch the toolchain, like testbed/cluster/build.sh.
# Idempotent: nothing is rebuilt when both binaries and their stamp are current.
#
# Usage: build-interop.sh [--force] [--check] [--print-dir]
#   --force      rebuild even when the stamp matches
#   --check      build nothing; exit 0 when the binaries are present and current, 1 otherwise
#   --print-dir  print the directory holding the binaries and exit
set -euo pipefail

GO_VERSION="1.27.4"
# Go checksum database hashes (h1: = base64 SHA-256 over the module's file hashes) of the
# toolchain modules, and the SHA-256 of the amd64 module zip as the proxy serves it.
declare -A GO_TOOLCHAIN_H1=(
    [amd64]="h1:8Tl0rBb7KdISSdPkZBjlpZxsUBb+004GI/SM2XbmSqI="
    [arm64]="h1:vCmfNA8b+T0RfElhx3mNdgu1UrIuyzZCgTrRiUWLnOI="
)
declare -A GO_TOOLCHAIN_ZIP_SHA256=(
    [amd64]="7ecd542f86ccbbb5017de33ac529872bc48c71f4edb658d63a18d2206f482b9b"
)
# The file the overlay replaces, as released in that toolchain (the patch is checked against
# exactly this text).
TLS_COMMON_GO_SHA256="46d49dbc2b7b100ae6434819132a5c38d8773ff9041dcd2b245c77ff0a081a54"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="$(cd "$HERE/../../tests/pqc/interop" && pwd)"
PQFED_CACHE="${PQFED_CACHE:-$HOME/.cache/pqfed}"
OUT="$PQFED_CACHE/interop/bin"

log() { printf '[build-interop %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[build-interop] ERROR: %s\n' "$*" >&2; exit 1; }

FORCE=0
CHECK=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) FORCE=1 ;;
        --check) CHECK=1 ;;
        --print-dir) echo "$OUT"; exit 0 ;;
        -h|--help) sed -n '2,37p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

case "$(uname -m)" in
    x86_64) ARCH=amd64 ;;
    aarch64|arm64) ARCH=arm64 ;;
    *) ARCH="$(uname -m)" ;;
esac
[[ -n "${GO_TOOLCHAIN_H1[$ARCH]:-}" ]] || die "no pinned Go toolchain for $ARCH (amd64, arm64)"

# The stamp covers everything the binaries depend on: Go version, arch, sources, this script
# (the overlay patch lives here).
src_hash() { cat "$SRC/go.mod" "$SRC/main.go" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16; }
STAMP_TEXT="go=$GO_VERSION arch=$ARCH src=$(src_hash)"
current() {
    [[ -x "$OUT/pqfed-interop" && -x "$OUT/pqfed-interop-stock" \
        && "$(cat "$OUT/.stamp" 2>/dev/null)" == "$STAMP_TEXT" ]]
}
if [[ $CHECK -eq 1 ]]; then
    current && exit 0
    echo "the interop peer is not built (or is stale) in $OUT: run \`make interop\`" >&2
    exit 1
fi
mkdir -p "$PQFED_CACHE/interop"
exec 9>"$PQFED_CACHE/interop/.lock"
flock 9
if [[ $FORCE -eq 0 ]] && current; then
    log "pqfed-interop (go$GO_VERSION) is current in $OUT"
    exit 0
fi
command -v go >/dev/null 2>&1 || die "go is not on PATH (needed to fetch the Go $GO_VERSION toolchain)"

WORK="$PQFED_CACHE/interop/work"
chmod -R u+w "$WORK" 2>/dev/null || true
rm -rf "$WORK"
mkdir -p "$WORK"
cleanup() { chmod -R u+w "$WORK" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# --- toolchain -----------------------------------------------------------------------------
MOD="golang.org/toolchain@v0.0.1-go$GO_VERSION.linux-$ARCH"
log "fetching $MOD from the Go module proxy"
info="$(cd "$WORK" && GOTOOLCHAIN=local GOFLAGS=-modcacherw GOMODCACHE="$WORK/dl" \
    go mod download -json "$MOD")" || die "go mod download $MOD failed: $info"
field() { python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1], ""))' "$1" <<<"$info"; }
[[ "$(field Sum)" == "${GO_TOOLCHAIN_H1[$ARCH]}" ]] \
    || die "$MOD hash is '$(field Sum)', pinned ${GO_TOOLCHAIN_H1[$ARCH]}"
if [[ -n "${GO_TOOLCHAIN_ZIP_SHA256[$ARCH]:-}" ]]; then
    got="$(sha256sum "$(field Zip)" | cut -d' ' -f1)"
    [[ "$got" == "${GO_TOOLCHAIN_ZIP_SHA256[$ARCH]}" ]] \
        || die "$MOD zip sha256 is $got, pinned ${GO_TOOLCHAIN_ZIP_SHA256[$ARCH]}"
fi
GOROOT_DIR="$(field Dir)"
# Module zips carry no file modes; mark the programs executable as `go` does when it switches
# toolchains itself (cmd/go/internal/toolchain).
find "$GOROOT_DIR/bin" "$GOROOT_DIR/pkg/tool" -type f -exec chmod +x {} +
[[ -x "$GOROOT_DIR/bin/go" ]] || die "$MOD has no bin/go in $GOROOT_DIR"

# --- the overlay: ML-DSA in signature_algorithms_cert (see the header) ---------------------
TLS_COMMON="$GOROOT_DIR/src/crypto/tls/common.go"
[[ "$(sha256sum "$TLS_COMMON" | cut -d' ' -f1)" == "$TLS_COMMON_GO_SHA256" ]] \
    || die "$TLS_COMMON is not the reviewed Go $GO_VERSION file; review the overlay"
mkdir -p "$WORK/overlay"
python3 - "$TLS_COMMON" "$WORK/overlay" <<'PY'
import json, pathlib, sys
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
text = src.read_text()
omission = ("\t\t// around non-compliant middleboxes. See https://go.dev/issue/82536.\n"
            "\t\tif isCert {\n\t\t\treturn true\n\t\t}\n")
if text.count(omission) != 1:
    sys.exit("the signature_algorithms_cert omission is not where it was reviewed")
(out / "common.go").write_text(text.replace(
    omission, "\t\t// around non-compliant middleboxes. See https://go.dev/issue/82536.\n"
              "\t\t// (pqfed interop build: advertised, see pqc/native/build-interop.sh)\n"))
(out / "overlay.json").write_text(json.dumps({"Replace": {str(src): str(out / "common.go")}}))
PY

# --- build -----------------------------------------------------------------------------------
export GOTOOLCHAIN=local GOROOT="$GOROOT_DIR" GOCACHE="$WORK/gocache" GOMODCACHE="$WORK/mod"
export GOFLAGS=-buildvcs=false CGO_ENABLED=0 GOPROXY=off
mkdir -p "$OUT.tmp"
log "building pqfed-interop with go$GO_VERSION (-overlay: ML-DSA in signature_algorithms_cert)"
(cd "$SRC" && "$GOROOT_DIR/bin/go" build -overlay "$WORK/overlay/overlay.json" -trimpath \
    -ldflags "-s -w" -o "$OUT.tmp/pqfed-interop" .) || die "go build failed"
log "building pqfed-interop-stock with go$GO_VERSION as released"
(cd "$SRC" && "$GOROOT_DIR/bin/go" build -trimpath -ldflags "-s -w" \
    -o "$OUT.tmp/pqfed-interop-stock" .) || die "go build (stock) failed"
echo "$STAMP_TEXT" >"$OUT.tmp/.stamp"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
log "ready: $OUT/pqfed-interop, $OUT/pqfed-interop-stock"
