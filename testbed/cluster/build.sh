#!/usr/bin/env bash
# Build the binaries of a real Kubernetes control plane (etcd, etcdctl,
# kube-apiserver, kube-controller-manager, kube-scheduler), of its one real
# node (kubelet, kube-proxy, containerd, ctr, containerd-shim-runc-v2, CoreDNS
# and the pod sandbox program `pause`, see node.sh) plus helm, from the Go
# module proxy, into a cache directory outside the repo:
#
#     ${PQFED_CACHE:-$HOME/.cache/pqfed}/bin
#
# Idempotent: a binary is rebuilt only when it is missing or its version stamp
# (bin/.stamps/<name>) does not match the wanted version. Needs only `go`.
#
# Usage: build.sh [--force] [--check] [--jobs N] [NAME...]
#   NAME     build only these (etcd etcdctl kube-apiserver
#            kube-controller-manager kube-scheduler helm kubelet kube-proxy
#            containerd ctr containerd-shim-runc-v2 coredns pause probe);
#            default: all
#   --force  rebuild even if the stamp matches
#   --check  build nothing; exit 0 if every selected binary is up to date,
#            1 otherwise (lists what is missing)
#   --jobs N go build parallelism (default 2, i.e. GOFLAGS=-p=2)
#
# Versions: etcd, Kubernetes, containerd and CoreDNS are pinned by the wrapper
# modules testbed/cluster/{etcd,k8s,containerd,coredns}/go.mod; our own pause
# and probe (the node's sandbox and test-image programs) by a hash of their
# source; helm by
# HELM_VERSION (env, default below). On 2 cores a cold build of everything
# takes a long while (the Kubernetes binaries dominate); the Go build cache
# (GOCACHE) makes later rebuilds much faster.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PQFED_CACHE="${PQFED_CACHE:-$HOME/.cache/pqfed}"
BIN="$PQFED_CACHE/bin"
STAMPS="$BIN/.stamps"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"

ALL=(etcd etcdctl helm kube-apiserver kube-controller-manager kube-scheduler
     kubelet kube-proxy containerd ctr containerd-shim-runc-v2 coredns pause probe)

log() { printf '[build.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[build.sh] ERROR: %s\n' "$*" >&2; exit 1; }

FORCE=0
CHECK=0
JOBS=2
SELECTED=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) FORCE=1 ;;
        --check) CHECK=1 ;;
        --jobs) shift; JOBS="${1:?--jobs needs a number}" ;;
        --jobs=*) JOBS="${1#--jobs=}" ;;
        -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option: $1" ;;
        *)
            case " ${ALL[*]} " in
                *" $1 "*) SELECTED+=("$1") ;;
                *) die "unknown binary '$1' (known: ${ALL[*]})" ;;
            esac ;;
    esac
    shift
done
[[ ${#SELECTED[@]} -gt 0 ]] || SELECTED=("${ALL[@]}")

# Version of a module required by a wrapper go.mod (single-line or block form).
modversion() {  # <go.mod> <module path>
    awk -v m="$2" '
        $1 == "require" && $2 == m { print $3; exit }
        $1 == m && $2 ~ /^v[0-9]/   { print $2; exit }
    ' "$1"
}

KUBE_VERSION="$(modversion "$HERE/k8s/go.mod" k8s.io/kubernetes)"
ETCD_VERSION="$(modversion "$HERE/etcd/go.mod" go.etcd.io/etcd/server/v3)"
[[ -n "$KUBE_VERSION" ]] || die "cannot read the k8s.io/kubernetes version from $HERE/k8s/go.mod"
[[ -n "$ETCD_VERSION" ]] || die "cannot read the etcd version from $HERE/etcd/go.mod"
CONTAINERD_VERSION="$(modversion "$HERE/containerd/go.mod" github.com/containerd/containerd/v2)"
COREDNS_VERSION="$(modversion "$HERE/coredns/go.mod" github.com/coredns/coredns)"
[[ -n "$CONTAINERD_VERSION" ]] || die "cannot read the containerd version from $HERE/containerd/go.mod"
[[ -n "$COREDNS_VERSION" ]] || die "cannot read the CoreDNS version from $HERE/coredns/go.mod"
# Our own programs: their version is their source, so an edit rebuilds them.
PAUSE_VERSION="3.10-pqfed.$(cat "$HERE/pause/main.go" "$HERE/pause/go.mod" | sha256sum | cut -c1-12)"
PROBE_VERSION="pqfed.$(cat "$HERE/probe/main.go" "$HERE/probe/go.mod" | sha256sum | cut -c1-12)"

want_version() {  # <name>
    case "$1" in
        etcd|etcdctl) echo "$ETCD_VERSION" ;;
        helm) echo "$HELM_VERSION" ;;
        kube-*|kubelet) echo "$KUBE_VERSION" ;;
        containerd|ctr|containerd-shim-runc-v2) echo "$CONTAINERD_VERSION" ;;
        coredns) echo "$COREDNS_VERSION" ;;
        pause) echo "$PAUSE_VERSION" ;;
        probe) echo "$PROBE_VERSION" ;;
    esac
}

is_current() {  # <name>
    [[ -x "$BIN/$1" && -f "$STAMPS/$1" ]] && [[ "$(cat "$STAMPS/$1")" == "$(want_version "$1")" ]]
}

is_selected() { case " ${SELECTED[*]} " in *" $1 "*) return 0 ;; esac; return 1; }

if [[ $CHECK -eq 1 ]]; then
    missing=0
    for n in "${SELECTED[@]}"; do
        if is_current "$n"; then
            echo "ok       $n $(want_version "$n")"
        else
            echo "missing  $n $(want_version "$n")"; missing=1
        fi
    done
    exit $missing
fi

mkdir -p "$BIN" "$STAMPS"

# One build at a time per cache directory.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$BIN/.build.lock"
    if ! flock -n 9; then
        log "another build.sh holds $BIN/.build.lock; waiting for it"
        flock 9
    fi
fi

export GOFLAGS="${GOFLAGS:+$GOFLAGS }-p=$JOBS"
export CGO_ENABLED="${CGO_ENABLED:-0}"
TMP="$(mktemp -d "$BIN/.tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# Move freshly built binaries from $TMP into $BIN and stamp them.
install_built() {  # <version> <name...>
    local v="$1"; shift
    local n
    for n in "$@"; do
        [[ -x "$TMP/$n" ]] || die "go build did not produce $n"
        mv -f "$TMP/$n" "$BIN/$n"
        echo "$v" >"$STAMPS/$n"
        log "installed $BIN/$n ($v, $(du -h "$BIN/$n" | cut -f1))"
    done
}

# Which of the given names need (re)building.
todo() {
    local n
    for n in "$@"; do
        is_selected "$n" || continue
        if [[ $FORCE -eq 0 ]] && is_current "$n"; then
            log "skip $n: $BIN/$n is already $(want_version "$n")"
        else
            echo "$n"
        fi
    done
}

# Go is needed only when something has to be built.
GO_OK=0
ensure_go() {
    [[ $GO_OK -eq 1 ]] && return 0
    # The official tarball's place, when a login shell's profile did not put it on PATH.
    if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
        PATH=$PATH:/usr/local/go/bin
    fi
    command -v go >/dev/null 2>&1 || die "go is not on PATH (need Go >= 1.26; e.g. the official tarball in /usr/local/go)"
    log "go $(go env GOVERSION), GOFLAGS='$GOFLAGS', CGO_ENABLED=$CGO_ENABLED, GOCACHE=$(go env GOCACHE)"
    GO_OK=1
}

START=$SECONDS
log "cache: $BIN"
log "versions: etcd $ETCD_VERSION, kubernetes $KUBE_VERSION, helm $HELM_VERSION, containerd $CONTAINERD_VERSION, coredns $COREDNS_VERSION"

# --- etcd + etcdctl ---------------------------------------------------------
mapfile -t need < <(todo etcd etcdctl)
if [[ ${#need[@]} -gt 0 ]]; then
    ensure_go
    pkgs=()
    for n in "${need[@]}"; do
        case "$n" in
            etcd) pkgs+=(go.etcd.io/etcd/server/v3) ;;
            etcdctl) pkgs+=(go.etcd.io/etcd/etcdctl/v3) ;;
        esac
    done
    for p in "${pkgs[@]}"; do
        n=etcd; [[ "$p" == *etcdctl* ]] && n=etcdctl
        log "building $n $ETCD_VERSION ($p)"
        t=$SECONDS
        (cd "$HERE/etcd" && go build -trimpath -ldflags "-s -w" -o "$TMP/$n" "$p") \
            || die "building $n failed"
        log "built $n in $((SECONDS - t))s"
        install_built "$ETCD_VERSION" "$n"
    done
fi

# --- helm -------------------------------------------------------------------
mapfile -t need < <(todo helm)
if [[ ${#need[@]} -gt 0 ]]; then
    ensure_go
    major="${HELM_VERSION%%.*}"   # v3 / v4
    mod="helm.sh/helm/$major"
    log "building helm $HELM_VERSION (go install $mod/cmd/helm@$HELM_VERSION)"
    t=$SECONDS
    GOBIN="$TMP" go install -trimpath \
        -ldflags "-s -w -X $mod/internal/version.version=$HELM_VERSION -X $mod/internal/version.gitTreeState=clean" \
        "$mod/cmd/helm@$HELM_VERSION" || die "building helm failed"
    log "built helm in $((SECONDS - t))s"
    install_built "$HELM_VERSION" helm
fi

# --- kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy
mapfile -t need < <(todo kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
if [[ ${#need[@]} -gt 0 ]]; then
    ensure_go
    ver="${KUBE_VERSION#v}"
    major="${ver%%.*}"
    minor="${ver#*.}"; minor="${minor%%.*}"
    now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    ldflags="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
        ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$now"
    done
    pkgs=()
    for n in "${need[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$n"); done
    # One `go build` for all of them, so shared packages compile once.
    log "building ${need[*]} $KUBE_VERSION (this is the slow part)"
    t=$SECONDS
    (cd "$HERE/k8s" && go build -trimpath -ldflags "$ldflags" -o "$TMP/" "${pkgs[@]}") \
        || die "building ${need[*]} failed"
    log "built ${need[*]} in $((SECONDS - t))s"
    install_built "$KUBE_VERSION" "${need[@]}"
fi

# --- containerd, ctr, containerd-shim-runc-v2 --------------------------------
mapfile -t need < <(todo containerd ctr containerd-shim-runc-v2)
if [[ ${#need[@]} -gt 0 ]]; then
    ensure_go
    pkgs=()
    for n in "${need[@]}"; do pkgs+=("github.com/containerd/containerd/v2/cmd/$n"); done
    # CGO is off: the tags drop the snapshotters that need cgo or kernel
    # features we do not use (the node runs on overlayfs).
    log "building ${need[*]} $CONTAINERD_VERSION"
    t=$SECONDS
    (cd "$HERE/containerd" && go build -trimpath -tags "no_btrfs no_devmapper no_zfs" \
        -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
        -o "$TMP/" "${pkgs[@]}") || die "building ${need[*]} failed"
    log "built ${need[*]} in $((SECONDS - t))s"
    install_built "$CONTAINERD_VERSION" "${need[@]}"
fi

# --- coredns (only the plugins node.sh's Corefile uses: coredns/main.go) ---
mapfile -t need < <(todo coredns)
if [[ ${#need[@]} -gt 0 ]]; then
    ensure_go
    log "building coredns $COREDNS_VERSION"
    t=$SECONDS
    (cd "$HERE/coredns" && go build -trimpath \
        -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" \
        -o "$TMP/coredns" .) || die "building coredns failed"
    log "built coredns in $((SECONDS - t))s"
    install_built "$COREDNS_VERSION" coredns
fi

# --- pause, probe (the node's sandbox and test-image programs; see node.sh) --
for n in $(todo pause probe); do
    ensure_go
    v="$(want_version "$n")"
    log "building $n $v"
    (cd "$HERE/$n" && go build -trimpath -ldflags "-s -w -X main.version=$v" -o "$TMP/$n" .) \
        || die "building $n failed"
    install_built "$v" "$n"
done

log "done in $((SECONDS - START))s:"
for n in "${SELECTED[@]}"; do
    if is_current "$n"; then
        printf '  %-26s %-9s %s\n' "$n" "$(want_version "$n")" "$(du -h "$BIN/$n" | cut -f1)" >&2
    else
        die "$n is not built"
    fi
done
