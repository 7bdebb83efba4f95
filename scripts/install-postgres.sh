#!/usr/bin/env bash
# PostgreSQL prerequisites for an MLflow tracking server on PostgreSQL (tests/integration/test_mlflow_postgres.py,
# docs/deployments.md): Debian's server package (apt) and the psycopg 3 driver (pip, the `postgres`
# extra of pyproject.toml). Idempotent: installs only what is missing. Needs root for apt-get
# (CI has it). The Python bin folder comes from RLHF_BIN (default .venv/bin).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RLHF_BIN="${RLHF_BIN:-$ROOT/.venv/bin}"

# 1. The server binaries from Debian (initdb, pg_ctl, postgres under /usr/lib/postgresql/<version>/bin).
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "install-postgres: PostgreSQL is missing and apt-get needs root: run 'sudo $0'" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    # Debian's package may start a default cluster; scripts/pg.sh runs its own, so stop that one.
    command -v pg_ctlcluster >/dev/null && pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
        pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
    done
fi
"$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/postgres" --version

# 2. The driver MLflow's SQLAlchemy store uses for postgresql:// URIs (SQLAlchemy 2.1's default: psycopg 3).
if [[ ! -x "$RLHF_BIN/python" ]]; then
    echo "install-postgres: no Python at $RLHF_BIN/python: run 'make install' or set RLHF_BIN" >&2
    exit 1
fi
if ! "$RLHF_BIN/python" -c "import psycopg" 2>/dev/null; then
    "$RLHF_BIN/python" -m pip install --quiet "psycopg[binary]>=3.2,<4"
fi
"$RLHF_BIN/python" -c "import psycopg; print('psycopg', psycopg.__version__)"
