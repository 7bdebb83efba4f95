"""Real servers for the integration and browser tests, started once per test session.

``live_servers`` runs scripts/serve.sh on free ports (Prefect server, MLflow tracking
server with a SQLite backend, the work pool, ``prefect deploy``, a worker) and
scripts/stop.sh when the session ends. ``smoke_outcome`` runs the ``smoke``
deployment once through the worker and sets the ``champion`` alias on the version it
registered. Both test files import these fixtures; a module-level cache makes them
start the servers and run the flow only once even though each module registers its
own copy of the fixture.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
WORK_POOL = "rlhf-process"
SMOKE_DEPLOYMENT = "rlhf-pipeline/smoke"
REGISTERED_MODEL = "rlhf-policy"
EXPERIMENT = "rlhf"
CHAMPION = "champion"
SERVE_TIMEOUT_S = 420
SMOKE_TIMEOUT_S = 600  # measured 383 s on the 2-core machine under load average ~10 (docs/deployments.md)
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def artifacts_dir() -> Path:
    """Where screenshots and server logs go: $RLHF_TEST_ARTIFACTS or tests/artifacts."""
    path = Path(os.environ.get("RLHF_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LiveServers:
    """Addresses and folders of the servers that scripts/serve.sh started."""

    prefect_url: str
    mlflow_url: str
    run_dir: Path
    mlflow_dir: Path
    env: dict[str, str]

    @property
    def prefect_api(self) -> str:
        """The Prefect REST API root."""
        return f"{self.prefect_url}/api"

    def get(self, path: str) -> Any:
        """GET a Prefect API path; the decoded JSON."""
        response = httpx.get(f"{self.prefect_api}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict | None = None) -> Any:
        """POST to a Prefect API path (the filter endpoints); the decoded JSON."""
        response = httpx.post(f"{self.prefect_api}{path}", json=body or {}, timeout=30)
        response.raise_for_status()
        return response.json()

    def log_tail(self, name: str, chars: int = 4000) -> str:
        """The end of one server's log (worker, prefect-server, mlflow-server)."""
        path = self.run_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else f"(no {path})"


@dataclass(frozen=True)
class SmokeOutcome:
    """What one run of the smoke deployment left on the servers."""

    flow_run_id: str
    flow_run: dict
    parent_run_id: str
    experiment_id: str
    version: str


AUTH_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")
"""The credentials scripts/serve.sh turns authentication on with; taken only from ``auth``, never inherited."""


def _serve_env(root: Path, prefect_port: int, mlflow_port: int, auth: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", *AUTH_VARIABLES):
        env.pop(key, None)
    env.update(auth or {})
    env.update(
        RLHF_BIN=str(Path(sys.executable).parent),
        RLHF_PREFECT_PORT=str(prefect_port),
        RLHF_MLFLOW_PORT=str(mlflow_port),
        RLHF_RUN_DIR=str(root / "run"),
        RLHF_MLFLOW_DIR=str(root / "mlflow"),
        PREFECT_HOME=str(root / "prefect-home"),
        # Only the training queue: an hourly drift-monitor run that falls due mid-test stays queued.
        RLHF_WORKER_QUEUES="training",
        RLHF_SERVE_TIMEOUT="240",
        # Test servers hold nothing worth a clean shutdown: stop.sh forces what is still up after 5 s (not 20).
        RLHF_STOP_GRACE="5",
    )
    return env


def start_servers(root: Path, auth: dict[str, str] | None = None) -> LiveServers:
    """Run scripts/serve.sh on free ports with its state under ``root``; ``auth``: the credential variables
    (``AUTH_VARIABLES``) that turn on MLflow's basic-auth app and Prefect's auth string."""
    prefect_port, mlflow_port = free_port(), free_port()
    env = _serve_env(root, prefect_port, mlflow_port, auth)
    servers = LiveServers(
        f"http://127.0.0.1:{prefect_port}",
        f"http://127.0.0.1:{mlflow_port}",
        root / "run",
        root / "mlflow",
        env,
    )
    try:
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "serve.sh")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=SERVE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        stop_servers(servers)  # serve.sh was killed mid-way: stop what it had started
        raise
    if proc.returncode != 0:
        raise RuntimeError(
            f"scripts/serve.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return servers


def stop_servers(servers: LiveServers) -> None:
    """Run scripts/stop.sh and keep the servers' logs with the test artifacts."""
    try:
        subprocess.run(["bash", str(REPO / "scripts" / "stop.sh")], env=servers.env, timeout=120, check=True)
    finally:
        logs = artifacts_dir() / "server-logs"
        logs.mkdir(exist_ok=True)
        for log in servers.run_dir.glob("*.log"):
            shutil.copy(log, logs / log.name)


def run_deployment(servers: LiveServers, name: str) -> str:
    """``prefect deployment run NAME`` against the live server; the new flow run's id."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "deployment", "run", name],
        env={**servers.env, "PREFECT_API_URL": servers.prefect_api},
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"prefect deployment run {name} failed:\n{proc.stdout}\n{proc.stderr}")
    return match.group(1)


def wait_for_flow_run(servers: LiveServers, flow_run_id: str, timeout_s: float) -> dict:
    """Poll a flow run until it reaches a terminal state; the flow run as the API returns it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        flow_run = servers.get(f"/flow_runs/{flow_run_id}")
        if flow_run["state_type"] in TERMINAL_STATES:
            return flow_run
        time.sleep(3)
    raise AssertionError(
        f"flow run {flow_run_id} not finished after {timeout_s:.0f} s (state {flow_run['state_name']});"
        f" worker log:\n{servers.log_tail('worker')}"
    )


def run_smoke(servers: LiveServers) -> SmokeOutcome:
    """Run the smoke deployment to Completed and give its registered version the champion alias.

    The alias is set here with MlflowClient (over HTTP) because promotion is the promote
    flow's job; this stands in for a promotion the gates approved.
    """
    from mlflow.tracking import MlflowClient

    outputs = REPO / "outputs"  # the worker runs flows in the repo (prefect.yaml's pull step)
    outputs_existed = outputs.exists()
    flow_run_id = run_deployment(servers, SMOKE_DEPLOYMENT)
    flow_run = wait_for_flow_run(servers, flow_run_id, SMOKE_TIMEOUT_S)
    if flow_run["state_type"] != "COMPLETED":
        raise AssertionError(
            f"smoke flow run ended {flow_run['state_name']}: {flow_run['state'].get('message')}\n"
            f"worker log:\n{servers.log_tail('worker')}"
        )
    client = MlflowClient(servers.mlflow_url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    if len(parents) != 1:
        raise AssertionError(f"expected one MLflow parent run tagged with flow run {flow_run_id}, found {len(parents)}")
    parent_id = parents[0].info.run_id
    versions = [
        v
        for v in client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
        if v.tags.get("lineage.pipeline_run_id") == parent_id
    ]
    if len(versions) != 1:
        raise AssertionError(f"expected one {REGISTERED_MODEL} version from run {parent_id}, found {len(versions)}")
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, versions[0].version)
    shutil.rmtree(outputs / parent_id if outputs_existed else outputs, ignore_errors=True)
    return SmokeOutcome(flow_run_id, flow_run, parent_id, experiment.experiment_id, versions[0].version)
