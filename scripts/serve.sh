#!/usr/bin/env bash
# `make serve`: a Prefect server and an MLflow tracking server on 127.0.0.1, the process work
# pool and its queue limits, every deployment of prefect.yaml, and a worker. `make stop`
# (scripts/stop.sh) stops exactly what this started: the PIDs are in $RLHF_RUN_DIR.
#
# Environment (all optional):
#   RLHF_BIN             Python bin folder holding prefect and mlflow    (.venv/bin)
#   RLHF_PREFECT_PORT    Prefect server and UI port                      (4200)
#   RLHF_MLFLOW_PORT     MLflow tracking server and UI port              (5000)
#   RLHF_RUN_DIR         PID files and logs                              (.serve)
#   RLHF_MLFLOW_DIR      MLflow SQLite database and artifact store       (.mlflow-server)
#   PREFECT_HOME         Prefect's home, with the server's SQLite DB     (.prefect)
#   RLHF_WORKER_QUEUES   space-separated queues the worker polls         (all of the pool's)
#   RLHF_MLFLOW_WORKERS  MLflow server worker processes                  (2)
#   RLHF_SERVE_TIMEOUT   seconds to wait for each server and the worker  (180)
set -Eeuo pipefail  # -E: the ERR trap below also fires inside functions
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RLHF_BIN="${RLHF_BIN:-$ROOT/.venv/bin}"
PREFECT_PORT="${RLHF_PREFECT_PORT:-4200}"
MLFLOW_PORT="${RLHF_MLFLOW_PORT:-5000}"
RUN_DIR="${RLHF_RUN_DIR:-$ROOT/.serve}"
MLFLOW_DIR="${RLHF_MLFLOW_DIR:-$ROOT/.mlflow-server}"
TIMEOUT="${RLHF_SERVE_TIMEOUT:-180}"
WORK_POOL=rlhf-process                      # the pool prefect.yaml names
QUEUE_LIMITS=("training:1" "registry:1")    # queue:limit, one run at a time per queue
PY="$RLHF_BIN/python"

export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PREFECT_CLI_PROMPT=false
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true GX_ANALYTICS_ENABLED=false
export TOKENIZERS_PARALLELISM=false MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

die() { echo "serve: $*" >&2; exit 1; }

[[ -x "$RLHF_BIN/prefect" && -x "$RLHF_BIN/mlflow" ]] \
    || die "no prefect/mlflow in $RLHF_BIN: run 'make install' or set RLHF_BIN to a bin folder that has them"

# 1. Refuse to start twice, or on a port something else holds (we would talk to the wrong server).
mkdir -p "$RUN_DIR" "$MLFLOW_DIR/artifacts" "$PREFECT_HOME"
for pidfile in "$RUN_DIR"/*.pid; do
    [[ -e "$pidfile" ]] || continue
    if kill -0 "$(<"$pidfile")" 2>/dev/null; then
        die "$(basename "$pidfile" .pid) is already running (PIDs in $RUN_DIR): run 'make stop' first"
    fi
    rm -f "$pidfile"
done
for port in "$PREFECT_PORT" "$MLFLOW_PORT"; do
    # SO_REUSEADDR as the servers set it: a port left in TIME_WAIT by the last `make stop` is free.
    "$PY" -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1])))" "$port" 2>/dev/null \
        || die "port $port on 127.0.0.1 is in use: stop what holds it, or set RLHF_PREFECT_PORT / RLHF_MLFLOW_PORT"
done

# From here on, a failure stops whatever was already started.
trap 'echo "serve: failed; stopping what was started (logs in $RUN_DIR)" >&2; RLHF_RUN_DIR="$RUN_DIR" "$ROOT/scripts/stop.sh" >&2' ERR

start() {  # start NAME CMD...: run CMD in its own session, log and PID file under RUN_DIR
    local name=$1; shift
    setsid "$@" >"$RUN_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN_DIR/$name.pid"
    echo "serve: started $name (PID $!, log $RUN_DIR/$name.log)"
}

wait_for() {  # wait_for NAME URL [JSON_KEY=VALUE]: until URL answers 200 (with that field), or the process dies
    "$PY" - "$1" "$2" "${3:-}" "$TIMEOUT" "$RUN_DIR/$1.pid" <<'EOF'
import json, os, sys, time, urllib.request
name, url, expect, timeout, pidfile = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
pid = int(open(pidfile).read())
deadline, last = time.monotonic() + timeout, ""
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"serve: {name} exited during start-up; see its log")
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read()
        if not expect:
            sys.exit(0)
        key, value = expect.split("=", 1)
        last = str(json.loads(body).get(key))
        if last == value:
            sys.exit(0)
    except OSError as e:
        last = str(e)
    time.sleep(1)
sys.exit(f"serve: {name} not ready at {url} after {timeout:.0f} s (last: {last}); raise RLHF_SERVE_TIMEOUT or see its log")
EOF
}

# 2. The two servers, both bound to 127.0.0.1.
start prefect-server "$RLHF_BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
start mlflow-server "$RLHF_BIN/mlflow" server \
    --backend-store-uri "sqlite:///$MLFLOW_DIR/mlflow.db" \
    --artifacts-destination "$MLFLOW_DIR/artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers "${RLHF_MLFLOW_WORKERS:-2}"
wait_for prefect-server "$PREFECT_API_URL/health"
wait_for mlflow-server "$MLFLOW_TRACKING_URI/health"

# 3. The process work pool and its queues; the limits keep two trainings from overlapping.
"$RLHF_BIN/prefect" work-pool inspect "$WORK_POOL" >/dev/null 2>&1 \
    || "$RLHF_BIN/prefect" work-pool create "$WORK_POOL" --type process >/dev/null
for item in "${QUEUE_LIMITS[@]}"; do
    queue=${item%%:*} limit=${item##*:}
    if "$RLHF_BIN/prefect" work-queue inspect "$queue" --pool "$WORK_POOL" >/dev/null 2>&1; then
        "$RLHF_BIN/prefect" work-queue set-concurrency-limit "$queue" "$limit" --pool "$WORK_POOL" >/dev/null
    else
        "$RLHF_BIN/prefect" work-queue create "$queue" --pool "$WORK_POOL" --limit "$limit" >/dev/null
    fi
done
echo "serve: work pool $WORK_POOL, queues ${QUEUE_LIMITS[*]} (queue:limit)"

# 4. Deploy. `--all` stops at the first entry whose flow file is missing, so entries whose
#    file does not exist yet are named and skipped.
mapfile -t MISSING < <("$PY" - <<'EOF'
import pathlib, yaml
for d in yaml.safe_load(open("prefect.yaml"))["deployments"]:
    if not pathlib.Path(d["entrypoint"].split(":")[0]).is_file():
        print(d["name"])
EOF
)
if ((${#MISSING[@]} == 0)); then
    "$RLHF_BIN/prefect" --no-prompt deploy --all
else
    echo "serve: skipping deployments whose flow file does not exist yet: ${MISSING[*]}" >&2
    mapfile -t PRESENT < <("$PY" - "${MISSING[@]}" <<'EOF'
import sys, yaml
for d in yaml.safe_load(open("prefect.yaml"))["deployments"]:
    if d["name"] not in sys.argv[1:]:
        print(d["name"])
EOF
)
    args=()
    for name in "${PRESENT[@]}"; do args+=(--name "$name"); done
    "$RLHF_BIN/prefect" --no-prompt deploy "${args[@]}"
fi

# 5. The worker; flow runs inherit MLFLOW_TRACKING_URI, so they log to the tracking server.
queue_args=()
for queue in ${RLHF_WORKER_QUEUES:-}; do queue_args+=(--work-queue "$queue"); done
start worker "$RLHF_BIN/prefect" worker start --pool "$WORK_POOL" --type process \
    --name "rlhf-worker-$PREFECT_PORT" "${queue_args[@]}"
wait_for worker "$PREFECT_API_URL/work_pools/$WORK_POOL" "status=READY"

trap - ERR
cat <<EOF

Prefect UI   http://127.0.0.1:$PREFECT_PORT   (deployments, flow runs, artifacts)
MLflow UI    http://127.0.0.1:$MLFLOW_PORT   (experiments, runs, models)
Run one:     PREFECT_API_URL=$PREFECT_API_URL $RLHF_BIN/prefect deployment run 'rlhf-pipeline/smoke'
Stop:        make stop      (PIDs and logs in $RUN_DIR)
EOF
