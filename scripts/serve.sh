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
#   PREFECT_FLOWS_HEARTBEAT_FREQUENCY  seconds between flow-run heartbeats; a flow run silent for
#                        3 of them ends Crashed (the zombie automation, flows/automations.py)   (30)
#
# Authentication (docs/deployments.md, "A shared server"): secrets come only from the environment, never
# the command line, so `ps` shows none of them.
#   MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD  both set: the MLflow server runs MLflow's basic-auth
#                        app (`--app-name basic-auth`) with this user as its admin; flow runs and `rlhf`
#                        send them (MLflow's client reads these variables)
#   PREFECT_API_AUTH_STRING  "user:password": the Prefect server requires it (PREFECT_SERVER_API_AUTH_STRING);
#                        the worker, the CLI and flow runs send it
#   MLFLOW_FLASK_SERVER_SECRET_KEY  the basic-auth app's CSRF key (generated for this start if unset)
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

export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"

die() { echo "serve: $*" >&2; exit 1; }

MLFLOW_AUTH=0
if [[ -n "${MLFLOW_TRACKING_USERNAME:-}${MLFLOW_TRACKING_PASSWORD:-}" ]]; then
    [[ -n "${MLFLOW_TRACKING_USERNAME:-}" && -n "${MLFLOW_TRACKING_PASSWORD:-}" ]] \
        || die "set both MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for MLflow's basic-auth app, or neither"
    "$PY" -c "import flask_wtf" 2>/dev/null \
        || die "MLflow's basic-auth app needs Flask-WTF: run 'make install' (or pip install 'mlflow[auth]')"
    MLFLOW_AUTH=1
fi
if [[ -n "${PREFECT_API_AUTH_STRING:-}" && "$PREFECT_API_AUTH_STRING" != ?*:?* ]]; then
    die "PREFECT_API_AUTH_STRING must be user:password"
fi

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
import base64, json, os, sys, time, urllib.request
name, url, expect, timeout, pidfile = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
pid = int(open(pidfile).read())
deadline, last = time.monotonic() + timeout, ""
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"serve: {name} exited during start-up; see its log")
    try:
        request = urllib.request.Request(url)
        if os.environ.get("PREFECT_API_AUTH_STRING"):  # from the environment, never this command line
            token = base64.b64encode(os.environ["PREFECT_API_AUTH_STRING"].encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as r:
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

# 2. The two servers, both bound to 127.0.0.1. Each gets its secrets in its own environment (a subshell),
#    none on its command line.
(
    if [[ -n "${PREFECT_API_AUTH_STRING:-}" ]]; then export PREFECT_SERVER_API_AUTH_STRING="$PREFECT_API_AUTH_STRING"; fi
    start prefect-server "$RLHF_BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
)
mlflow_args=()
if ((MLFLOW_AUTH)); then
    # MLflow's auth config: its user database beside the tracking store; the admin is created on the first
    # start from MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD (later password changes: MLflow's update-password API).
    (umask 077 && printf '%s\n' "[mlflow]" "default_permission = READ" \
        "database_uri = sqlite:///$MLFLOW_DIR/basic_auth.db" \
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" >"$RUN_DIR/mlflow-auth.ini")
    mlflow_args=(--app-name basic-auth)
fi
(
    if ((MLFLOW_AUTH)); then
        export MLFLOW_AUTH_CONFIG_PATH="$RUN_DIR/mlflow-auth.ini"
        export MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_TRACKING_USERNAME" MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"
        MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$("$PY" -c 'import secrets; print(secrets.token_hex(32))')}"
        export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    start mlflow-server "$RLHF_BIN/mlflow" server "${mlflow_args[@]}" \
        --backend-store-uri "sqlite:///$MLFLOW_DIR/mlflow.db" \
        --artifacts-destination "$MLFLOW_DIR/artifacts" \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers "${RLHF_MLFLOW_WORKERS:-2}"
)
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

# 3b. Flow runs whose heartbeats stop (kill -9, a lost machine) end Crashed: Prefect's zombie automation.
"$PY" -m flows.automations

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
if ((!MLFLOW_AUTH)) || [[ -z "${PREFECT_API_AUTH_STRING:-}" ]]; then
    echo "Note: a server without MLFLOW_TRACKING_USERNAME/PASSWORD or PREFECT_API_AUTH_STRING has no authentication:" \
        "fine on 127.0.0.1 for one user; set them for a shared machine (docs/deployments.md, \"A shared server\")"
fi
