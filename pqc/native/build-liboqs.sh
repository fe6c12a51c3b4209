#!/usr/bin/env bash
# Build a minimal shared liboqs for the pqfed liboqs backend, into a cache outside the repo:
#
#     ${PQFED_CACHE:-$HOME/.cache/pqfed}/liboqs/<version>/<arch>/liboqs.so{,.<soversion>}
#
# Where the C sources come from: the crates.io package oqs-sys (pinned below), which bundles
# the liboqs release it binds. cargo fetches it through crates.io and checks it against the
# registry index checksum (the throwaway Cargo.lock records it); we only take its liboqs/ tree.
# No GitHub download is needed, so this works on a machine that reaches package registries only.
#
# The library is built with Debian's cmake + ninja, OpenSSL off (liboqs' own SHA-3/AES, so the
# .so has no dependency beyond libc), OQS_DIST_BUILD on (run-time CPU dispatch: AVX2 on x86-64,
# NEON on aarch64) and only the algorithms pqfed offers (pqc/algorithms.py).
#
# Idempotent: nothing is rebuilt when the .so and its stamp (the build options) are present.
# Missing tools (cmake, ninja-build, gcc, cargo; gcc-aarch64-linux-gnu for arm64) are
# apt-get installed when running as root, since CI starts from a bare machine (waiting for the
# dpkg lock: other prerequisite scripts may be installing at the same time).
#
# Usage: build-liboqs.sh [--arch amd64|arm64] [--force] [--check] [--print-dir]
#   --arch       target architecture (default: the host's); arm64 cross-compiles
#   --force      rebuild even when the stamp matches
#   --check      build nothing; exit 0 when the library is present and current, 1 otherwise
#   --print-dir  print the cache directory for the selected arch and exit
set -euo pipefail

OQS_SYS_VERSION="0.11.0+liboqs-0.13.0"
# SHA-256 of that .crate as published on crates.io (cargo checks the download against the
# registry index; we also check the index's answer against this pin).
OQS_SYS_SHA256="ac6d66ee528a895ce5cc08851698d109c5d7ee5d7a0b3b40d61550eda91e414f"
LIBOQS_VERSION="${OQS_SYS_VERSION##*liboqs-}"
# Keep in step with pqc/algorithms.py (KEM_SIZES, PQ_SIGNATURES).
ALGORITHMS="KEM_ml_kem_768;KEM_ml_kem_1024;SIG_ml_dsa_44;SIG_ml_dsa_65;SIG_ml_dsa_87"
LOG_TAG=build-liboqs
# shellcheck source=pqc/native/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ARCH="$(host_arch)"
FORCE=0
CHECK=0
PRINT=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --arch) shift; ARCH="${1:?--arch needs amd64 or arm64}" ;;
        --arch=*) ARCH="${1#--arch=}" ;;
        --force) FORCE=1 ;;
        --check) CHECK=1 ;;
        --print-dir) PRINT=1 ;;
        -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
case "$ARCH" in
    x86_64) ARCH=amd64 ;;
    aarch64) ARCH=arm64 ;;
esac
case "$ARCH" in
    amd64|arm64) ;;
    *) die "--arch '$ARCH' is not supported; use amd64 or arm64" ;;
esac

OUT="$PQFED_CACHE/liboqs/$LIBOQS_VERSION/$ARCH"
STAMP_TEXT="oqs-sys=$OQS_SYS_VERSION arch=$ARCH algorithms=$ALGORITHMS openssl=off dist=on"
if [[ $PRINT -eq 1 ]]; then echo "$OUT"; exit 0; fi

# --- tools -----------------------------------------------------------------------------------
build_tools() {
    local need=()
    command -v cmake >/dev/null || need+=(cmake)
    command -v ninja >/dev/null || need+=(ninja-build)
    command -v cc >/dev/null || need+=(gcc libc6-dev)
    command -v cargo >/dev/null || need+=(cargo)
    if [[ "$ARCH" != "$(host_arch)" ]]; then
        [[ "$ARCH" == arm64 ]] || die "cross-compiling is only set up for arm64"
        command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
    fi
    apt_install "${need[@]}"
}
# The tests compile a tiny C check against the arm64 library and run it under qemu-user.
test_tools() {
    local need=()
    if [[ "$ARCH" == arm64 && "$(host_arch)" != arm64 ]]; then
        command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
        command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
    fi
    apt_install "${need[@]}"
}

current() { [[ -f "$OUT/liboqs.so" && "$(cat "$OUT/.stamp" 2>/dev/null)" == "$STAMP_TEXT" ]]; }
if [[ $CHECK -eq 1 ]]; then
    if current; then exit 0; fi
    echo "liboqs $LIBOQS_VERSION for $ARCH is not built in $OUT" >&2
    exit 1
fi
test_tools
# One build at a time per cache (make -j runs liboqs and liboqs-arm64 side by side and both
# would fetch the same sources).
mkdir -p "$PQFED_CACHE/liboqs"
exec 9>"$PQFED_CACHE/liboqs/.lock"
flock 9
if [[ $FORCE -eq 0 ]] && current; then
    log "liboqs $LIBOQS_VERSION ($ARCH) is current in $OUT"
    exit 0
fi
build_tools


# --- sources: the oqs-sys crate from crates.io --------------------------------------------------
SRC_ROOT="$PQFED_CACHE/liboqs/$LIBOQS_VERSION/src"
SRC="$SRC_ROOT/liboqs"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    work="$SRC_ROOT/fetch"
    rm -rf "$work"
    crate_dir="$(fetch_crate oqs-sys "$OQS_SYS_VERSION" "$OQS_SYS_SHA256" "$work")"
    [[ -f "$crate_dir/liboqs/CMakeLists.txt" ]] || die "oqs-sys crate at $crate_dir has no liboqs/ tree"
    rm -rf "$SRC.tmp" && cp -a "$crate_dir/liboqs" "$SRC.tmp" && mv "$SRC.tmp" "$SRC"
    cp "$work/Cargo.lock" "$SRC_ROOT/Cargo.lock"  # records the crate checksum cargo verified
    rm -rf "$work"
fi

# --- build -------------------------------------------------------------------------------------
BUILD="$PQFED_CACHE/liboqs/$LIBOQS_VERSION/build-$ARCH"
rm -rf "$BUILD"
cmake_args=(
    -S "$SRC" -B "$BUILD" -G Ninja
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON
    -DOQS_BUILD_ONLY_LIB=ON
    -DOQS_USE_OPENSSL=OFF
    -DOQS_DIST_BUILD=ON
    "-DOQS_MINIMAL_BUILD=$ALGORITHMS"
    "-DCMAKE_INSTALL_PREFIX=$BUILD/install"
)
if [[ "$ARCH" != "$(host_arch)" ]]; then
    # liboqs' own toolchain file: Linux/aarch64 with Debian's cross gcc.
    cmake_args+=("-DCMAKE_TOOLCHAIN_FILE=$SRC/.CMake/toolchain_arm64.cmake")
fi
log "configuring liboqs $LIBOQS_VERSION for $ARCH"
cmake "${cmake_args[@]}" >"$BUILD.log" 2>&1 || { tail -30 "$BUILD.log" >&2; die "cmake configure failed (log: $BUILD.log)"; }
log "building (ninja)"
cmake --build "$BUILD" --target install >>"$BUILD.log" 2>&1 || { tail -30 "$BUILD.log" >&2; die "build failed (log: $BUILD.log)"; }

mkdir -p "$OUT"
rm -f "$OUT"/liboqs.so*
cp -a "$BUILD"/install/lib*/liboqs.so* "$OUT"/
rm -rf "$OUT/include" && cp -a "$BUILD/install/include" "$OUT/include"
cp "$SRC/LICENSE.txt" "$OUT/LICENSE.txt"
echo "$STAMP_TEXT" >"$OUT/.stamp"
rm -rf "$BUILD"
log "liboqs $LIBOQS_VERSION ($ARCH) ready: $OUT/liboqs.so"
