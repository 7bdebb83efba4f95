"""`make serve` for a shared machine: MLflow's basic-auth app and Prefect's auth string, secrets only in the
environment.

The module starts its own scripts/serve.sh (both servers, every deployment, a worker) with
MLFLOW_TRACKING_USERNAME/PASSWORD and PREFECT_API_AUTH_STRING set, then checks that both servers refuse
requests without the credentials and take them with, that the worker (which serve.sh waits for) reached the
server, that no process's command line shows a secret, and that the zombie-run automation is on the server.
"""

from __future__ import annotations

import os
import secrets
import stat

import httpx
import mlflow
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from servers import REPO, WORK_POOL, LiveServers, start_servers, stop_servers

from flows.automations import MISSED_BEATS, NAME

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MLFLOW_USER, MLFLOW_PASSWORD = "rlhf-admin", secrets.token_hex(16)
PREFECT_USER, PREFECT_PASSWORD = "rlhf", secrets.token_hex(16)


@pytest.fixture(scope="module")
def auth_servers(tmp_path_factory) -> LiveServers:
    """scripts/serve.sh with authentication on, for this module."""
    auth = {
        "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
        "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
        "PREFECT_API_AUTH_STRING": f"{PREFECT_USER}:{PREFECT_PASSWORD}",
    }
    servers = start_servers(tmp_path_factory.mktemp("auth-servers"), auth)
    yield servers
    stop_servers(servers)


def test_both_servers_refuse_requests_without_the_credentials(auth_servers: LiveServers) -> None:
    search = f"{auth_servers.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(search, timeout=30).status_code == 401
    assert httpx.get(search, auth=(MLFLOW_USER, "wrong"), timeout=30).status_code == 401
    assert httpx.get(search, auth=(MLFLOW_USER, MLFLOW_PASSWORD), timeout=30).status_code == 200
    assert httpx.get(f"{auth_servers.mlflow_url}/health", timeout=30).status_code == 200  # probes stay open

    api, prefect_auth = auth_servers.prefect_api, (PREFECT_USER, PREFECT_PASSWORD)
    assert httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30).status_code == 401
    assert httpx.post(f"{api}/flow_runs/filter", json={}, auth=(PREFECT_USER, "wrong"), timeout=30).status_code == 401
    assert httpx.post(f"{api}/flow_runs/filter", json={}, auth=prefect_auth, timeout=30).status_code == 200
    # The CLI (work pool, deploy) and the worker authenticated: the pool is READY, every deployment is there.
    pool = httpx.get(f"{api}/work_pools/{WORK_POOL}", auth=prefect_auth, timeout=30).json()
    assert pool["status"] == "READY"
    deployed = httpx.post(f"{api}/deployments/filter", json={}, auth=prefect_auth, timeout=30).json()
    wanted = {d["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    assert {d["name"] for d in deployed} == wanted


def test_mlflow_client_authenticates_from_the_environment(auth_servers: LiveServers, monkeypatch) -> None:
    from rlhf.infra.tracking import TrackingUnavailable, check_tracking_store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_servers.mlflow_url)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    # `rlhf run` fails before any training, naming the variables, without them or with a wrong password
    with pytest.raises(TrackingUnavailable, match="refused no credentials .*Fix: export MLFLOW_TRACKING_USERNAME"):
        check_tracking_store()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(TrackingUnavailable, match=f"refused user '{MLFLOW_USER}'"):
        check_tracking_store()
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    check_tracking_store()
    client = MlflowClient(auth_servers.mlflow_url)
    experiment_id = client.create_experiment("auth-check")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(mlflow.exceptions.MlflowException, match="401|Unauthorized|credentials"):
        MlflowClient(auth_servers.mlflow_url).get_run(run.info.run_id)


def test_no_secret_is_on_any_command_line(auth_servers: LiveServers) -> None:
    secrets_ = (MLFLOW_PASSWORD, PREFECT_PASSWORD)
    shown = []
    for proc in psutil.process_iter(["pid", "cmdline"]):  # what `ps -ef` shows every user of the machine
        line = " ".join(proc.info["cmdline"] or [])
        if any(secret in line for secret in secrets_):
            shown.append((proc.info["pid"], line[:200]))
    assert shown == []
    # The servers were given them in their environment, and the auth config on disk holds none.
    worker = psutil.Process(int((auth_servers.run_dir / "worker.pid").read_text()))
    assert worker.environ()["PREFECT_API_AUTH_STRING"] == f"{PREFECT_USER}:{PREFECT_PASSWORD}"
    ini = auth_servers.run_dir / "mlflow-auth.ini"
    assert MLFLOW_PASSWORD not in ini.read_text() and stat.S_IMODE(os.stat(ini).st_mode) == 0o600


def test_zombie_automation_and_flow_heartbeats_are_on(auth_servers: LiveServers) -> None:
    api, prefect_auth = auth_servers.prefect_api, (PREFECT_USER, PREFECT_PASSWORD)
    automations = httpx.post(f"{api}/automations/filter", json={}, auth=prefect_auth, timeout=30).json()
    (zombie,) = [a for a in automations if a["name"] == NAME]
    worker = psutil.Process(int((auth_servers.run_dir / "worker.pid").read_text()))
    heartbeat_s = int(worker.environ()["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])  # flow runs inherit the worker's
    assert zombie["enabled"] and zombie["trigger"]["posture"] == "Proactive"
    assert zombie["trigger"]["within"] == MISSED_BEATS * heartbeat_s
    assert zombie["actions"][0]["type"] == "change-flow-run-state" and zombie["actions"][0]["state"] == "CRASHED"
