#!/usr/bin/env bash
# Install the Debian packages the real node of the test cluster (node.sh)
# needs and a bare CI machine lacks: runc (the OCI runtime containerd's shim
# calls), containernetworking-plugins (bridge, host-local, loopback, portmap
# CNI plugins in /usr/lib/cni), iptables + conntrack (kube-proxy's iptables
# mode) and busybox-static (the binary of the node's test image).
# Everything else (containerd, kubelet, kube-proxy, CoreDNS, pause) is built
# from the Go module proxy by build.sh.
#
# Usage: deps.sh [--check]
#   --check  install nothing; exit 1 and list what is missing
# Installs only as root with apt-get; otherwise says what to install.
set -euo pipefail
PACKAGES=(runc containernetworking-plugins iptables conntrack busybox-static)

log() { printf '[deps.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    log "ok: ${PACKAGES[*]}"
    exit 0
fi
if [[ "${1:-}" == --check ]]; then
    echo "missing: ${missing[*]}"
    exit 1
fi
if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    # The real node needs root anyway; without it node.sh is skipped.
    log "not installing ${missing[*]} (needs root and apt-get): the real node will not start"
    exit 0
fi
log "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# A bare machine may never have fetched the package lists.
# Waits for dpkg's lock: `make -j2 cluster-binaries images` runs images/prereqs.sh beside this.
lock=(-o DPkg::Lock::Timeout=600)
apt-get "${lock[@]}" install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    apt-get "${lock[@]}" update -q >/dev/null
    apt-get "${lock[@]}" install -y -q --no-install-recommends "${missing[@]}"
}
log "installed ${missing[*]}"
