# Helpers shared by the scripts in pqc/native (sourced, never run): logging, the cache root,
# the host architecture, installing missing tools with apt-get, and fetching a pinned crate
# from crates.io. A script sets LOG_TAG (its name in log lines) before sourcing this file.
#
#     LOG_TAG=build-liboqs
#     source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The cache outside the repository (pqfed.cache in Python reads the same variable).
PQFED_CACHE="${PQFED_CACHE:-$HOME/.cache/pqfed}"

log() { printf '[%s %s] %s\n' "$LOG_TAG" "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$LOG_TAG" "$*" >&2; exit 1; }

# Debian's name of this machine's architecture (amd64, arm64), or `uname -m` for others.
host_arch() {
    case "$(uname -m)" in
        x86_64) echo amd64 ;;
        aarch64|arm64) echo arm64 ;;
        *) uname -m ;;
    esac
}

# apt_install PACKAGE...: install what is missing when running as root (CI starts from a bare
# machine), waiting for the dpkg lock (other prerequisite scripts may be installing at the
# same time); otherwise stop and say what to install.
apt_install() {
    [[ $# -gt 0 ]] || return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing $* with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=900 install -y -q "$@" >/dev/null 2>&1 \
            || { apt-get -o DPkg::Lock::Timeout=900 update -q >/dev/null && apt-get -o DPkg::Lock::Timeout=900 install -y -q "$@" >/dev/null; } \
            || die "apt-get install $* failed"
    else
        die "missing tools: $*; install them (apt-get install $*) and rerun"
    fi
}

# fetch_crate NAME VERSION SHA256 WORK: fetch the crates.io package NAME at exactly VERSION
# with cargo (which checks the download against the registry index), check the index's
# checksum against the pin SHA256 and print the directory of the unpacked crate. WORK is an
# empty scratch directory; its Cargo.lock records the checksum cargo verified.
fetch_crate() {
    local name="$1" version="$2" sha256="$3" work="$4" got manifest
    mkdir -p "$work/src"
    cat >"$work/Cargo.toml" <<TOML
[package]
name = "pqfed-$name-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
$name = { version = "=$version", default-features = false }
TOML
    echo 'fn main() {}' >"$work/src/main.rs"
    log "fetching $name $version from crates.io"
    cargo fetch --quiet --manifest-path "$work/Cargo.toml" \
        || die "cargo fetch of $name failed (needs crates.io and a recent cargo, e.g. from rustup)"
    got="$(grep -A3 "^name = \"$name\"\$" "$work/Cargo.lock" | sed -n 's/^checksum = "\(.*\)"$/\1/p')"
    [[ "$got" == "$sha256" ]] || die "$name $version checksum is '$got', expected $sha256"
    manifest="$(cargo metadata --format-version 1 --manifest-path "$work/Cargo.toml" \
        | python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]==sys.argv[1]))' "$name")"
    dirname "$manifest"
}

# crate_archive NAME VERSION SHA256 WORK: fetch_crate, then print the path of the .crate file
# cargo downloaded, after checking its own SHA-256 against the pin (the unpacked copy under
# cargo's registry/src is not checked by cargo again, so callers that need the sources unpack
# this archive themselves).
crate_archive() {
    local name="$1" version="$2" sha256="$3" work="$4" archive got
    fetch_crate "$name" "$version" "$sha256" "$work" >/dev/null
    archive="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/cache" -name "$name-$version.crate" \
        2>/dev/null | head -1 || true)"
    [[ -f "$archive" ]] || die "cargo fetched $name $version but its .crate is not in ${CARGO_HOME:-$HOME/.cargo}/registry/cache"
    got="$(sha256sum "$archive" | cut -d' ' -f1)"
    [[ "$got" == "$sha256" ]] || die "$archive has sha256 $got, expected $sha256"
    echo "$archive"
}
