"""MLflow conventions: one parent run per pipeline run, one child run per stage.

Stages hand each other references (run ids and artifact URIs), never live
objects, so any stage can be re-run alone against a finished parent run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
LOCAL_ARTIFACT_DIR = "mlartifacts"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the SQLite store in the working folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def setup_experiment(name: str) -> str:
    """Point MLflow at the tracking store and return the experiment id (created if new)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        # Keep artifacts beside the local store, not wherever the process happens to run.
        artifact_location = Path(LOCAL_ARTIFACT_DIR).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location)


@contextmanager
def stage_run(parent_run_id: str, stage: str, params: dict[str, Any] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A child run named after the stage, nested under the pipeline's parent run."""
    parent = MlflowClient().get_run(parent_run_id)
    with mlflow.start_run(
        run_name=stage,
        experiment_id=parent.info.experiment_id,
        parent_run_id=parent_run_id,
        nested=True,
        tags={"rlhf.stage": stage},
    ) as run:
        if params:
            mlflow.log_params(params)
        yield run


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} for log_params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def download(artifact_uri: str) -> Path:
    """Local copy of a logged artifact folder (a no-op copy for a local store)."""
    dst = tempfile.mkdtemp(prefix="rlhf-artifact-")
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst))


def log_checkpoint(local_dir: str | Path, artifact_path: str) -> str:
    """Log a checkpoint folder to the active run; returns its artifact URI."""
    mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)
    return f"{mlflow.get_artifact_uri()}/{artifact_path}"
