#!/usr/bin/env bash
# A PostgreSQL server of its own for MLflow's backend store, in a folder, on 127.0.0.1 only.
#
#   scripts/pg.sh start DIR PORT   initdb in DIR/data (once), start on 127.0.0.1:PORT, create database `mlflow`
#   scripts/pg.sh stop DIR         stop it (fast shutdown)
#
# The role is `mlflow` with the password in RLHF_PG_PASSWORD (required for start): TCP
# connections need it (scram-sha-256); the Unix socket lives in DIR, not /var/run.
# Then: PGPASSWORD="$RLHF_PG_PASSWORD" mlflow server --backend-store-uri postgresql://mlflow@127.0.0.1:PORT/mlflow ...
# (the password in the environment or ~/.pgpass, never in the URI: `ps` shows every command line).
# As root, the server runs as the `postgres` user (Debian's package creates it), which owns DIR.
# Debian's binaries: scripts/install-postgres.sh (make install-postgres).
set -euo pipefail
usage="usage: $0 start DIR PORT | stop DIR"
cmd="${1:?$usage}"
dir="${2:?$usage}"
PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
[[ -x "$PGBIN/pg_ctl" ]] || { echo "pg.sh: no PostgreSQL under /usr/lib/postgresql: run 'make install-postgres'" >&2; exit 1; }

as_pg() {  # run as the postgres user when we are root (initdb and postgres refuse to run as root)
    if [[ "$(id -u)" -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
    port="${3:?$usage}"
    : "${RLHF_PG_PASSWORD:?pg.sh: set RLHF_PG_PASSWORD to the password of role mlflow}"
    mkdir -p "$dir"
    [[ "$(id -u)" -eq 0 ]] && chown postgres: "$dir"
    chmod 700 "$dir"
    if [[ ! -f "$dir/data/PG_VERSION" ]]; then
        pwfile="$dir/.pw"
        printf '%s\n' "$RLHF_PG_PASSWORD" >"$pwfile"
        [[ "$(id -u)" -eq 0 ]] && chown postgres: "$pwfile"
        as_pg "$PGBIN/initdb" -D "$dir/data" -U mlflow --pwfile="$pwfile" -E UTF8 \
            --auth-local=trust --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1 \
            || { rm -f "$pwfile"; echo "pg.sh: initdb failed, see $dir/initdb.log" >&2; exit 1; }
        rm -f "$pwfile"
    fi
    as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir" start >/dev/null \
        || { echo "pg.sh: PostgreSQL did not start on 127.0.0.1:$port, see $dir/postgres.log" >&2; exit 1; }
    if ! as_pg "$PGBIN/psql" -h "$dir" -p "$port" -U mlflow -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1; then
        as_pg "$PGBIN/createdb" -h "$dir" -p "$port" -U mlflow mlflow
    fi
    echo "pg.sh: PostgreSQL on 127.0.0.1:$port, database mlflow, data in $dir/data"
    ;;
stop)
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
        echo "pg.sh: stopped PostgreSQL in $dir/data"
    fi
    ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac
