#!/usr/bin/env bash
# One real Kubernetes node beside the control plane of up.sh: containerd (CRI,
# runc, overlayfs, cgroupfs), kubelet, kube-proxy (iptables mode) and CoreDNS,
# all built by build.sh; pods are real containers on a CNI bridge of their own.
# up.sh calls `node.sh start` when PQFED_REAL_NODE=1 (or auto: on when root
# and everything is built and installed); down.sh calls `node.sh stop`.
#
# Usage: node.sh start             (idempotent; needs up.sh's control plane)
#        node.sh stop [--wipe]     stop containers, then the node's processes
#        node.sh import ARCHIVE... import OCI/docker image archives into the
#                                  node's containerd (namespace k8s.io), the
#                                  way `k3s ctr images import` does
#        node.sh ctr ARGS...       run ctr against the node's containerd
#        node.sh status            which node processes run
#
# Air-gap directory: every *.tar / *.tar.gz / *.tar.zst archive in
# $PQFED_AIRGAP_DIR (default $PQFED_CLUSTER_DIR/node/agent/images, like k3s's
# /var/lib/rancher/k3s/agent/images/) is imported at start. The node's own
# sandbox image (localhost/pqfed/pause) and test image (localhost/pqfed/busybox)
# are built here (testbed/ociimage.py) into $PQFED_CACHE/images and imported.
#
# Network: bridge PQFED_NODE_BRIDGE (pqfn0) with PQFED_NODE_POD_SUBNET
# (10.89.0.0/16, gateway .1 = the node's InternalIP). Pods get routes only to
# the service range and the control plane's pod subnet, no default route.
# ip_forward is enabled (ClusterIP traffic from a pod to a pod on the same
# bridge is routed), with FORWARD policy DROP: only traffic within bridges
# (and between pods of this node) is forwarded, never to an uplink; no
# MASQUERADE of our own (kube-proxy's masquerades only service hairpin traffic).
# One real node per host: kube-proxy owns the host's KUBE-* iptables chains.
set -euo pipefail
PQFED_SCRIPT=node.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"
REPO="$(cd "$HERE/../.." && pwd)"

NODE_COMPONENTS=(containerd kubelet coredns kube-proxy)
NODE_DIR="$PQFED_CLUSTER_DIR/node"
CTRD_DIR="$NODE_DIR/containerd"
CTRD_SOCK="$CTRD_DIR/containerd.sock"
KUBELET_DIR="$NODE_DIR/kubelet"
CNI_DIR="$NODE_DIR/cni"
IMAGES_CACHE="$PQFED_CACHE/images"
HOST_OWNER=/run/pqfed/real-node.owner   # one real node per host (kube-proxy)
NODE_NAME="$PQFED_REAL_NODE_NAME"
NODE_IP="$PQFED_NODE_IP"
CGROUP_PARENT="pqfed-$NODE_NAME"

usage() { sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

ctr_() { "$PQFED_BIN/ctr" --address "$CTRD_SOCK" --namespace k8s.io "$@"; }

# --------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------
# What is missing for a real node on this host, one reason per line; nothing
# when it can start. up.sh's PQFED_REAL_NODE=auto starts it only then.
missing_prereqs() {
    [[ $EUID -eq 0 ]] || echo "needs root (containers, cgroups, iptables)"
    local b
    for b in containerd ctr containerd-shim-runc-v2 kubelet kube-proxy coredns pause probe; do
        [[ -x "$PQFED_BIN/$b" ]] || echo "$PQFED_BIN/$b is missing: run testbed/cluster/build.sh"
    done
    for b in runc iptables iptables-restore conntrack ip python3; do
        command -v "$b" >/dev/null 2>&1 || echo "'$b' is not installed: run testbed/cluster/deps.sh"
    done
    [[ -x "$PQFED_CNI_BIN_DIR/bridge" && -x "$PQFED_CNI_BIN_DIR/host-local" && -x "$PQFED_CNI_BIN_DIR/loopback" ]] \
        || echo "CNI plugins missing in $PQFED_CNI_BIN_DIR: run testbed/cluster/deps.sh (containernetworking-plugins)"
    [[ -x "$PQFED_BUSYBOX" ]] || echo "$PQFED_BUSYBOX is missing (busybox-static): run testbed/cluster/deps.sh"
    grep -qw overlay /proc/filesystems || echo "the kernel has no overlayfs"
    local other
    if other="$(host_owner)"; then
        echo "another cluster's real node runs on this host ($other): kube-proxy owns the host's KUBE-* iptables chains, so only one can (stop it with PQFED_CLUSTER_DIR=$other testbed/cluster/down.sh)"
    fi
}

# Another cluster's real node on this host, if any (its cluster dir).
host_owner() {
    local owner pid
    [[ -f "$HOST_OWNER" ]] || return 1
    read -r owner pid <"$HOST_OWNER" || return 1
    [[ "$owner" != "$PQFED_CLUSTER_DIR" && "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$owner"
}

# --------------------------------------------------------------------------
# PKI: node identity, kubelet serving cert, CoreDNS identity (cluster CA)
# --------------------------------------------------------------------------

# --------------------------------------------------------------------------
# apiserver objects the node needs (as the admin, with curl: no kubectl here)
# --------------------------------------------------------------------------
api() {  # <method> <path> [json body] -> http status on stdout, body in $NODE_DIR/.api
    curl -s -o "$NODE_DIR/.api" -w '%{http_code}' --max-time 10 -X "$1" \
        --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
        -H 'Content-Type: application/json' ${3:+--data "$3"} "$APISERVER_URL$2" 2>/dev/null || echo 000
}
# Create or replace an object: <collection path> <name> <json>
apply() {
    local code
    if [[ "$(api GET "$1/$2")" == 200 ]]; then
        # An existing Service keeps its allocated clusterIP (immutable); the
        # other kinds are replaced (an unconditional PUT needs no resourceVersion).
        [[ "$1" == */services ]] && return 0
        code="$(api PUT "$1/$2" "$3")"
    else
        code="$(api POST "$1" "$3")"
    fi
    [[ "$code" =~ ^20[01]$ ]] || die "apiserver refused $1/$2 (HTTP $code): $(head -c 600 "$NODE_DIR/.api")"
}

# The `kubernetes` Service's endpoints (the apiserver runs with
# --endpoint-reconciler-type=none, so nobody else writes them) and cluster DNS.
apply_cluster_objects() {
    local slice_meta='"labels":{"kubernetes.io/service-name":"%s","endpointslice.kubernetes.io/managed-by":"pqfed-node.sh"}'
    # shellcheck disable=SC2059
    apply /apis/discovery.k8s.io/v1/namespaces/default/endpointslices kubernetes "$(printf \
        '{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"kubernetes",'"$slice_meta"'},"addressType":"IPv4","endpoints":[{"addresses":["%s"],"conditions":{"ready":true}}],"ports":[{"name":"https","protocol":"TCP","port":%s}]}' \
        kubernetes "$PQFED_HOST" "$PQFED_APISERVER_PORT")"
    apply /api/v1/namespaces/kube-system/services kube-dns "$(printf \
        '{"apiVersion":"v1","kind":"Service","metadata":{"name":"kube-dns","namespace":"kube-system","labels":{"k8s-app":"kube-dns","kubernetes.io/name":"CoreDNS"}},"spec":{"clusterIP":"%s","ports":[{"name":"dns","port":53,"protocol":"UDP","targetPort":53},{"name":"dns-tcp","port":53,"protocol":"TCP","targetPort":53}]}}' \
        "$PQFED_CLUSTER_DNS_IP")"
    # shellcheck disable=SC2059
    apply /apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices kube-dns "$(printf \
        '{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"kube-dns","namespace":"kube-system",'"$slice_meta"'},"addressType":"IPv4","endpoints":[{"addresses":["%s"],"conditions":{"ready":true}}],"ports":[{"name":"dns","protocol":"UDP","port":53},{"name":"dns-tcp","protocol":"TCP","port":53}]}' \
        kube-dns "$NODE_IP")"
    # CoreDNS's own identity, with the rights of upstream's system:coredns role.
    apply /apis/rbac.authorization.k8s.io/v1/clusterroles system:pqfed-coredns \
        '{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRole","metadata":{"name":"system:pqfed-coredns"},"rules":[{"apiGroups":[""],"resources":["endpoints","services","pods","namespaces"],"verbs":["list","watch"]},{"apiGroups":["discovery.k8s.io"],"resources":["endpointslices"],"verbs":["list","watch"]}]}'
    apply /apis/rbac.authorization.k8s.io/v1/clusterrolebindings system:pqfed-coredns \
        '{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding","metadata":{"name":"system:pqfed-coredns"},"roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"system:pqfed-coredns"},"subjects":[{"apiGroup":"rbac.authorization.k8s.io","kind":"User","name":"system:pqfed-coredns"}]}'
}

# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------
# The sandbox and test images, rebuilt when their binaries change.
build_images() {
    mkdir -p "$IMAGES_CACHE"
    local pause_ver busybox_ver
    pause_ver="$(cat "$PQFED_BIN/.stamps/pause")"
    busybox_ver="$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || sha256sum "$PQFED_BUSYBOX" | cut -c1-12)"
    busybox_ver="${busybox_ver//[^A-Za-z0-9_.-]/_}-$(cut -d. -f2 "$PQFED_BIN/.stamps/probe")"
    PAUSE_IMAGE="localhost/pqfed/pause:$pause_ver"
    TEST_IMAGE="localhost/pqfed/busybox:$busybox_ver"
    PAUSE_TAR="$IMAGES_CACHE/pause-$pause_ver.tar"
    TEST_TAR="$IMAGES_CACHE/busybox-$busybox_ver.tar"
    if [[ ! -f "$PAUSE_TAR" ]]; then
        # 65535: the uid upstream's pause image runs as; nothing else in the image.
        python3 "$REPO/testbed/ociimage.py" --name "$PAUSE_IMAGE" --out "$PAUSE_TAR" \
            --file "$PQFED_BIN/pause:/pause:0755" --entrypoint '["/pause"]' --user 65535:65535 \
            --annotation "org.opencontainers.image.version=$pause_ver" \
            --annotation "org.opencontainers.image.title=pqfed pod sandbox"
    fi
    if [[ ! -f "$TEST_TAR" ]]; then
        local -a links=()
        local applet
        while read -r applet; do
            [[ "$applet" == busybox ]] || links+=(--symlink "/bin/$applet:busybox")
        done < <("$PQFED_BUSYBOX" --list)
        python3 "$REPO/testbed/ociimage.py" --name "$TEST_IMAGE" --out "$TEST_TAR" \
            --file "$PQFED_BUSYBOX:/bin/busybox:0755" "${links[@]}" --dir /tmp:1777 \
            --file "$PQFED_BIN/probe:/bin/probe:0755" \
            --dir /etc --entrypoint '["/bin/sh"]' \
            --annotation "org.opencontainers.image.version=$busybox_ver" \
            --annotation "org.opencontainers.image.title=pqfed node test image (Debian busybox-static, probe)"
    fi
}

import_archives() {  # <archive...>
    local a
    for a in "$@"; do
        [[ -f "$a" ]] || die "no such image archive: $a"
        log "importing $a"
        local out
        case "$a" in
            *.tar.gz|*.tgz) out="$(gzip -dc "$a" | ctr_ images import - 2>&1)" ;;
            *.tar.zst) out="$(zstd -dc "$a" | ctr_ images import - 2>&1)" ;;
            *) out="$(ctr_ images import "$a" 2>&1)" ;;
        esac || die "ctr images import $a failed (is it an OCI or docker-archive tar?): $out"
        sed -n 's/^\([^[:space:]]*\)[[:space:]]*saved.*/  imported \1/p' <<<"$out" >&2
    done
}

# --------------------------------------------------------------------------
# configuration files
# --------------------------------------------------------------------------
# Replace a config file only when its content changes: kube-proxy exits when
# its --config file changes, so a rerun of up.sh must leave it untouched.
write_file() {  # <file>, content on stdin
    local tmp="$1.tmp"
    cat >"$tmp"
    if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; fi
}

write_configs() {
    # Can this process lower its oom_score_adj? (CAP_SYS_RESOURCE is not always enough.)
    RESTRICT_OOM=false
    (echo -1 >/proc/self/oom_score_adj) 2>/dev/null || RESTRICT_OOM=true
    mkdir -p "$CTRD_DIR" "$KUBELET_DIR" "$CNI_DIR/net.d" "$CNI_DIR/ipam" "$NODE_DIR/kube-proxy" "$PQFED_AIRGAP_DIR"
    write_file "$CTRD_DIR/config.toml" <<EOF
# Written by testbed/cluster/node.sh: a private containerd for one test node.
version = 4
root = "$CTRD_DIR/root"
state = "$CTRD_DIR/state"
# NRI's socket path is host-global; nothing here uses it.
disabled_plugins = ["io.containerd.nri.v1.nri"]

imports = []

# Config version 4 (containerd 2.4): the listeners are server plugins.
[plugins."io.containerd.server.v1.grpc"]
  address = "$CTRD_SOCK"
[plugins."io.containerd.server.v1.ttrpc"]
  address = "$CTRD_SOCK.ttrpc"
[plugins."io.containerd.server.v1.debug"]
  address = ""
[plugins."io.containerd.server.v1.metrics"]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$CTRD_DIR/opt"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  # Nothing is ever pulled on a node without a registry unless a pod asks.
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$PAUSE_IMAGE"
[plugins."io.containerd.cri.v1.runtime"]
  # Sandboxes ask for oom_score_adj -998; where even root may not lower it
  # (e.g. this test VM), runc would fail. Clamp to containerd's own value.
  restrict_oom_score_adj = $RESTRICT_OOM
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        # cgroup v1 host without a systemd-managed hierarchy: cgroupfs, as the kubelet.
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$PQFED_CNI_BIN_DIR"]
    conf_dir = "$CNI_DIR/net.d"
    max_conf_num = 1
EOF
    local svc_route emu_route
    svc_route="$PQFED_SERVICE_CIDR"
    emu_route="$PQFED_POD_SUBNET"
    write_file "$CNI_DIR/net.d/10-pqfed-node.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "pqfed-node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$PQFED_NODE_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$CNI_DIR/ipam",
        "ranges": [[{"subnet": "$PQFED_NODE_POD_SUBNET", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "$svc_route"}, {"dst": "$emu_route"}]
      }
    }
  ]
}
EOF
    write_file "$KUBELET_DIR/config.yaml" <<EOF
# Written by testbed/cluster/node.sh.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $PQFED_KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $PQFED_KUBELET_HEALTHZ_PORT
tlsCertFile: $PKI/kubelet-serving-$NODE_NAME.crt
tlsPrivateKeyFile: $PKI/kubelet-serving-$NODE_NAME.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$CTRD_SOCK
imageServiceEndpoint: unix://$CTRD_SOCK
cgroupDriver: cgroupfs
# A private cgroup parent per node, so two test clusters never share /kubepods.
cgroupRoot: /$CGROUP_PARENT
# This host is cgroup v1. Since 1.35 the kubelet refuses v1 unless told
# otherwise; v1 support is removed no earlier than 1.38 (KEP-5573).
failCgroupV1: false
failSwapOn: false
clusterDNS: [$PQFED_CLUSTER_DNS_IP]
clusterDomain: cluster.local
resolvConf: $NODE_DIR/resolv.conf
rotateCertificates: false
serverTLSBootstrap: false
volumePluginDir: $KUBELET_DIR/volume-plugins
podLogsDir: $KUBELET_DIR/pod-logs
# A shared test machine's disk is often fuller than the defaults tolerate;
# eviction and image GC would then remove the imported images.
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 110
nodeStatusUpdateFrequency: 5s
syncFrequency: 10s
EOF
    # Pods with dnsPolicy Default: no resolver (nothing outside is reachable).
    : >"$NODE_DIR/resolv.conf"
    write_file "$NODE_DIR/kube-proxy/config.yaml" <<EOF
# Written by testbed/cluster/node.sh.
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: $NODE_DIR/kube-proxy.kubeconfig
hostnameOverride: $NODE_NAME
clusterCIDR: $PQFED_NODE_POD_SUBNET
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:$PQFED_KUBE_PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$PQFED_KUBE_PROXY_METRICS_PORT
# NodePorts only on the node's own bridge address, never on an uplink.
nodePortAddresses: ["$NODE_IP/32"]
iptables:
  localhostNodePorts: false
  masqueradeAll: false
# 0: leave the host's conntrack sysctls alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
    write_file "$NODE_DIR/Corefile" <<EOF
# Written by testbed/cluster/node.sh: cluster DNS for pods of the real node.
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
    bind $NODE_IP
    errors
    health 127.0.0.1:$PQFED_COREDNS_HEALTH_PORT
    ready 127.0.0.1:$PQFED_COREDNS_READY_PORT
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $NODE_DIR/coredns.kubeconfig pqfed-coredns@pqfed
        pods insecure
        ttl 5
    }
    cache 5
    loadbalance
}
EOF
}

# --------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------
ensure_node_bridge() {
    ip link show dev "$PQFED_NODE_BRIDGE" >/dev/null 2>&1 \
        || ip link add name "$PQFED_NODE_BRIDGE" type bridge \
        || die "cannot create bridge $PQFED_NODE_BRIDGE"
    ip -4 -o addr show dev "$PQFED_NODE_BRIDGE" | grep -q " $NODE_IP/16 " \
        || ip addr add "$NODE_IP/16" dev "$PQFED_NODE_BRIDGE" \
        || die "cannot add $NODE_IP/16 to $PQFED_NODE_BRIDGE (PQFED_NODE_POD_SUBNET=$PQFED_NODE_POD_SUBNET overlaps a route?)"
    ip link set dev "$PQFED_NODE_BRIDGE" up
}

# Forwarding is needed for ClusterIP traffic between two pods of the node
# (routed back into the same bridge after kube-proxy's DNAT). Everything else
# routed through this host is dropped, so pods never reach an uplink.
fw() { iptables -w 5 "$@"; }
ensure_forwarding() {
    local c=(-m comment --comment "pqfed: traffic within a bridge")
    fw -C FORWARD -m physdev --physdev-is-bridged "${c[@]}" -j ACCEPT 2>/dev/null \
        || fw -I FORWARD 1 -m physdev --physdev-is-bridged "${c[@]}" -j ACCEPT
    local n=(-m comment --comment "pqfed node $NODE_NAME: pod to pod")
    fw -C FORWARD -i "$PQFED_NODE_BRIDGE" -o "$PQFED_NODE_BRIDGE" "${n[@]}" -j ACCEPT 2>/dev/null \
        || fw -I FORWARD 2 -i "$PQFED_NODE_BRIDGE" -o "$PQFED_NODE_BRIDGE" "${n[@]}" -j ACCEPT
    # Pods of this node and the emulated agents' pods (PQFED_BRIDGE) reach each
    # other, as pods of one cluster do; nothing else crosses bridges.
    local e=(-m comment --comment "pqfed node $NODE_NAME: emulated pods")
    if ip link show dev "$PQFED_BRIDGE" >/dev/null 2>&1; then
        fw -C FORWARD -i "$PQFED_NODE_BRIDGE" -o "$PQFED_BRIDGE" "${e[@]}" -j ACCEPT 2>/dev/null \
            || fw -I FORWARD 2 -i "$PQFED_NODE_BRIDGE" -o "$PQFED_BRIDGE" "${e[@]}" -j ACCEPT
        fw -C FORWARD -i "$PQFED_BRIDGE" -o "$PQFED_NODE_BRIDGE" "${e[@]}" -j ACCEPT 2>/dev/null \
            || fw -I FORWARD 2 -i "$PQFED_BRIDGE" -o "$PQFED_NODE_BRIDGE" "${e[@]}" -j ACCEPT
    fi
    fw -P FORWARD DROP
    if [[ "$(cat /proc/sys/net/ipv4/ip_forward)" != 1 ]]; then
        echo 1 >/proc/sys/net/ipv4/ip_forward
        log "enabled net.ipv4.ip_forward (FORWARD policy DROP; see node.sh header)"
    fi
    # kube-proxy's ClusterIPs for pods on a bridge need bridged traffic in iptables.
    [[ -f /proc/sys/net/bridge/bridge-nf-call-iptables ]] || modprobe br_netfilter 2>/dev/null \
        || die "br_netfilter is not available (needed by kube-proxy for pods on a bridge)"
    echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables
}
remove_forwarding_rule() {
    fw -D FORWARD -i "$PQFED_NODE_BRIDGE" -o "$PQFED_NODE_BRIDGE" \
        -m comment --comment "pqfed node $NODE_NAME: pod to pod" -j ACCEPT 2>/dev/null || true
    local pair
    for pair in "$PQFED_NODE_BRIDGE $PQFED_BRIDGE" "$PQFED_BRIDGE $PQFED_NODE_BRIDGE"; do
        set -- $pair
        fw -D FORWARD -i "$1" -o "$2" -m comment --comment "pqfed node $NODE_NAME: emulated pods" \
            -j ACCEPT 2>/dev/null || true
    done
}

# cgroup v1: the kubelet wants its cgroupRoot to exist in every hierarchy.
ensure_cgroup_parent() {
    local h
    for h in /sys/fs/cgroup/*/; do
        h="${h%/}"
        [[ -f "$h/cgroup.procs" ]] || continue
        mkdir -p "$h/$CGROUP_PARENT"
        if [[ -f "$h/cpuset.cpus" && ! -s "$h/$CGROUP_PARENT/cpuset.cpus" ]]; then
            cat "$h/cpuset.cpus" >"$h/$CGROUP_PARENT/cpuset.cpus"
            cat "$h/cpuset.mems" >"$h/$CGROUP_PARENT/cpuset.mems"
        fi
    done
}
remove_cgroup_parent() {
    local h
    for h in /sys/fs/cgroup/*/; do
        [[ -d "$h$CGROUP_PARENT" ]] || continue
        # Depth first; only empty cgroups can be removed.
        find "$h$CGROUP_PARENT" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
}

# --------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------
args_for() {
    case "$1" in
    containerd) printf '%s\n' --config "$CTRD_DIR/config.toml" ;;
    kubelet)
        printf '%s\n' \
            --config="$KUBELET_DIR/config.yaml" \
            --kubeconfig="$NODE_DIR/kubelet.kubeconfig" \
            --root-dir="$KUBELET_DIR/root" \
            --cert-dir="$KUBELET_DIR/pki" \
            --hostname-override="$NODE_NAME" \
            --node-ip="$NODE_IP" \
            --node-labels="$PQFED_REAL_NODE_LABELS"
        ;;
    kube-proxy) printf '%s\n' --config="$NODE_DIR/kube-proxy/config.yaml" ;;
    coredns) printf '%s\n' -conf "$NODE_DIR/Corefile" ;;
    esac
}

start_one() {  # <component>
    local c="$1" pid
    if pid="$(component_pid "$c")"; then
        log "$c already running (pid $pid)"
        return 0
    fi
    local -a args
    mapfile -t args < <(args_for "$c")
    {
        echo "==== $(date -u +%Y-%m-%dT%H:%M:%SZ) starting $c"
        printf '  %q\n' "$PQFED_BIN/$c" "${args[@]}"
    } >>"$LOGS/$c.log"
    # containerd finds containerd-shim-runc-v2 on PATH.
    PATH="$PQFED_BIN:$PATH" setsid "$PQFED_BIN/$c" "${args[@]}" </dev/null >>"$LOGS/$c.log" 2>&1 &
    pid=$!
    echo "$pid" >"$RUN/$c.pid"
    log "started $c (pid $pid, log $LOGS/$c.log)"
}

wait_until() {  # <component> <description> <command...>
    local c="$1" what="$2"; shift 2
    local deadline=$((SECONDS + PQFED_UP_TIMEOUT))
    until "$@"; do
        if ! component_pid "$c" >/dev/null; then
            tail -n 30 "$LOGS/$c.log" >&2 || true
            die "$c exited while waiting for $what (log: $LOGS/$c.log)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$LOGS/$c.log" >&2 || true
            die "timed out after ${PQFED_UP_TIMEOUT}s waiting for $what (log: $LOGS/$c.log)"
        fi
        sleep 0.5
    done
    log "ok: $what"
}
ctrd_ready() { [[ -S "$CTRD_SOCK" ]] && ctr_ version >/dev/null 2>&1; }
node_ready() {
    [[ "$(api GET "/api/v1/nodes/$NODE_NAME")" == 200 ]] \
        && python3 -c 'import json,sys; n=json.load(open(sys.argv[1])); sys.exit(0 if any(c["type"]=="Ready" and c["status"]=="True" for c in n["status"].get("conditions",[])) else 1)' "$NODE_DIR/.api"
}
healthz() { [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "http://127.0.0.1:$1${2:-/healthz}" 2>/dev/null)" == 200 ]]; }
proxy_healthy() { healthz "$PQFED_KUBE_PROXY_HEALTHZ_PORT"; }
dns_ready() { healthz "$PQFED_COREDNS_READY_PORT" /ready; }

write_node_env() {
    cat >"$NODE_DIR/env" <<EOF
PQFED_REAL_NODE_NAME=$NODE_NAME
PQFED_NODE_BRIDGE=$PQFED_NODE_BRIDGE
PQFED_NODE_POD_SUBNET=$PQFED_NODE_POD_SUBNET
PQFED_NODE_IP=$NODE_IP
PQFED_CLUSTER_DNS_IP=$PQFED_CLUSTER_DNS_IP
PQFED_CONTAINERD_SOCKET=$CTRD_SOCK
PQFED_AIRGAP_DIR=$PQFED_AIRGAP_DIR
PQFED_PAUSE_IMAGE=$PAUSE_IMAGE
PQFED_TEST_IMAGE=$TEST_IMAGE
PQFED_KUBELET_PORT=$PQFED_KUBELET_PORT
EOF
}

cmd_start() {
    local why
    why="$(missing_prereqs)"
    [[ -z "$why" ]] || die "cannot start a real node:"$'\n'"$why"
    [[ -f "$PQFED_CLUSTER_DIR/env" && -f "$PKI/ca.key" ]] || die "no control plane in $PQFED_CLUSTER_DIR: run up.sh first"
    PQFED_HOST="$(sed -n 's/^PQFED_APISERVER_HOST=//p' "$PQFED_CLUSTER_DIR/env")"
    PQFED_BRIDGE="$(sed -n 's/^PQFED_BRIDGE=//p' "$PQFED_CLUSTER_DIR/env")"
    APISERVER_URL="$(sed -n 's/^PQFED_APISERVER_URL=//p' "$PQFED_CLUSTER_DIR/env")"
    [[ "$PQFED_HOST" != "$PQFED_LOOPBACK" ]] \
        || die "the apiserver listens on loopback only, which pods cannot reach: start up.sh with PQFED_POD_NETWORK=on"
    [[ "$PQFED_NODE_POD_SUBNET" =~ ^10\.([0-9]+)\.0\.0/16$ ]] \
        || die "PQFED_NODE_POD_SUBNET=$PQFED_NODE_POD_SUBNET: must be 10.X.0.0/16"
    [[ "$PQFED_NODE_POD_SUBNET" != "$PQFED_POD_SUBNET" ]] \
        || die "PQFED_NODE_POD_SUBNET must differ from the node agents' PQFED_POD_SUBNET ($PQFED_POD_SUBNET)"
    local t0=$SECONDS
    mkdir -p "$NODE_DIR" "$RUN" "$LOGS" /run/pqfed
    chmod 700 "$NODE_DIR"

    issue "kubelet-$NODE_NAME" "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
    issue "kubelet-serving-$NODE_NAME" "/O=system:nodes/CN=system:node:$NODE_NAME" serverAuth \
        "IP:$NODE_IP,DNS:$NODE_NAME"
    issue coredns "/CN=system:pqfed-coredns" clientAuth
    write_kubeconfig "$NODE_DIR/kubelet.kubeconfig" "system:node:$NODE_NAME" "kubelet-$NODE_NAME"
    write_kubeconfig "$NODE_DIR/kube-proxy.kubeconfig" system:kube-proxy kube-proxy
    write_kubeconfig "$NODE_DIR/coredns.kubeconfig" pqfed-coredns coredns

    build_images
    write_configs
    write_node_env
    ensure_node_bridge
    ensure_forwarding
    ensure_cgroup_parent

    start_one containerd
    echo "$PQFED_CLUSTER_DIR $(component_pid containerd)" >"$HOST_OWNER"
    wait_until containerd "containerd at $CTRD_SOCK" ctrd_ready
    import_archives "$PAUSE_TAR" "$TEST_TAR"
    local -a airgap=()
    mapfile -t airgap < <(find "$PQFED_AIRGAP_DIR" -maxdepth 1 -type f \
        \( -name '*.tar' -o -name '*.tar.gz' -o -name '*.tgz' -o -name '*.tar.zst' \) | sort)
    [[ ${#airgap[@]} -eq 0 ]] || import_archives "${airgap[@]}"

    apply_cluster_objects
    start_one kubelet
    start_one coredns
    start_one kube-proxy
    wait_until kubelet "node $NODE_NAME Ready" node_ready
    wait_until kube-proxy "kube-proxy healthy" proxy_healthy
    wait_until coredns "CoreDNS ready on $NODE_IP:53" dns_ready
    log "real node $NODE_NAME up in $((SECONDS - t0))s (pods: $PQFED_NODE_POD_SUBNET on $PQFED_NODE_BRIDGE; images: node.sh import, or drop archives in $PQFED_AIRGAP_DIR)"
}

stop_one() {  # <component>
    local c="$1" pid
    pid="$(component_pid "$c")" || { rm -f "$RUN/$c.pid"; return 0; }
    log "stopping $c (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$RUN/$c.pid"
}

# Containers outlive containerd (their shims keep them), so stop them through
# containerd first; then release their network namespaces.
stop_containers() {
    component_pid containerd >/dev/null || return 0
    local ids id pid ns
    local -a netns_inodes=()
    ids="$(ctr_ tasks ls -q 2>/dev/null || true)"
    [[ -n "$ids" ]] || return 0
    log "stopping $(wc -w <<<"$ids") containers"
    for id in $ids; do
        pid="$(ctr_ tasks ls 2>/dev/null | awk -v id="$id" '$1 == id { print $2 }')"
        [[ "$pid" =~ ^[0-9]+$ ]] && netns_inodes+=("$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null || true)")
        ctr_ tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    sleep 1
    for id in $ids; do
        ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true
        ctr_ containers delete "$id" >/dev/null 2>&1 || true
    done
    for ns in /run/netns/cni-*; do
        [[ -e "$ns" ]] || continue
        if [[ " ${netns_inodes[*]} " == *" $(stat -L -c %i "$ns" 2>/dev/null) "* ]]; then
            umount "$ns" 2>/dev/null || true
            rm -f "$ns"
        fi
    done
}

cmd_stop() {
    local wipe="${1:-}"
    [[ -d "$NODE_DIR" ]] || return 0
    if [[ -f "$PQFED_CLUSTER_DIR/env" ]]; then
        PQFED_BRIDGE="$(sed -n 's/^PQFED_BRIDGE=//p' "$PQFED_CLUSTER_DIR/env")"
    fi
    stop_one kube-proxy
    stop_one coredns
    stop_one kubelet
    stop_containers
    stop_one containerd
    # kube-proxy's chains, unless another cluster's node owns them now.
    if [[ -x "$PQFED_BIN/kube-proxy" && $EUID -eq 0 ]] && ! host_owner >/dev/null; then
        "$PQFED_BIN/kube-proxy" --cleanup >>"$LOGS/kube-proxy.log" 2>&1 || true
        # The kubelet's own canary chains (it watches them to notice a flush).
        local t
        for t in mangle nat filter; do
            iptables -w 5 -t "$t" -X KUBE-KUBELET-CANARY 2>/dev/null || true
        done
    fi
    if [[ -f "$HOST_OWNER" && "$(cut -d' ' -f1 "$HOST_OWNER")" == "$PQFED_CLUSTER_DIR" ]]; then
        rm -f "$HOST_OWNER"
    fi
    # Volumes (service-account tokens, emptyDirs) and container rootfs mounts.
    local m
    while read -r m; do
        umount -l "$(printf '%b' "$m")" 2>/dev/null || true
    done < <(findmnt -rn -o TARGET 2>/dev/null | grep -F "$NODE_DIR/" | sort -r || true)
    if [[ $EUID -eq 0 ]]; then
        remove_forwarding_rule
        remove_cgroup_parent
    fi
    if [[ "$wipe" == --wipe ]]; then
        ip link delete dev "$PQFED_NODE_BRIDGE" 2>/dev/null && log "deleted bridge $PQFED_NODE_BRIDGE"
        rm -rf "$NODE_DIR"
    fi
    log "real node $NODE_NAME stopped"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop "${2:-}" ;;
    import)
        shift
        [[ $# -gt 0 ]] || die "usage: node.sh import ARCHIVE..."
        component_pid containerd >/dev/null \
            || die "the node's containerd is not running (start it with up.sh and PQFED_REAL_NODE=1, or drop the archives into $PQFED_AIRGAP_DIR)"
        import_archives "$@"
        ;;
    ctr) shift; ctr_ "$@" ;;
    status)
        for c in "${NODE_COMPONENTS[@]}"; do
            if pid="$(component_pid "$c")"; then echo "$c running (pid $pid)"; else echo "$c stopped"; fi
        done
        ;;
    prereqs) missing_prereqs ;;
    -h|--help|"") usage ;;
    *) die "unknown command: $1 (try --help)" ;;
esac
