#!/usr/bin/env bash
# Build the `openssl` program of OpenSSL 3.5 (LTS), a second, independent OpenSSL for the
# interop tests (tests/pqc/test_openssl35_interop.py), into a cache outside the repo:
#
#     ${PQFED_CACHE:-$HOME/.cache/pqfed}/openssl35/dist/bin/openssl
#     ${PQFED_CACHE:-$HOME/.cache/pqfed}/openssl35/dist/ssl/openssl.cnf   (its OPENSSLDIR)
#
# Why: pqfed's TLS channel and X.509 code run on the OpenSSL 4.0.3 bundled in pyca/cryptography
# (pqc/tls13.py). OpenSSL 3.5 is the first release with ML-DSA and ML-KEM (its own
# implementations, a release line maintained separately), and it is what a site's `openssl`
# tooling will be: `openssl x509 -text`, `verify`, `req`, `crl`, `s_client` and `s_server`
# from it must read our certificates and talk to our channel. Hosts commonly have 3.0 (no
# ML-DSA); pyca's wheel has no `openssl` program.
#
# Where the sources come from: the crates.io package openssl-src (pinned below), which bundles
# the OpenSSL release in openssl/; it is used as a source archive only. cargo fetches the .crate
# and checks it against the registry index; we check the .crate's SHA-256 against the pin
# (lib.sh, crate_archive) and unpack it into a scratch directory. No GitHub download.
#
# What is built: `apps/openssl` alone, linked statically against libcrypto.a and libssl.a
# (no-shared: nothing outside the cache is loaded at run time but libc), from a trimmed
# configuration: no tests, docs, engines, loadable modules or legacy provider, and without the
# protocols and algorithms pqfed's tests never reach (QUIC, DTLS, SRP, CMS/CMP/TS, OCSP, CT and
# the national or legacy ciphers), to keep the cold build short; ML-DSA, ML-KEM, X25519, TLS 1.3,
# X.509, PKCS#10 and CRLs are all in. Default optimisation (-O3) and assembly, as released.
#
# Needs perl, make and a C compiler (apt-get installed when missing and running as root), and
# cargo for the download (lib.sh). Run it at low priority on a shared machine (`nice`).
# Idempotent: nothing is rebuilt when the program and its stamp are current.
#
# Usage: build-openssl35.sh [--force] [--check] [--print-path]
#   --force       rebuild even when the stamp matches
#   --check       build nothing; exit 0 when the program is present and current, 1 otherwise
#   --print-path  print the path of the `openssl` program and exit
set -euo pipefail

OPENSSL_SRC_VERSION="300.5.5+3.5.5"
# SHA-256 of that .crate as published on crates.io.
OPENSSL_SRC_SHA256="3f1787d533e03597a7934fd0a765f0d28e94ecc5fb7789f8053b1e699a56f709"
OPENSSL_VERSION="${OPENSSL_SRC_VERSION##*+}"
CONFIGURE_OPTIONS=(
    no-shared no-module no-legacy no-engine no-dso no-tests no-docs
    no-quic no-dtls no-srp no-psk no-srtp no-gost no-cms no-cmp no-ts no-ct no-ocsp no-comp
    no-sm2 no-sm3 no-sm4 no-aria no-camellia no-seed no-idea no-bf no-cast no-rc2 no-rc4
    no-md4 no-mdc2 no-whirlpool
)
LOG_TAG=build-openssl35
# shellcheck source=pqc/native/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BASE="$PQFED_CACHE/openssl35"
OUT="$BASE/dist"
FORCE=0
CHECK=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) FORCE=1 ;;
        --check) CHECK=1 ;;
        --print-path) echo "$OUT/bin/openssl"; exit 0 ;;
        -h|--help) sed -n '2,34p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

ARCH="$(host_arch)"
# The stamp covers what the program depends on: the source release and the options (not the
# whole script, so that editing a comment does not cost a rebuild).
OPTIONS_HASH="$(echo "${CONFIGURE_OPTIONS[*]}" | sha256sum | cut -c1-16)"
STAMP_TEXT="openssl-src=$OPENSSL_SRC_VERSION arch=$ARCH options=$OPTIONS_HASH"
current() {
    [[ -x "$OUT/bin/openssl" && "$(cat "$OUT/.stamp" 2>/dev/null)" == "$STAMP_TEXT" ]]
}
if [[ $CHECK -eq 1 ]]; then
    current && exit 0
    echo "OpenSSL $OPENSSL_VERSION's openssl program is not built (or is stale) in $OUT:" \
        "run \`make openssl35\`" >&2
    exit 1
fi
mkdir -p "$BASE"
exec 9>"$BASE/.lock"
flock 9
if [[ $FORCE -eq 0 ]] && current; then
    log "openssl $OPENSSL_VERSION is current in $OUT"
    exit 0
fi

need=()
command -v perl >/dev/null || need+=(perl)
command -v make >/dev/null || need+=(make)
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v cargo >/dev/null || need+=(cargo)
apt_install "${need[@]}"

WORK="$BASE/work"
rm -rf "$WORK" "$OUT.tmp"
mkdir -p "$WORK/fetch" "$WORK/src" "$WORK/build"
trap 'rm -rf "$WORK"' EXIT

archive="$(crate_archive openssl-src "$OPENSSL_SRC_VERSION" "$OPENSSL_SRC_SHA256" "$WORK/fetch")"
tar -xzf "$archive" -C "$WORK/src" --strip-components=1 "openssl-src-$OPENSSL_SRC_VERSION/openssl"
SRC="$WORK/src/openssl"
[[ -x "$SRC/Configure" ]] || die "$archive has no openssl/Configure"
grep -q "^MAJOR=3\$" "$SRC/VERSION.dat" && grep -q "^MINOR=5\$" "$SRC/VERSION.dat" \
    || die "$archive does not hold OpenSSL 3.5 (VERSION.dat: $(tr '\n' ' ' <"$SRC/VERSION.dat"))"

jobs="$(nproc 2>/dev/null || echo 2)"
log "configuring OpenSSL $OPENSSL_VERSION (${CONFIGURE_OPTIONS[*]})"
(cd "$WORK/build" && "$SRC/Configure" --prefix="$OUT" --openssldir="$OUT/ssl" \
    "${CONFIGURE_OPTIONS[@]}" >"$WORK/configure.log" 2>&1) \
    || { tail -30 "$WORK/configure.log" >&2; die "Configure failed"; }
log "building apps/openssl with $jobs jobs"
# Generated headers first (the object rules do not all depend on them), then the one program.
(cd "$WORK/build" && make -j"$jobs" build_generated >"$WORK/make.log" 2>&1 \
    && make -j"$jobs" apps/openssl >>"$WORK/make.log" 2>&1) \
    || { tail -40 "$WORK/make.log" >&2; die "make apps/openssl failed"; }

mkdir -p "$OUT.tmp/bin" "$OUT.tmp/ssl"
cp "$WORK/build/apps/openssl" "$OUT.tmp/bin/openssl"
strip "$OUT.tmp/bin/openssl" 2>/dev/null || true
# The crate leaves out apps/openssl.cnf; the program reads OPENSSLDIR/openssl.cnf (`req` fails
# without one), and the tests need nothing from it: an empty configuration, so only the
# command lines say what is checked.
echo "# OpenSSL $OPENSSL_VERSION for pqfed's interop tests: empty on purpose (build-openssl35.sh)" \
    >"$OUT.tmp/ssl/openssl.cnf"
got="$("$OUT.tmp/bin/openssl" version)"
[[ "$got" == "OpenSSL $OPENSSL_VERSION "* ]] || die "the built program says '$got'"
echo "$STAMP_TEXT" >"$OUT.tmp/.stamp"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
log "ready: $OUT/bin/openssl ($got)"
