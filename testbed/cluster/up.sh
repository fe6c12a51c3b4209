#!/usr/bin/env bash
# Start a real Kubernetes control plane: etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler, built by build.sh into
# ${PQFED_CACHE:-$HOME/.cache/pqfed}/bin. Pods run where `pqfed node-agent`
# processes run (testbed/nodeagent, emulated Pis) and, with PQFED_REAL_NODE=1
# (or auto, which `make cluster-up` sets), on one real node started after the
# control plane (node.sh: containerd, kubelet, kube-proxy, CoreDNS).
# etcd, controller-manager and scheduler bind 127.0.0.1. As root the pod
# bridge PQFED_BRIDGE (pqfed0, 10.88.0.1/16) is created and the apiserver binds
# 10.88.0.1, so pods in their network namespaces reach it (PQFED_POD_NETWORK).
#
# Usage: up.sh            (idempotent: running components are left alone)
#        eval "$(up.sh)"  (stdout is only the `export KUBECONFIG=...` line)
#
# State lives in ${PQFED_CLUSTER_DIR:-$PQFED_CACHE/cluster}:
#   pki/         CA, serving certs, client certs, service-account key (openssl)
#   etcd/        etcd data
#   logs/*.log   one log per component
#   run/*.pid    pidfiles (down.sh stops by these)
#   kubeconfig   admin (client cert, group system:masters)
#   nodes/NAME.kubeconfig   node identities system:node:NAME (group
#                system:nodes) for node agents, for NAME in PQFED_NODE_NAMES
#   kube-proxy.kubeconfig   system:kube-proxy (reads Services/EndpointSlices)
#   agents/NAME/ default state dir of `pqfed node-agent --name NAME`
#   env          the ports, addresses and paths in use, as shell assignments
# Ports (env): PQFED_APISERVER_PORT=16443 PQFED_ETCD_CLIENT_PORT=12379
#   PQFED_ETCD_PEER_PORT=12380 PQFED_KCM_PORT=16257 PQFED_SCHEDULER_PORT=16259
set -euo pipefail
PQFED_SCRIPT=up.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

case "${1:-}" in
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) die "unknown argument: $1" ;;
esac

case "$PQFED_REAL_NODE" in
    0|1|on|off|auto) ;;
    *) die "PQFED_REAL_NODE=$PQFED_REAL_NODE: expected 0 (no real node), 1 (start one) or auto (when root and built)" ;;
esac
for c in "${COMPONENTS[@]}"; do
    [[ -x "$PQFED_BIN/$c" ]] || die "$PQFED_BIN/$c is missing: run testbed/cluster/build.sh first"
done
for t in openssl curl setsid; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' is required but not on PATH"
done

mkdir -p "$PKI" "$RUN" "$LOGS" "$PQFED_CLUSTER_DIR/etcd" "$PQFED_CLUSTER_DIR/nodes"
chmod 700 "$PQFED_CLUSTER_DIR" "$PKI"

# --------------------------------------------------------------------------
# pod network: the bridge pods attach to; decides the apiserver address
# --------------------------------------------------------------------------
[[ "$PQFED_POD_SUBNET" =~ ^10\.([0-9]+)\.0\.0/16$ ]] \
    || die "PQFED_POD_SUBNET=$PQFED_POD_SUBNET: must be 10.X.0.0/16 (pods get 10.X.<node>.<n>)"

# Idempotent; node agents create the same bridge lazily when up.sh did not.
ensure_bridge() {
    if ! ip link show dev "$PQFED_BRIDGE" >/dev/null 2>&1; then
        if ip link add name "$PQFED_BRIDGE" type bridge 2>/dev/null; then
            touch "$RUN/bridge.created"   # down.sh --wipe may delete it again
            log "created bridge $PQFED_BRIDGE"
        fi
        ip link show dev "$PQFED_BRIDGE" >/dev/null 2>&1 || return 1
    fi
    if ! ip -4 -o addr show dev "$PQFED_BRIDGE" | grep -q " $PQFED_BRIDGE_IP/16 "; then
        ip addr add "$PQFED_BRIDGE_IP/16" dev "$PQFED_BRIDGE" 2>/dev/null \
            || ip -4 -o addr show dev "$PQFED_BRIDGE" | grep -q " $PQFED_BRIDGE_IP/16 " \
            || return 1
    fi
    ip link set dev "$PQFED_BRIDGE" up
}

case "$PQFED_POD_NETWORK" in
    on|auto)
        if [[ $EUID -eq 0 ]] && command -v ip >/dev/null 2>&1 && ensure_bridge; then
            PQFED_HOST=$PQFED_BRIDGE_IP
            PQFED_POD_NETWORK=on
        elif [[ "$PQFED_POD_NETWORK" == on ]]; then
            die "cannot set up bridge $PQFED_BRIDGE ($PQFED_BRIDGE_IP/16): needs root and iproute2"
        else
            log "no pod network (needs root and iproute2): apiserver on $PQFED_LOOPBACK only"
            PQFED_POD_NETWORK=off
        fi
        ;;
    off) ;;
    *) die "PQFED_POD_NETWORK=$PQFED_POD_NETWORK: expected auto, on or off" ;;
esac
# A running apiserver keeps the address it was started with (down.sh first to move it).
if component_pid kube-apiserver >/dev/null && [[ -f "$PQFED_CLUSTER_DIR/env" ]]; then
    running_host="$(sed -n 's/^PQFED_APISERVER_HOST=//p' "$PQFED_CLUSTER_DIR/env")"
    running_host="${running_host:-$PQFED_LOOPBACK}"
    if [[ "$running_host" != "$PQFED_HOST" ]]; then
        log "kube-apiserver already runs on $running_host (not $PQFED_HOST); keeping it. Run down.sh, then up.sh, to move it"
        PQFED_HOST=$running_host
    fi
fi
APISERVER_URL="https://$PQFED_HOST:$PQFED_APISERVER_PORT"

# --------------------------------------------------------------------------
# PKI (generated once; delete pki/ or use down.sh --wipe to regenerate)
# --------------------------------------------------------------------------

new_ca() {  # <name> <CN>
    [[ -f "$PKI/$1.crt" ]] && return 0
    new_key "$PKI/$1.key"
    ossl req -x509 -new -key "$PKI/$1.key" -subj "/CN=$2" -days 3650 -sha256 \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
        -out "$PKI/$1.crt"
}
[[ -f "$PKI/ca.crt" ]] || log "generating cluster CA and certificates in $PKI"
new_ca ca pqfed-testbed-ca
# Aggregation layer (front proxy): lets the apiserver proxy to extension API
# servers, and gives the delegated authn of the controller-manager and
# scheduler the requestheader CA they look for.
new_ca front-proxy-ca pqfed-testbed-front-proxy-ca
ISSUER=front-proxy-ca issue front-proxy-client "/CN=front-proxy-client" clientAuth
# Service-account token signing key pair (RSA, the most widely supported).
if [[ ! -f "$PKI/sa.key" ]]; then
    ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/sa.key"
    ossl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"
fi
# Valid for loopback and the bridge address; reissued if it predates the bridge.
if [[ -f "$PKI/apiserver.crt" ]] && ! component_pid kube-apiserver >/dev/null \
    && ! openssl x509 -in "$PKI/apiserver.crt" -noout -ext subjectAltName 2>/dev/null \
        | grep -q "IP Address:$PQFED_HOST\b"; then
    log "reissuing the apiserver certificate to add $PQFED_HOST"
    rm -f "$PKI/apiserver.crt"
fi
issue apiserver "/CN=kube-apiserver" serverAuth \
    "IP:$PQFED_LOOPBACK,IP:$PQFED_BRIDGE_IP,IP:$PQFED_SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
issue admin "/O=system:masters/CN=pqfed-admin" clientAuth
# The apiserver's identity towards kubelets (logs, exec, port-forward on the real node).
issue apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
issue kube-controller-manager "/CN=system:kube-controller-manager" clientAuth
issue kube-scheduler "/CN=system:kube-scheduler" clientAuth
# Bound to ClusterRole system:node-proxier by default: node agents read
# Services/EndpointSlices with it to write the pods' /etc/hosts.
issue kube-proxy "/CN=system:kube-proxy" clientAuth
for node in $PQFED_NODE_NAMES; do
    issue "node-$node" "/O=system:nodes/CN=system:node:$node" clientAuth
done
chmod 600 "$PKI"/*.key

# Rewritten every time so a changed PQFED_APISERVER_PORT is picked up.
write_kubeconfig "$KUBECONFIG_ADMIN" pqfed-admin admin
write_kubeconfig "$PKI/kube-controller-manager.kubeconfig" system:kube-controller-manager kube-controller-manager
write_kubeconfig "$PKI/kube-scheduler.kubeconfig" system:kube-scheduler kube-scheduler
write_kubeconfig "$PQFED_CLUSTER_DIR/kube-proxy.kubeconfig" system:kube-proxy kube-proxy
for node in $PQFED_NODE_NAMES; do
    write_kubeconfig "$PQFED_CLUSTER_DIR/nodes/$node.kubeconfig" "system:node:$node" "node-$node"
done

cat >"$PQFED_CLUSTER_DIR/env" <<EOF
PQFED_CLUSTER_DIR=$PQFED_CLUSTER_DIR
PQFED_APISERVER_URL=$APISERVER_URL
PQFED_APISERVER_PORT=$PQFED_APISERVER_PORT
PQFED_ETCD_CLIENT_PORT=$PQFED_ETCD_CLIENT_PORT
PQFED_ETCD_PEER_PORT=$PQFED_ETCD_PEER_PORT
PQFED_KCM_PORT=$PQFED_KCM_PORT
PQFED_SCHEDULER_PORT=$PQFED_SCHEDULER_PORT
PQFED_APISERVER_HOST=$PQFED_HOST
PQFED_POD_NETWORK=$PQFED_POD_NETWORK
PQFED_BRIDGE=$PQFED_BRIDGE
PQFED_BRIDGE_IP=$PQFED_BRIDGE_IP
PQFED_POD_SUBNET=$PQFED_POD_SUBNET
KUBECONFIG=$KUBECONFIG_ADMIN
EOF

# --------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------
ETCD_URL="http://$PQFED_LOOPBACK:$PQFED_ETCD_CLIENT_PORT"

args_for() {  # <component> -> one argument per line
    case "$1" in
    etcd)
        printf '%s\n' \
            --name=pqfed \
            --data-dir="$PQFED_CLUSTER_DIR/etcd" \
            --listen-client-urls="$ETCD_URL" \
            --advertise-client-urls="$ETCD_URL" \
            --listen-peer-urls="http://$PQFED_LOOPBACK:$PQFED_ETCD_PEER_PORT" \
            --initial-advertise-peer-urls="http://$PQFED_LOOPBACK:$PQFED_ETCD_PEER_PORT" \
            --initial-cluster="pqfed=http://$PQFED_LOOPBACK:$PQFED_ETCD_PEER_PORT" \
            --initial-cluster-state=new \
            --quota-backend-bytes=$((2 * 1024 * 1024 * 1024))
        [[ "$PQFED_ETCD_UNSAFE_NO_FSYNC" == 1 ]] && echo --unsafe-no-fsync=true
        ;;
    kube-apiserver)
        printf '%s\n' \
            --etcd-servers="$ETCD_URL" \
            --bind-address="$PQFED_HOST" \
            --advertise-address="$PQFED_HOST" \
            --secure-port="$PQFED_APISERVER_PORT" \
            --tls-cert-file="$PKI/apiserver.crt" \
            --tls-private-key-file="$PKI/apiserver.key" \
            --client-ca-file="$PKI/ca.crt" \
            --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
            --requestheader-allowed-names=front-proxy-client \
            --requestheader-username-headers=X-Remote-User \
            --requestheader-group-headers=X-Remote-Group \
            --requestheader-extra-headers-prefix=X-Remote-Extra- \
            --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
            --proxy-client-key-file="$PKI/front-proxy-client.key" \
            --authorization-mode=Node,RBAC \
            --service-account-issuer=https://kubernetes.default.svc.cluster.local \
            --service-account-key-file="$PKI/sa.pub" \
            --service-account-signing-key-file="$PKI/sa.key" \
            --service-cluster-ip-range="$PQFED_SERVICE_CIDR" \
            --allow-privileged=true \
            --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
            --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
            --kubelet-certificate-authority="$PKI/ca.crt" \
            --kubelet-preferred-address-types=InternalIP \
            --endpoint-reconciler-type=none \
            --profiling=false \
            --cert-dir="$PQFED_CLUSTER_DIR/apiserver-certs"
        ;;
    kube-controller-manager)
        local kc="$PKI/kube-controller-manager.kubeconfig"
        printf '%s\n' \
            --kubeconfig="$kc" \
            --authentication-kubeconfig="$kc" \
            --authorization-kubeconfig="$kc" \
            --bind-address="$PQFED_LOOPBACK" \
            --secure-port="$PQFED_KCM_PORT" \
            --cert-dir="$PQFED_CLUSTER_DIR/kcm-certs" \
            --controllers='*' \
            --use-service-account-credentials=true \
            --leader-elect=false \
            --root-ca-file="$PKI/ca.crt" \
            --service-account-private-key-file="$PKI/sa.key" \
            --cluster-signing-cert-file="$PKI/ca.crt" \
            --cluster-signing-key-file="$PKI/ca.key" \
            --service-cluster-ip-range="$PQFED_SERVICE_CIDR" \
            --profiling=false
        ;;
    kube-scheduler)
        local kc="$PKI/kube-scheduler.kubeconfig"
        printf '%s\n' \
            --kubeconfig="$kc" \
            --authentication-kubeconfig="$kc" \
            --authorization-kubeconfig="$kc" \
            --bind-address="$PQFED_LOOPBACK" \
            --secure-port="$PQFED_SCHEDULER_PORT" \
            --cert-dir="$PQFED_CLUSTER_DIR/scheduler-certs" \
            --leader-elect=false \
            --profiling=false
        ;;
    esac
}

# HTTP status of a URL (000 when unreachable). Admin cert for the apiserver.
http_code() {  # <url> [curl args...]
    local url="$1"; shift
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" "$url" 2>/dev/null || true
}
api() {  # <path> -> http status, as the admin user
    http_code "$APISERVER_URL$1" --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key"
}

fail_with_log() {  # <component> <message>
    log "---- last lines of $LOGS/$1.log ----"
    tail -n 40 "$LOGS/$1.log" >&2 || true
    log "----"
    die "$2 (logs: $LOGS; stop with testbed/cluster/down.sh)"
}

port_in_use() {  # <port>
    if command -v ss >/dev/null 2>&1; then
        ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
    else
        (exec 3<>"/dev/tcp/$PQFED_LOOPBACK/$1") 2>/dev/null
    fi
}

ports_of() {
    case "$1" in
        etcd) echo "$PQFED_ETCD_CLIENT_PORT $PQFED_ETCD_PEER_PORT" ;;
        kube-apiserver) echo "$PQFED_APISERVER_PORT" ;;
        kube-controller-manager) echo "$PQFED_KCM_PORT" ;;
        kube-scheduler) echo "$PQFED_SCHEDULER_PORT" ;;
    esac
}

start() {  # <component>
    local c="$1" pid p
    if pid="$(component_pid "$c")"; then
        log "$c already running (pid $pid)"
        return 0
    fi
    for p in $(ports_of "$c"); do
        port_in_use "$p" && die "port $p (for $c) is already in use by another process; set PQFED_*_PORT (see $HERE/common.sh)"
    done
    local -a args
    mapfile -t args < <(args_for "$c")
    {
        echo "==== $(date -u +%Y-%m-%dT%H:%M:%SZ) starting $c"
        printf '  %q\n' "$PQFED_BIN/$c" "${args[@]}"
    } >>"$LOGS/$c.log"
    # setsid: own session, so the daemons outlive this script and its terminal.
    setsid "$PQFED_BIN/$c" "${args[@]}" </dev/null >>"$LOGS/$c.log" 2>&1 &
    pid=$!
    echo "$pid" >"$RUN/$c.pid"
    log "started $c (pid $pid, log $LOGS/$c.log)"
}

# wait_for <component> <description> <command...>: retry until the command
# succeeds, the component dies, or PQFED_UP_TIMEOUT passes.
wait_for() {
    local c="$1" what="$2"; shift 2
    local deadline=$((SECONDS + PQFED_UP_TIMEOUT))
    until "$@"; do
        component_pid "$c" >/dev/null || fail_with_log "$c" "$c exited while waiting for $what"
        ((SECONDS < deadline)) || fail_with_log "$c" "timed out after ${PQFED_UP_TIMEOUT}s waiting for $what"
        sleep 1
    done
    log "ok: $what"
}

etcd_healthy() { [[ "$(http_code "$ETCD_URL/health")" == 200 ]]; }
api_ready() { [[ "$(api /readyz)" == 200 ]]; }
# The component's own /healthz (anonymous access is allowed there by default;
# the serving cert is self-signed by the component, hence -k on loopback).
healthz() { [[ "$(http_code "https://$PQFED_LOOPBACK:$1/healthz" -k)" == 200 ]]; }
kcm_healthy() { healthz "$PQFED_KCM_PORT"; }
scheduler_healthy() { healthz "$PQFED_SCHEDULER_PORT"; }
default_ns() { [[ "$(api /api/v1/namespaces/default)" == 200 ]]; }
default_sa() { [[ "$(api /api/v1/namespaces/default/serviceaccounts/default)" == 200 ]]; }

T0=$SECONDS
start etcd
wait_for etcd "etcd healthy at $ETCD_URL" etcd_healthy
start kube-apiserver
wait_for kube-apiserver "kube-apiserver /readyz at $APISERVER_URL" api_ready
start kube-controller-manager
start kube-scheduler
wait_for kube-controller-manager "kube-controller-manager /healthz" kcm_healthy
wait_for kube-scheduler "kube-scheduler /healthz" scheduler_healthy
wait_for kube-apiserver "namespace default" default_ns
wait_for kube-controller-manager "service account default/default" default_sa

log "control plane up in $((SECONDS - T0))s: $APISERVER_URL (state: $PQFED_CLUSTER_DIR)"
for node in $PQFED_NODE_NAMES; do
    log "node agent kubeconfig: $PQFED_CLUSTER_DIR/nodes/$node.kubeconfig (system:node:$node)"
done
[[ "$PQFED_POD_NETWORK" == on ]] \
    || log "pod network off: node agents can run pods, but pods cannot reach the apiserver"

# The real node (node.sh): containerd + kubelet + kube-proxy + CoreDNS.
case "$PQFED_REAL_NODE" in
    1|on) "$HERE/node.sh" start >&2 ;;
    auto)
        why="$("$HERE/node.sh" prereqs)"
        [[ "$PQFED_POD_NETWORK" == on ]] || why+=$'\n'"the pod network is off (the apiserver is on loopback)"
        if [[ -z "${why//$'\n'/}" ]]; then
            "$HERE/node.sh" start >&2
        else
            log "no real node (PQFED_REAL_NODE=auto):${why//$'\n'/; }"
        fi
        ;;
    *) ;;
esac
echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
