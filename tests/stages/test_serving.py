"""The champion is servable: `mlflow models serve -m models:/rlhf-policy@champion` answers HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    """Poll GET /ping until 200, the server dies, or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {server.returncode}:\n{server.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise AssertionError(f"mlflow models serve not healthy after {timeout_s} s")


def test_champion_serves_a_generation_over_http(tiny_stack, mlflow_store, tmp_path):
    from rlhf.config import load_config
    from rlhf.infra.tracking import setup_experiment
    from rlhf.registry.promotion import CHAMPION
    from tasks.common import Evaluation, PPOResult
    from tasks.register import run_register

    cfg = load_config(None)
    sft = tiny_stack.sft
    with mlflow.start_run(experiment_id=setup_experiment("serving-test")) as parent:
        evaluation = Evaluation("no-eval-run", {"eval/kl_mean": 0.0}, sft, 0, {"eval.judge": "gold"})
        version = run_register(cfg, PPOResult(sft, {0: sft.uri}), evaluation, {}, parent.info.run_id)
    MlflowClient().set_registered_model_alias(cfg.registered_model, CHAMPION, version.version)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the model must carry its own code
    env.update(
        {
            "MLFLOW_TRACKING_URI": mlflow_store,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # uvicorn from the venv
        }
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{cfg.registered_model}@{CHAMPION}",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, server, STARTUP_TIMEOUT_S)
        body = {
            "dataframe_records": [{"prompt": "Customer: I forgot my password.\nAgent:"}],
            "params": {"max_new_tokens": 24, "temperature": 0},
        }
        request = urllib.request.Request(
            f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group: mlflow and its uvicorn
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    (prediction,) = answer["predictions"]
    assert isinstance(prediction["response"], str) and prediction["response"].strip(), answer
