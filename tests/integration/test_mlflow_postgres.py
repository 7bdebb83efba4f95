"""The smoke pipeline against an MLflow tracking server whose backend store is a real PostgreSQL.

The fixture starts PostgreSQL with scripts/pg.sh (Debian's server, installed by
scripts/install-postgres.sh: ``make install-postgres``) in a temporary folder on a free
port of 127.0.0.1, then ``mlflow server --backend-store-uri postgresql://...
--serve-artifacts --artifacts-destination DIR``, and stops both afterwards. Without
PostgreSQL or psycopg the test skips locally and fails where CI=1/true or
RLHF_REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from rlhf.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
STAGES = {"validate", "sft", "reward", "ppo", "evaluate", "register"}


def _required() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"} or os.environ.get("RLHF_REQUIRE_POSTGRES") == "1"


def _missing() -> str | None:
    if not glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"):
        return "PostgreSQL is not installed (run `make install-postgres`)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (run `make install-postgres` or pip install -e '.[postgres]')"
    return None


def _free_port() -> int:
    from tasks.launch import free_port

    return free_port()


@pytest.fixture(scope="module")
def postgres_mlflow():
    """(tracking URI, PostgreSQL URI, artifacts folder, password, server pid) of a server started for this module.

    The password reaches the MLflow server as PGPASSWORD in its environment, not in the URI on its command line."""
    reason = _missing()
    if reason:
        if _required():
            pytest.fail(f"the PostgreSQL test is required here (CI or RLHF_REQUIRE_POSTGRES=1) but {reason}")
        pytest.skip(reason)
    # Under /tmp, not pytest's tmp_path: the server runs as the postgres user, who cannot enter root's 0700 folders.
    pg_dir = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))
    artifacts = Path(tempfile.mkdtemp(prefix="rlhf-pg-artifacts-"))
    password = secrets.token_hex(16)
    pg_port, mlflow_port = _free_port(), _free_port()
    env = {**os.environ, "RLHF_PG_PASSWORD": password}
    # No password in the URI: it would be on the server's command line (ps). libpq reads PGPASSWORD.
    pg_uri = f"postgresql://mlflow@127.0.0.1:{pg_port}/mlflow"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "pg.sh"), "start", str(pg_dir), str(pg_port)], env=env, check=True, timeout=120
    )
    log = open(artifacts.parent / f"{artifacts.name}-mlflow.log", "w")
    server = None
    try:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                pg_uri,
                "--serve-artifacts",
                "--artifacts-destination",
                str(artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PGPASSWORD": password},
        )
        url = f"http://127.0.0.1:{mlflow_port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"mlflow server exited: {Path(log.name).read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"mlflow server not healthy: {Path(log.name).read_text()[-3000:]}"
            time.sleep(1)
        yield url, pg_uri, artifacts, password, server.pid
    finally:
        if server is not None:
            server.terminate()  # its own session: the gunicorn/uvicorn workers go with it
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
        log.close()
        Path(log.name).unlink(missing_ok=True)
        subprocess.run(["bash", str(ROOT / "scripts" / "pg.sh"), "stop", str(pg_dir)], timeout=120, check=False)
        shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(artifacts, ignore_errors=True)


def test_smoke_pipeline_on_postgres_backed_tracking_server(postgres_mlflow, prefect_harness, tmp_path, monkeypatch):
    import psutil
    import psycopg

    from flows.pipeline import rlhf_pipeline

    url, pg_uri, artifacts, password, server_pid = postgres_mlflow
    server = psutil.Process(server_pid)
    for proc in [server, *server.children(recursive=True)]:  # the server and its workers: ps shows no password
        assert password not in " ".join(proc.cmdline()), proc.cmdline()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    try:
        result = rlhf_pipeline(load_config(SMOKE))
    finally:
        mlflow.set_tracking_uri(None)

    client = MlflowClient(url)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert {run.info.run_name for run in children} == STAGES
    ppo = next(run for run in children if run.info.run_name == "ppo")
    assert [
        m.step for m in sorted(client.get_metric_history(ppo.info.run_id, "objective/kl"), key=lambda m: m.step)
    ] == [1, 2, 3, 4]
    versions = client.search_model_versions("name = 'rlhf-policy'")
    assert result.model_uri in {f"models:/rlhf-policy/{v.version}" for v in versions}

    # The rows are in PostgreSQL, and the artifacts went through the server into --artifacts-destination.
    with psycopg.connect(pg_uri, password=password) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (result.parent_run_id,))
        assert cur.fetchone() == ("FINISHED",)
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'objective/kl'", (ppo.info.run_id,))
        assert cur.fetchone()[0] == 4
        cur.execute("SELECT count(*) FROM model_versions WHERE name = 'rlhf-policy'")
        assert cur.fetchone()[0] >= 1
    assert ppo.info.artifact_uri.startswith("mlflow-artifacts:")
    assert list(artifacts.rglob("model.safetensors")), "no checkpoint reached the server's artifact folder"
