#!/usr/bin/env bash
# `make stop`: stop what scripts/serve.sh started, by the PIDs it wrote to $RLHF_RUN_DIR
# (default .serve): the worker (and the flow runs it spawned), the Prefect server and the
# MLflow server, each with its child processes. Nothing else is touched.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${RLHF_RUN_DIR:-$ROOT/.serve}"
GRACE_S="${RLHF_STOP_GRACE:-20}"

descendants() {  # descendants PID: PID's child processes, recursively (flow runs may sit in sessions of their own)
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

alive() {  # alive PID...: whether any of them still runs
    local pid
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
    return 1
}

# 1. TERM every tree at once (each one's session's process group plus descendants in other groups), so the
#    three grace periods overlap instead of adding up.
declare -A trees=()
for name in worker prefect-server mlflow-server; do
    pidfile="$RUN_DIR/$name.pid"
    [[ -f "$pidfile" ]] || continue
    pid="$(<"$pidfile")"
    # serve.sh started each one as a session leader; anything else under this PID is not ours.
    if kill -0 "$pid" 2>/dev/null && [[ "$(ps -o sid= -p "$pid" | tr -d ' ')" == "$pid" ]]; then
        mapfile -t tree < <(echo "$pid"; descendants "$pid")
        trees[$name]="${tree[*]}"
        kill -TERM -- "-$pid" 2>/dev/null || true
        kill -TERM "${tree[@]}" 2>/dev/null || true
    fi
done
# 2. Give them time to shut down cleanly, then force what is left.
all=()
for name in "${!trees[@]}"; do read -ra tree <<<"${trees[$name]}"; all+=("${tree[@]}"); done
if ((${#all[@]})); then
    for _ in $(seq 1 $((GRACE_S * 5))); do
        alive "${all[@]}" || break
        sleep 0.2
    done
fi
for name in worker prefect-server mlflow-server; do
    pidfile="$RUN_DIR/$name.pid"
    if [[ -n "${trees[$name]:-}" ]]; then
        read -ra tree <<<"${trees[$name]}"
        if alive "${tree[@]}"; then
            kill -KILL -- "-${tree[0]}" 2>/dev/null || true
            kill -KILL "${tree[@]}" 2>/dev/null || true
            echo "stop: killed $name (PID ${tree[0]}) after ${GRACE_S} s"
        else
            echo "stop: stopped $name (PID ${tree[0]})"
        fi
    fi
    rm -f "$pidfile"
done
((${#trees[@]})) || echo "stop: nothing was running (no live PIDs in $RUN_DIR)"
