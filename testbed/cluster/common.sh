# Shared settings for up.sh / down.sh. Source it, do not run it.
# Every value can be overridden from the environment.
# shellcheck shell=bash disable=SC2034  # variables are used by the scripts that source this

PQFED_CACHE="${PQFED_CACHE:-$HOME/.cache/pqfed}"
PQFED_BIN="${PQFED_BIN:-$PQFED_CACHE/bin}"
PQFED_CLUSTER_DIR="${PQFED_CLUSTER_DIR:-$PQFED_CACHE/cluster}"

PQFED_ETCD_CLIENT_PORT="${PQFED_ETCD_CLIENT_PORT:-12379}"
PQFED_ETCD_PEER_PORT="${PQFED_ETCD_PEER_PORT:-12380}"
PQFED_APISERVER_PORT="${PQFED_APISERVER_PORT:-16443}"
PQFED_KCM_PORT="${PQFED_KCM_PORT:-16257}"
PQFED_SCHEDULER_PORT="${PQFED_SCHEDULER_PORT:-16259}"
PQFED_SERVICE_CIDR="${PQFED_SERVICE_CIDR:-10.96.0.0/16}"
PQFED_SERVICE_IP="${PQFED_SERVICE_IP:-10.96.0.1}"          # first IP of the range
PQFED_NODE_NAMES="${PQFED_NODE_NAMES:-pqfed-node-0 pqfed-node-1}"
PQFED_UP_TIMEOUT="${PQFED_UP_TIMEOUT:-180}"
# A throw-away test cluster does not need durable writes; fsync is slow on CI.
PQFED_ETCD_UNSAFE_NO_FSYNC="${PQFED_ETCD_UNSAFE_NO_FSYNC:-1}"

# etcd, controller-manager and scheduler only ever bind loopback.
PQFED_LOOPBACK=127.0.0.1

# Pod network for the node agents (pqfed node-agent): a host bridge whose first
# address is the host side of every pod's veth. The apiserver binds that
# address (and only that one) so that pods in their network namespaces reach
# it; the bridge is not connected to any uplink and ip_forward is not touched.
#   PQFED_POD_NETWORK=auto  on when root and `ip` is available, else loopback
#                    on     fail if the bridge cannot be set up
#                    off    apiserver on 127.0.0.1 (pods cannot reach it)
PQFED_POD_NETWORK="${PQFED_POD_NETWORK:-auto}"
PQFED_BRIDGE="${PQFED_BRIDGE:-pqfed0}"
PQFED_POD_SUBNET="${PQFED_POD_SUBNET:-10.88.0.0/16}"    # must be a /16: 10.88.<node>.<pod>
PQFED_BRIDGE_IP="${PQFED_POD_SUBNET%.*/*}.1"             # 10.88.0.1

# The address the apiserver binds and every kubeconfig points at: the bridge
# address when the pod network is on (decided by up.sh), else loopback.
PQFED_HOST=$PQFED_LOOPBACK

PKI="$PQFED_CLUSTER_DIR/pki"
RUN="$PQFED_CLUSTER_DIR/run"
LOGS="$PQFED_CLUSTER_DIR/logs"
KUBECONFIG_ADMIN="$PQFED_CLUSTER_DIR/kubeconfig"
APISERVER_URL="https://$PQFED_HOST:$PQFED_APISERVER_PORT"   # recomputed by up.sh
AGENTS="$PQFED_CLUSTER_DIR/agents"    # default state dirs of `pqfed node-agent`

# Start order; down.sh stops them in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler)

log() { printf '[%s %s] %s\n' "${PQFED_SCRIPT:-cluster}" "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "${PQFED_SCRIPT:-cluster}" "$*" >&2; exit 1; }

# pid of a running component, from its pidfile, or nothing. The process must
# still run our binary, so a recycled pid is not mistaken for it.
component_pid() {  # <name>
    local pidfile="$RUN/$1.pid" pid exe
    [[ -f "$pidfile" ]] || return 1
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
    exe="${exe% (deleted)}"
    [[ "$exe" == "$PQFED_BIN/$1" || "$exe" == "$(cd "$PQFED_BIN" 2>/dev/null && pwd -P)/$1" ]] || return 1
    echo "$pid"
}

# The real node (node.sh: containerd + kubelet + kube-proxy + CoreDNS):
#   PQFED_REAL_NODE=0     none (default of up.sh: tests start it explicitly)
#                   1     start it with the control plane; fail if it cannot
#                   auto  start it when root and everything is built (make cluster-up)
PQFED_REAL_NODE="${PQFED_REAL_NODE:-0}"
PQFED_REAL_NODE_NAME="${PQFED_REAL_NODE_NAME:-pqfed-real-0}"
PQFED_NODE_BRIDGE="${PQFED_NODE_BRIDGE:-pqfn0}"
PQFED_NODE_POD_SUBNET="${PQFED_NODE_POD_SUBNET:-10.89.0.0/16}"   # must differ from PQFED_POD_SUBNET
PQFED_NODE_IP="${PQFED_NODE_POD_SUBNET%.*/*}.1"                   # bridge gateway = node InternalIP
PQFED_CLUSTER_DNS_IP="${PQFED_CLUSTER_DNS_IP:-10.96.0.10}"
PQFED_KUBELET_PORT="${PQFED_KUBELET_PORT:-10250}"
PQFED_KUBELET_HEALTHZ_PORT="${PQFED_KUBELET_HEALTHZ_PORT:-10248}"
PQFED_KUBE_PROXY_HEALTHZ_PORT="${PQFED_KUBE_PROXY_HEALTHZ_PORT:-10256}"
PQFED_KUBE_PROXY_METRICS_PORT="${PQFED_KUBE_PROXY_METRICS_PORT:-10249}"
PQFED_COREDNS_HEALTH_PORT="${PQFED_COREDNS_HEALTH_PORT:-18080}"
PQFED_COREDNS_READY_PORT="${PQFED_COREDNS_READY_PORT:-18181}"
PQFED_REAL_NODE_LABELS="${PQFED_REAL_NODE_LABELS:-pqfed.io/testbed=real,node.kubernetes.io/instance-type=pqfed-testbed}"
PQFED_AIRGAP_DIR="${PQFED_AIRGAP_DIR:-$PQFED_CLUSTER_DIR/node/agent/images}"
PQFED_CNI_BIN_DIR="${PQFED_CNI_BIN_DIR:-/usr/lib/cni}"
PQFED_BUSYBOX="${PQFED_BUSYBOX:-/bin/busybox}"

# --- PKI helpers shared by up.sh and node.sh (need PKI, and APISERVER_URL for kubeconfigs)
ossl() {  # run openssl quietly, show its output only if it fails
    local out
    out="$(openssl "$@" 2>&1)" || { printf '%s\n' "$out" >&2; die "openssl $1 failed"; }
}

# EC P-256 keys: fast to generate and accepted by every component.
new_key() { [[ -f "$1" ]] || ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

# Issue a certificate signed by the cluster CA (or by $ISSUER, e.g. front-proxy-ca).
#   issue <name> <subject> <extendedKeyUsage> [subjectAltName]
issue() {
    local name="$1" subj="$2" eku="$3" san="${4:-}" ca="${ISSUER:-ca}"
    [[ -f "$PKI/$name.crt" ]] && return 0
    new_key "$PKI/$name.key"
    local ext="$PKI/$name.ext"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$eku"
        [[ -n "$san" ]] && echo "subjectAltName=$san"
    } >"$ext"
    ossl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr"
    ossl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" \
        -CAcreateserial -days 3650 -sha256 -extfile "$ext" -out "$PKI/$name.crt"
    rm -f "$PKI/$name.csr" "$ext"
}

b64() { base64 -w0 <"$1"; }

write_kubeconfig() {  # <file> <user> <cert name>
    local tmp="$1.tmp"
    cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: pqfed
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(b64 "$PKI/$3.crt")
    client-key-data: $(b64 "$PKI/$3.key")
contexts:
- name: $2@pqfed
  context:
    cluster: pqfed
    user: $2
current-context: $2@pqfed
EOF
    chmod 600 "$tmp"
    mv -f "$tmp" "$1"
}
