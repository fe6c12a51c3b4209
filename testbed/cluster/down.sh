#!/usr/bin/env bash
# Stop the control plane started by up.sh, by its pidfiles (scheduler,
# controller-manager, apiserver, then etcd), and optionally delete its state.
#
# Usage: down.sh [--wipe]
#   --wipe   also delete ${PQFED_CLUSTER_DIR:-$PQFED_CACHE/cluster} (etcd data,
#            PKI, kubeconfigs, logs); the binaries in $PQFED_CACHE/bin stay.
# Stopping is SIGTERM, then SIGKILL after PQFED_STOP_TIMEOUT seconds (15).
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
        -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

if [[ -d "$PQFED_CLUSTER_DIR" ]]; then
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
    rm -rf "$PQFED_CLUSTER_DIR"
    log "wiped $PQFED_CLUSTER_DIR"
fi
