#!/usr/bin/env bash
# Stop the control plane started by up.sh, by its pidfiles: first the node
# agents whose state is in $PQFED_CLUSTER_DIR/agents (they stop their pods and
# report NotReady) and the real node (node.sh stop), then scheduler,
# controller-manager, apiserver and etcd.
#
# Usage: down.sh [--wipe]
#   --wipe   also delete ${PQFED_CLUSTER_DIR:-$PQFED_CACHE/cluster} (etcd data,
#            PKI, kubeconfigs, logs, agent state) and the pod bridge if up.sh
#            created it and nothing uses it; the binaries in $PQFED_CACHE/bin stay.
# Stopping is SIGTERM, then SIGKILL after PQFED_STOP_TIMEOUT seconds (15; 45
# for node agents, which first give their pods terminationGracePeriodSeconds).
set -euo pipefail
PQFED_SCRIPT=down.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"
PQFED_STOP_TIMEOUT="${PQFED_STOP_TIMEOUT:-15}"

WIPE=0
for a in "$@"; do
    case "$a" in
        --wipe) WIPE=1 ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $a" ;;
    esac
done

stop() {  # <component>
    local c="$1" pid
    if ! pid="$(component_pid "$c")"; then
        [[ -f "$RUN/$c.pid" ]] && log "$c not running (stale pidfile removed)"
        rm -f "$RUN/$c.pid"
        return 0
    fi
    log "stopping $c (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + PQFED_STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "$c did not stop within ${PQFED_STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -f "$RUN/$c.pid"
}

# pid of a running node agent from <state dir>/agent.pid, or nothing.
agent_pid() {  # <state dir>
    local pid
    pid="$(cat "$1/agent.pid" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "node-agent" || return 1
    echo "$pid"
}

# Leftovers of an agent that had to be killed: its pods' process groups
# (<pod dir>/*.pgid) and network namespaces (<pod dir>/netns).
sweep_agent() {  # <state dir>
    local f pid ns
    for f in "$1"/pods/*/*.pgid; do
        [[ -f "$f" ]] || continue
        pid="$(cat "$f" 2>/dev/null || true)"
        if [[ "$pid" =~ ^[0-9]+$ ]]; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    done
    for f in "$1"/pods/*/netns; do
        [[ -f "$f" ]] || continue
        ns="$(cat "$f" 2>/dev/null || true)"
        if [[ -n "$ns" ]]; then ip netns delete "$ns" 2>/dev/null || true; fi
    done
}

stop_agents() {
    local dir pid deadline timeout="${PQFED_AGENT_STOP_TIMEOUT:-45}"
    for dir in "$AGENTS"/*/; do
        dir="${dir%/}"
        pid="$(agent_pid "$dir")" || continue
        log "stopping node agent $(basename "$dir") (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for dir in "$AGENTS"/*/; do
        dir="${dir%/}"
        pid="$(agent_pid "$dir")" || continue
        deadline=$((SECONDS + timeout))
        # Not `kill -0`: an exited agent may linger as a zombie of whoever started it.
        while [[ "$(agent_pid "$dir" || true)" == "$pid" ]]; do
            if ((SECONDS >= deadline)); then
                log "node agent $(basename "$dir") did not stop within ${timeout}s; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                sleep 0.5
                sweep_agent "$dir"
                break
            fi
            sleep 0.2
        done
    done
}

if [[ -d "$PQFED_CLUSTER_DIR" ]]; then
    [[ -d "$AGENTS" ]] && stop_agents
    # The real node (node.sh): its containers, kubelet, containerd, kube-proxy, CoreDNS.
    if [[ -d "$PQFED_CLUSTER_DIR/node" ]]; then
        if [[ $WIPE -eq 1 ]]; then "$HERE/node.sh" stop --wipe; else "$HERE/node.sh" stop; fi
    fi
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        stop "${COMPONENTS[i]}"
    done
    log "control plane stopped"
else
    log "nothing to stop: $PQFED_CLUSTER_DIR does not exist"
fi

if [[ $WIPE -eq 1 && -d "$PQFED_CLUSTER_DIR" ]]; then
    # Guard against a bad override wiping something that is not ours.
    [[ -d "$PQFED_CLUSTER_DIR/pki" || -d "$PQFED_CLUSTER_DIR/run" ]] \
        || die "refusing to wipe $PQFED_CLUSTER_DIR: it does not look like a cluster dir"
    case "$(cd "$PQFED_CLUSTER_DIR" && pwd -P)" in
        /|"$HOME"|/root|/home|/tmp) die "refusing to wipe $PQFED_CLUSTER_DIR" ;;
    esac
    for c in "${COMPONENTS[@]}"; do
        if pid="$(component_pid "$c")"; then die "$c (pid $pid) still runs; not wiping"; fi
    done
    for dir in "$AGENTS"/*/; do
        if pid="$(agent_pid "${dir%/}")"; then die "node agent (pid $pid) still runs; not wiping"; fi
    done
    # The bridge goes only if this cluster created it and no veth or listener uses it.
    bridge="$(sed -n 's/^PQFED_BRIDGE=//p' "$PQFED_CLUSTER_DIR/env" 2>/dev/null || true)"
    bridge_ip="$(sed -n 's/^PQFED_BRIDGE_IP=//p' "$PQFED_CLUSTER_DIR/env" 2>/dev/null || true)"
    if [[ -f "$RUN/bridge.created" && -n "$bridge" ]] && ip link show dev "$bridge" >/dev/null 2>&1 \
        && [[ -z "$(ip -o link show master "$bridge" 2>/dev/null)" ]] \
        && ! ss -Hltn "src $bridge_ip" 2>/dev/null | grep -q .; then
        ip link delete dev "$bridge" 2>/dev/null && log "deleted bridge $bridge"
    fi
    rm -rf "$PQFED_CLUSTER_DIR"
    log "wiped $PQFED_CLUSTER_DIR"
fi
